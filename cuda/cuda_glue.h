// Small helpers for the ATen glue of the CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include "quant_launchers.h"

namespace qlora_ext::cuda {

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::F32;
    case at::kHalf:
      return DType::F16;
    case at::kBFloat16:
      return DType::BF16;
    default:
      TORCH_CHECK(false, "unsupported dtype ", t);
  }
}

inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " kernel launch failed: ", cudaGetErrorString(err));
}

inline NestedAbsmax nested_view(const at::Tensor& absmax, const std::optional<at::Tensor>& na,
                                const std::optional<at::Tensor>& nc,
                                const std::optional<at::Tensor>& no, int64_t nested_blocksize) {
  NestedAbsmax nested;
  if (absmax.scalar_type() == at::kByte) {
    nested.codes = absmax.const_data_ptr<uint8_t>();
    nested.absmax = na->const_data_ptr<float>();
    nested.code = nc->const_data_ptr<float>();
    nested.offset = no->const_data_ptr<float>();
    nested.blocksize = nested_blocksize;
  }
  return nested;
}

}  // namespace qlora_ext::cuda
