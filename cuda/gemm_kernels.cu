// Small-M 4-bit GEMM (decode and small batches): out = A @ dequant(W)^T (+ bias), M <= 16.
//
// Memory-bound on the weight, so the weight is read exactly once, 16 bytes (32 codes) per lane
// per load with an evict-first hint, and A (at most 16 rows) stays in L1/L2. A warp owns
// kCols rows of W (output columns) so that each A value it loads feeds kCols FMAs; lanes
// stride K in 32-code chunks, so a warp's loads of one row are 512 contiguous bytes. Products
// accumulate in fp32 registers and are reduced across the warp at the end. When N is too small
// to fill the GPU, K is split across blocks (grid.y); partial sums land in an fp32 workspace
// and a second kernel adds them in a fixed order (deterministic), adds the bias and the LoRA
// term (LoraTerm) and rounds once.
#include "device_utils.cuh"
#include "quant_launchers.h"

namespace qlora_ext::cuda {
namespace {

constexpr int kCols = 4;    // rows of W per warp
constexpr int kWarps = 4;   // warps per block: 16 output columns per block
constexpr int kLaneK = 32;  // codes per lane per step (one 16-byte load)

// Register budget: acc (MT x kCols), 32 dequantized weights, 8 A values: <= 128 registers at
// MT = 16, so no spills under __launch_bounds__(128). Checked by scripts/check_cuda_build.py.
template <typename T>
__device__ __forceinline__ void load_a8(const T* __restrict__ p, float (&a)[8]) {
  // 8 consecutive values: one 16-byte load for 16-bit types, two for fp32.
#pragma unroll
  for (int k = 0; k < 8; k += 16 / sizeof(T)) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p + k));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < int(16 / sizeof(T)); ++j) a[k + j] = to_f32(e[j]);
  }
}

// @kernel-budget gemv_4bit_kernel: regs<=255 stack<=0 sass=LDG.E.128 (MT=16 with fp32 A holds
// 64 accumulators, 32 decoded weights and 8 A values; anything spilled would sit in the hot
// loop, so the budget is the whole register file a thread may have, and no stack)
// MT: rows of A compiled for (1, 4 or 16; M <= MT), so the accumulators are registers.
template <typename T, int MT>
__global__ void __launch_bounds__(kWarps * 32)
    gemv_4bit_kernel(const T* __restrict__ A, int M, int64_t N, int64_t K,
                     const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                     NestedAbsmax nested, int blocksize, CodeTable c, int64_t k_per_split,
                     float* __restrict__ ws) {
  __shared__ float table[16];
  __shared__ uint8_t unused_sorted[16];
  load_code_table(c, table, unused_sorted);
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n0 = (int64_t(blockIdx.x) * kWarps + warp) * kCols;
  if (n0 >= N) return;
  const int64_t k_begin = int64_t(blockIdx.y) * k_per_split;
  const int64_t k_end = k_begin + k_per_split < K ? k_begin + k_per_split : K;

  float acc[MT][kCols];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int cc = 0; cc < kCols; ++cc) acc[m][cc] = 0.f;

  for (int64_t k = k_begin + lane * kLaneK; k < k_end; k += 32 * kLaneK) {
    uint4 wq[kCols];
    float sc[kCols];
#pragma unroll
    for (int cc = 0; cc < kCols; ++cc) {
      const int64_t n = n0 + cc;
      wq[cc] = make_uint4(0, 0, 0, 0);
      sc[cc] = 0.f;
      if (n < N) {
        const int64_t e = n * K + k;  // 32 codes of one quant block (blocksize >= 32)
        wq[cc] = __ldcs(reinterpret_cast<const uint4*>(packed + e / 2));
        const int64_t qb = e / blocksize;
        sc[cc] = nested.codes
                     ? nested_absmax(__ldg(nested.code + nested.codes[qb]),
                                     __ldg(nested.absmax + qb / nested.blocksize), *nested.offset)
                     : __ldg(absmax + qb);
      }
    }
#pragma unroll
    for (int sub = 0; sub < 4; ++sub) {  // 8 codes (one 32-bit word) per column at a time
      float w[kCols][8];
#pragma unroll
      for (int cc = 0; cc < kCols; ++cc) {
        const uint32_t word = (&wq[cc].x)[sub];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t byte = (word >> (8 * j)) & 0xFF;
          w[cc][2 * j] = table[byte >> 4] * sc[cc];
          w[cc][2 * j + 1] = table[byte & 0xF] * sc[cc];
        }
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < M) {
          float a[8];
          load_a8(A + m * K + k + 8 * sub, a);
#pragma unroll
          for (int cc = 0; cc < kCols; ++cc)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[m][cc] = fmaf(a[j], w[cc][j], acc[m][cc]);
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int cc = 0; cc < kCols; ++cc) {
      float v = acc[m][cc];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0 && m < M && n0 + cc < N) ws[(int64_t(blockIdx.y) * M + m) * N + n0 + cc] = v;
    }
  }
}

// @kernel-budget gemv_epilogue_kernel: regs<=48 stack<=0 (elementwise)
// out[m, n] = sum over splits of ws (in split order) + bias[n] + lora.scale * dot(xa[m, :],
// B[n, :]) (LoraTerm, fp32), rounded once to T.
template <typename T, typename B>
__global__ void __launch_bounds__(256)
    gemv_epilogue_kernel(const float* __restrict__ ws, int splits, int64_t MN, int64_t N,
                         const B* __restrict__ bias, const float* __restrict__ xa,
                         const float* __restrict__ lb, int r, float scale, T* __restrict__ out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < MN;
       i += int64_t(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int s = 0; s < splits; ++s) v += ws[s * MN + i];
    if (bias) v += to_f32(bias[i % N]);
    if (xa) {
      const float* x = xa + (i / N) * r;
      const float* b = lb + (i % N) * r;
      float l = 0.f;
      for (int j = 0; j < r; ++j) l = fmaf(__ldg(x + j), __ldg(b + j), l);
      v = fmaf(scale, l, v);
    }
    out[i] = from_f32<T>(v);
  }
}

}  // namespace

int gemv_4bit_splits(int64_t N, int64_t K, int num_sms) {
  // Aim for about four blocks per SM; each split keeps at least one full lane sweep (1024 codes).
  const int64_t blocks = (N + kWarps * kCols - 1) / (kWarps * kCols);
  int64_t splits = (4 * int64_t(num_sms) + blocks - 1) / blocks;
  const int64_t max_splits = (K + 32 * kLaneK - 1) / (32 * kLaneK);
  splits = splits < 1 ? 1 : (splits > max_splits ? max_splits : splits);
  return int(splits);
}

cudaError_t launch_gemv_4bit(const void* A, DType dt, int64_t M, int64_t N, int64_t K,
                             const uint8_t* packed, const float* absmax, const NestedAbsmax& nested,
                             int64_t blocksize, QuantType qt, const void* bias, DType bias_dt,
                             int splits, float* ws, void* out, cudaStream_t stream,
                             const LoraTerm& lora) {
  if (M == 0 || N == 0) return cudaSuccess;
  const CodeTable c = code_table(qt);
  // Each split covers a multiple of 32 codes, so no lane's 16-byte chunk straddles two splits.
  int64_t k_per_split = (K + splits - 1) / splits;
  k_per_split = (k_per_split + kLaneK - 1) / kLaneK * kLaneK;
  const int real_splits = int((K + k_per_split - 1) / k_per_split);
  const dim3 grid(unsigned((N + kWarps * kCols - 1) / (kWarps * kCols)), unsigned(real_splits));
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* a = static_cast<const T*>(A);
    if (M <= 1) {
      gemv_4bit_kernel<T, 1><<<grid, kWarps * 32, 0, stream>>>(
          a, int(M), N, K, packed, absmax, nested, int(blocksize), c, k_per_split, ws);
    } else if (M <= 4) {
      gemv_4bit_kernel<T, 4><<<grid, kWarps * 32, 0, stream>>>(
          a, int(M), N, K, packed, absmax, nested, int(blocksize), c, k_per_split, ws);
    } else {
      gemv_4bit_kernel<T, 16><<<grid, kWarps * 32, 0, stream>>>(
          a, int(M), N, K, packed, absmax, nested, int(blocksize), c, k_per_split, ws);
    }
  });
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t MN = M * N;
  const unsigned egrid = unsigned(MN / 256 + 1 < 65536 ? MN / 256 + 1 : 65536);
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    dispatch_dtype(bias_dt, [&](auto btag) {
      using B = decltype(btag);
      gemv_epilogue_kernel<T, B>
          <<<egrid, 256, 0, stream>>>(ws, real_splits, MN, N, static_cast<const B*>(bias), lora.xa,
                                      lora.B, lora.r, lora.scale, static_cast<T*>(out));
    });
  });
  return cudaGetLastError();
}

}  // namespace qlora_ext::cuda
