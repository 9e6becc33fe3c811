// Argument checks for the 4-bit GEMMs, shared by the CPU and CUDA implementations.
#pragma once

#include "quant_checks.h"

namespace qlora_ext {

// `x` is the input (forward, last dim K) or grad_out (backward, last dim N).
inline void check_gemm_4bit_args(const at::Tensor& x, const char* x_name, int64_t x_last,
                                 const at::Tensor& packed, const at::Tensor& absmax, int64_t N,
                                 int64_t K, int64_t blocksize,
                                 const std::optional<at::Tensor>& nested_absmax,
                                 const std::optional<at::Tensor>& nested_code,
                                 const std::optional<at::Tensor>& nested_offset,
                                 int64_t nested_blocksize) {
  const auto dt = x.scalar_type();
  // float64 is accepted on the CPU, for gradcheck-grade references; the kernels there compute
  // it through the fp64 panel path.
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 ||
                  (dt == at::kDouble && x.device().is_cpu()),
              x_name, " must be float32, float16 or bfloat16 (or float64 on the CPU), got ", dt);
  TORCH_CHECK(N > 0 && K > 0, "N and K must be positive, got N=", N, " K=", K);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == x_last, x_name, " has last dimension ",
              x.dim() >= 1 ? x.size(-1) : 0, " but the 4-bit weight [N=", N, ", K=", K, "] needs ",
              x_last);
  TORCH_CHECK(K % blocksize == 0, "K=", K, " is not a multiple of blocksize=", blocksize,
              ": a 4-bit block would span two rows of the weight; quantize it with a blocksize "
              "that divides K");
  TORCH_CHECK(x.device() == packed.device(), x_name, " is on ", x.device(),
              " but the 4-bit weight is on ", packed.device());
  check_dequantize_4bit_args(packed, absmax, blocksize, {N, K}, at::kFloat, nested_absmax,
                             nested_code, nested_offset, nested_blocksize);
}

inline void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& A, int64_t N) {
  if (!bias) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must have shape [", N, "], got ",
              bias->sizes());
  TORCH_CHECK(bias->device() == A.device(), "bias is on ", bias->device(), " but x is on ",
              A.device());
  const auto dt = bias->scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 ||
                  (dt == at::kDouble && bias->device().is_cpu()),
              "bias must be float32, float16 or bfloat16 (or float64 on the CPU), got ", dt);
}

// Output shape: x's leading dimensions, then `last`.
inline std::vector<int64_t> gemm_out_shape(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = last;
  return s;
}

}  // namespace qlora_ext
