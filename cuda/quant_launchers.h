// Plain C++ entry points to the CUDA quantization kernels. No ATen here: the kernels compile
// quickly and can be driven from a standalone test; cuda/quant_ops.cpp does the ATen work
// (checks, allocation, current stream) and calls these.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "codes.h"

namespace qlora_ext::cuda {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

struct NestedAbsmax {
  const uint8_t* codes = nullptr;  // null: absmax is plain fp32
  const float* absmax = nullptr;   // per group of `blocksize` codes
  const float* code = nullptr;     // 256 values
  const float* offset = nullptr;   // one value
  int64_t blocksize = 256;
};

// packed: ceil(n/2) bytes; absmax: ceil(n/blocksize) floats. Returns the launch status.
cudaError_t launch_quantize_4bit(const void* x, DType dt, int64_t n, int64_t blocksize,
                                 QuantType qt, uint8_t* packed, float* absmax, cudaStream_t stream);

cudaError_t launch_dequantize_4bit(const uint8_t* packed, const float* absmax,
                                   const NestedAbsmax& nested, int64_t n, int64_t blocksize,
                                   QuantType qt, void* out, DType dt, cudaStream_t stream);

cudaError_t launch_quantize_blockwise_8bit(const void* x, DType dt, int64_t n, int64_t blocksize,
                                           const float* code, uint8_t* q, float* absmax,
                                           cudaStream_t stream);

cudaError_t launch_dequantize_blockwise_8bit(const uint8_t* q, const float* absmax,
                                             const float* code, int64_t n, int64_t blocksize,
                                             void* out, DType dt, cudaStream_t stream);

}  // namespace qlora_ext::cuda
