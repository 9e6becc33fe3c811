// Built only without CUDA: a CUDA tensor reaching a qlora_ext op gets an error that says how to
// fix it, rather than the dispatcher's "could not run ... with arguments from the CUDA backend".
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace {

void built_without_cuda(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, op.schema().name(),
              " got a CUDA tensor, but qlora_ext was built without CUDA: rebuild with nvcc on "
              "PATH and a CUDA build of torch (pip install --no-build-isolation .), and leave "
              "QLORA_EXT_CUDA unset or 1");
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) {
  for (const char* name :
       {"quantize_4bit", "dequantize_4bit", "quantize_blockwise_8bit", "dequantize_blockwise_8bit",
        "gemm_4bit", "gemm_4bit_grad_input", "adamw_step_32bit", "adamw_step_32bit_multi",
        "adamw_step_8bit_blockwise"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&built_without_cuda>());
  }
  for (const char* name : {"lora_4bit_forward", "lora_4bit_backward"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&built_without_cuda>());
  }
}
