#include "panel_blas.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <atomic>

#include "cpu_isa.h"

namespace qlora_ext::cpu {
namespace {

// The oneDNN linear torch registers (absent from builds without oneDNN).
std::optional<c10::OperatorHandle> onednn_op() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op;
}

bool mkl_is_tuned_for_this_cpu() {
#if QX_X86
  __builtin_cpu_init();
  return __builtin_cpu_is("intel");
#else
  return true;  // no choice to make: MKL is x86-only, at::mm is torch's BLAS there
#endif
}

PanelBlas auto_blas() {
  return (onednn_op().has_value() && !mkl_is_tuned_for_this_cpu()) ? PanelBlas::OneDnn
                                                                   : PanelBlas::Aten;
}

std::atomic<int> g_blas{-1};

}  // namespace

PanelBlas panel_blas() {
  int v = g_blas.load(std::memory_order_relaxed);
  if (v < 0) {
    v = static_cast<int>(auto_blas());
    g_blas.store(v, std::memory_order_relaxed);
  }
  return static_cast<PanelBlas>(v);
}

void set_panel_blas(const std::string& name) {
  PanelBlas want;
  if (name == "auto") {
    want = auto_blas();
  } else if (name == "aten") {
    want = PanelBlas::Aten;
  } else if (name == "onednn") {
    TORCH_CHECK(onednn_op().has_value(),
                "blas 'onednn' needs a torch built with oneDNN (mkldnn::_linear_pointwise)");
    want = PanelBlas::OneDnn;
  } else {
    TORCH_CHECK(false, "blas must be 'auto', 'aten' or 'onednn', got '", name, "'");
  }
  g_blas.store(static_cast<int>(want), std::memory_order_relaxed);
}

std::string panel_blas_name(PanelBlas b) { return b == PanelBlas::OneDnn ? "onednn" : "aten"; }

at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w,
                         const std::optional<at::Tensor>& bias) {
  // Boxed, so a change in the op's C++ signature between torch versions cannot mis-call it.
  std::vector<c10::IValue> stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(w);
  stack.emplace_back(bias ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(c10::IValue());
  onednn_op()->callBoxed(stack);
  return stack.at(0).toTensor();
}

}  // namespace qlora_ext::cpu
