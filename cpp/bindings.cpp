// pybind11 module qlora_ext._C: helpers that are not tensor ops. Importing it also runs the
// TORCH_LIBRARY registrations compiled into the same library.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "cpu/cpu_alloc.h"
#include "cpu/cpu_isa.h"
#include "cpu/panel_blas.h"
#include "gemm_path.h"
#include "paged.h"

#ifndef QLORA_EXT_CUDA_ARCHS
#define QLORA_EXT_CUDA_ARCHS ""
#endif
#ifndef QLORA_EXT_SANITIZE
#define QLORA_EXT_SANITIZE ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "qlora_ext native helpers (the ops are in torch.ops.qlora_ext)";
  m.def(
      "build_info",
      []() {
        py::dict d;
#ifdef QLORA_EXT_WITH_CUDA
        d["cuda"] = true;
#else
        d["cuda"] = false;
#endif
        d["cuda_archs"] = std::string(QLORA_EXT_CUDA_ARCHS);
        d["cpu_isa"] = qlora_ext::cpu::isa_name(qlora_ext::cpu::current_isa());
        d["cpu_isa_detected"] = qlora_ext::cpu::isa_name(qlora_ext::cpu::detected_isa());
        d["cpu_blas"] = qlora_ext::cpu::panel_blas_name(qlora_ext::cpu::panel_blas());
        d["sanitize"] = std::string(QLORA_EXT_SANITIZE);
        return d;
      },
      "What this build contains: CUDA kernels or not, their archs, the CPU ISA in use, the "
      "sanitizers compiled in ('' for none).");
  m.def("set_cpu_isa", &qlora_ext::cpu::set_isa, py::arg("isa"),
        "Force the CPU kernels onto 'avx512', 'avx2' or 'scalar' ('auto' restores the best).");
  m.def("set_cpu_blas", &qlora_ext::cpu::set_panel_blas, py::arg("blas"),
        "Force the BLAS of the CPU panel GEMMs: 'aten' (torch's at::mm, MKL on x86) or "
        "'onednn'; 'auto' restores the default (Note [Panel BLAS]).");
  m.def("set_gemm_path", &qlora_ext::set_gemm_path, py::arg("path"),
        "Force the 4-bit GEMM onto 'small' (streaming, M <= 16), 'tc' (CUDA tensor cores, "
        "16-bit A) or 'panel' (dequantize panels + BLAS) where the path applies; 'auto' "
        "restores the heuristic.");
  m.def("empty_cpu_cache", &qlora_ext::cpu::empty_large_cache_clear,
        "Free the cached blocks behind large CPU outputs (Note [Large CPU outputs]); returns "
        "the bytes released.");
#if QX_ASAN
  m.def("_debug_touch_large_output", &qlora_ext::cpu::debug_touch_large_output, py::arg("nbytes"),
        py::arg("offset"), py::arg("after_free"),
        "Sanitizer builds only: write one byte at `offset` of a large CPU output, or of its "
        "cached block once freed (Note [Poisoned cache blocks]).");
#endif
  qlora_ext::paged::register_bindings(m);
  // QLORA_EXT_CPU_ISA=avx512|avx2|scalar|auto forces the CPU kernels' ISA from the start.
  const std::string isa_warning = qlora_ext::cpu::set_isa_from_env();
  if (!isa_warning.empty() && PyErr_WarnEx(PyExc_RuntimeWarning, isa_warning.c_str(), 1) < 0) {
    throw py::error_already_set();
  }
}
