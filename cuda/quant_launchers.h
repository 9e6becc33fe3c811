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

// A rectangle of a 4-bit tensor viewed as [rows, ld]: rows [row0, row0 + rows), columns
// [col0, col0 + cols). The whole tensor of n elements is {0, 1, n, 0, n}. For a weight [N, K],
// col0 and cols must be multiples of the blocksize (so are K-panels and N-panels).
struct Slice {
  int64_t row0, rows, ld, col0, cols;
};

// out receives the slice densely, [rows, cols].
cudaError_t launch_dequantize_4bit(const uint8_t* packed, const float* absmax,
                                   const NestedAbsmax& nested, const Slice& slice,
                                   int64_t blocksize, QuantType qt, void* out, DType dt,
                                   cudaStream_t stream);

// The rank-r term of lora_4bit_forward, out[m, n] += scale * sum_j xa[m, j] * B[n, j], added
// inside a 4-bit GEMM's epilogue instead of by a second pass over out. Each path reads its own
// form (the glue fills the one it launches; an empty LoraTerm adds nothing):
// - small M: xa [M, r] and B [N, r] in fp32, dotted in fp32 in the split-K epilogue;
// - tensor cores: x_ext = xa * scale and w_ext = B in A's dtype, zero-padded to r_pad columns
//   (a multiple of 32), multiplied as r_pad more K steps into the same fp32 accumulators, so
//   y is rounded once.
struct LoraTerm {
  const float* xa = nullptr;
  const float* B = nullptr;
  int r = 0;
  float scale = 0.f;
  const void* x_ext = nullptr;
  const void* w_ext = nullptr;
  int r_pad = 0;
};

// Small-M 4-bit GEMM: out[m, n] = sum_k A[m, k] * dequant(W)[n, k] (+ bias[n]) for M <= 16.
// ws is an fp32 workspace of splits * M * N floats (splits from gemv_4bit_splits).
int gemv_4bit_splits(int64_t N, int64_t K, int num_sms);
cudaError_t launch_gemv_4bit(const void* A, DType dt, int64_t M, int64_t N, int64_t K,
                             const uint8_t* packed, const float* absmax, const NestedAbsmax& nested,
                             int64_t blocksize, QuantType qt, const void* bias, DType bias_dt,
                             int splits, float* ws, void* out, cudaStream_t stream,
                             const LoraTerm& lora = LoraTerm{});

cudaError_t launch_quantize_blockwise_8bit(const void* x, DType dt, int64_t n, int64_t blocksize,
                                           const float* code, uint8_t* q, float* absmax,
                                           cudaStream_t stream);

cudaError_t launch_dequantize_blockwise_8bit(const uint8_t* q, const float* absmax,
                                             const float* code, int64_t n, int64_t blocksize,
                                             void* out, DType dt, cudaStream_t stream);

// Tensor-core 4-bit GEMM (fp16/bf16 A, K a multiple of 32): out = A @ dequant(W)^T (+ bias).
cudaError_t launch_gemm_4bit_tc(const void* A, DType dt, int64_t M, int64_t N, int64_t K,
                                const uint8_t* packed, const float* absmax,
                                const NestedAbsmax& nested, int64_t blocksize, QuantType qt,
                                const void* bias, DType bias_dt, void* out, cudaStream_t stream,
                                const LoraTerm& lora = LoraTerm{});

}  // namespace qlora_ext::cuda
