// gemm_4bit on CUDA with lora_4bit_forward's rank-r term added inside the GEMM (Note [LoRA
// epilogue], gemm_ops.cpp), for cuda/lora_ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "lora_impl.h"

namespace qlora_ext::cuda {

// x2d @ dequant(W)^T (+ bias) + scale * xa @ B^T, in x2d's dtype: xa [M, r] (fp32), B [N, r].
at::Tensor gemm_4bit_lora_cuda(const at::Tensor& x2d, const Weight4Ref& w,
                               const std::optional<at::Tensor>& bias, const at::Tensor& xa,
                               const at::Tensor& B, double scale);

}  // namespace qlora_ext::cuda
