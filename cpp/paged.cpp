// Device-independent half of the paged-memory helpers and their pybind11 bindings. The policy
// (which states are paged, when to prefetch) lives in python/qlora_ext/optim.py.
#include "paged.h"

#include <torch/python.h>

#include "managed_budget.h"

namespace qlora_ext::paged {

ManagedBudget& managed_budget() {
  static ManagedBudget budget;
  return budget;
}

at::Tensor paged_empty(at::IntArrayRef shape, const at::Tensor& like, int64_t margin_bytes) {
  TORCH_CHECK(margin_bytes >= 0, "margin_bytes must be >= 0, got ", margin_bytes);
  if (!like.is_cuda()) return at::empty(shape, like.options());
#ifdef QLORA_EXT_WITH_CUDA
  return managed_empty_cuda(shape, like, margin_bytes);
#else
  TORCH_CHECK(false,
              "paged_empty got a CUDA device in `like`, but qlora_ext was built without "
              "CUDA: rebuild with nvcc on PATH (pip install --no-build-isolation .)");
#endif
}

void prefetch(const at::Tensor& t, bool to_device) {
#ifdef QLORA_EXT_WITH_CUDA
  if (t.is_cuda()) prefetch_cuda(t, to_device);
#else
  (void)t;
  (void)to_device;
#endif
}

bool is_managed(const at::Tensor& t) {
#ifdef QLORA_EXT_WITH_CUDA
  return t.is_cuda() && is_managed_cuda(t);
#else
  (void)t;
  return false;
#endif
}

void register_bindings(pybind11::module_& m) {
  namespace py = pybind11;
  m.def(
      "paged_empty",
      [](std::vector<int64_t> shape, const at::Tensor& like, int64_t margin_bytes) {
        return paged_empty(shape, like, margin_bytes);
      },
      py::arg("shape"), py::arg("like"), py::arg("margin_bytes") = 0,
      "Uninitialised tensor of like's dtype and device: CUDA managed memory on a GPU (refused "
      "when the live managed bytes plus this request exceed free memory minus margin_bytes), "
      "ordinary host memory on the CPU.");
  m.def("paged_prefetch", &prefetch, py::arg("tensor"), py::arg("to_device"),
        "Prefetch a managed tensor to its GPU (to_device=True) or to the host, on the current "
        "stream; a no-op for CPU tensors and non-managed memory.");
  m.def("paged_is_managed", &is_managed, py::arg("tensor"),
        "True if the tensor's memory comes from cudaMallocManaged.");
  m.def(
      "paged_live_bytes", [](int device) { return managed_budget().live(device); },
      py::arg("device"),
      "Bytes of paged (managed) memory this process holds on a CUDA device (Note "
      "[Managed-memory budget]).");
  // The budget's rule on its own, with a Python callable as the free-memory source, so the CPU
  // tests can check the accounting that guards every managed allocation.
  py::class_<ManagedBudget>(m, "_ManagedBudget")
      .def(py::init<>())
      .def(
          "reserve",
          [](ManagedBudget& b, int device, size_t bytes, size_t margin, py::function free_bytes) {
            b.reserve(
                device, bytes, margin,
                [&](int d, bool emptied) { return free_bytes(d, emptied).cast<size_t>(); },
                "test allocation");
          },
          py::arg("device"), py::arg("bytes"), py::arg("margin"), py::arg("free_bytes"))
      .def("release", &ManagedBudget::release, py::arg("device"), py::arg("bytes"))
      .def("live", &ManagedBudget::live, py::arg("device"));
}

}  // namespace qlora_ext::paged
