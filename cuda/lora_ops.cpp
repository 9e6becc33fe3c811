// ATen glue for the CUDA LoRA ops (TORCH_LIBRARY_IMPL CUDA). The maths is in cpp/lora_impl.h:
// the base product runs in x's dtype through the 4-bit GEMM with the rank-r term added in its
// epilogue (Note [LoRA epilogue], gemm_ops.cpp), the adapter products in fp32
// (Note [LoRA accumulation]). Only the dropout mask needs a kernel of its own.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_glue.h"
#include "gemm_lora.h"
#include "lora_impl.h"
#include "lora_launchers.h"

namespace qlora_ext::cuda {
namespace {

void dropout_cuda(at::Tensor& t, uint64_t seed, uint32_t threshold, double inv_keep) {
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == at::kFloat,
              "lora dropout buffer must be a contiguous fp32 tensor, got ", t.scalar_type());
  check_launch(
      launch_lora_dropout_f32(t.data_ptr<float>(), t.numel(), seed, threshold,
                              static_cast<float>(inv_keep), c10::cuda::getCurrentCUDAStream()),
      "lora dropout");
}

const LoraBackend kCuda{false, &dropout_cuda, &gemm_4bit_lora_cuda};

std::tuple<at::Tensor, at::Tensor> lora_4bit_forward_cuda(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t N, int64_t K,
    int64_t blocksize, c10::string_view quant_type, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scale, double dropout_p, const std::optional<at::Tensor>& seed,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& nested_absmax,
    const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& nested_offset,
    int64_t nested_blocksize) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Weight4Ref w{
      packed,        absmax,          N, K, blocksize, quant_type, nested_absmax, nested_code,
      nested_offset, nested_blocksize};
  return lora_forward(kCuda, x, w, lora_A, lora_B, scale, dropout_p, seed, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_4bit_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& xa, const at::Tensor& packed,
    const at::Tensor& absmax, int64_t N, int64_t K, int64_t blocksize, c10::string_view quant_type,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& nested_absmax,
    const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& nested_offset,
    int64_t nested_blocksize) {
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const Weight4Ref w{
      packed,        absmax,          N, K, blocksize, quant_type, nested_absmax, nested_code,
      nested_offset, nested_blocksize};
  return lora_backward(kCuda, grad_out, x, xa, w, lora_A, lora_B, scale, dropout_p, seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) {
  m.impl("lora_4bit_forward", &lora_4bit_forward_cuda);
  m.impl("lora_4bit_backward", &lora_4bit_backward_cuda);
}

}  // namespace qlora_ext::cuda
