// Tensor-core 4-bit GEMM for 16-bit activations: out = A @ dequant(W)^T (+ bias), sm_80+.
//
// Each 128x128 output tile walks K in steps of 32. Per step the block stages a 128x32 tile of A
// and the matching 128x32 tile of W in shared memory, W dequantized on the way in (16 codes per
// thread, times the block scale, rounded once to A's dtype: the same bits dequantize_4bit
// writes), and 8 warps multiply them with mma.sync through WMMA (16x16x16, fp32 accumulators;
// HMMA in SASS). The next step's global loads are issued into registers before the current
// step's math, so memory latency overlaps the tensor-core work. A LoRA term (LoraTerm) runs as
// a few more K steps into the same accumulators. Bias is added in the epilogue, which stages
// each 16x16 accumulator through shared memory and rounds once to A's dtype.
// The weight is read once per 128 rows of A and never written anywhere.
#include <mma.h>

#include "device_utils.cuh"
#include "quant_launchers.h"

namespace qlora_ext::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kBM = 128, kBN = 128, kBK = 32;  // block tile; kBK = one 32-code chunk of a block
constexpr int kThreadsTc = 256;                // 8 warps as 2 (M) x 4 (N), 64x32 each
constexpr int kLd = kBK + 8;                   // padded smem row: breaks bank conflicts
constexpr int kFragM = 4, kFragN = 2;          // 16x16 fragments per warp

template <typename T>
struct WmmaType;
template <>
struct WmmaType<__half> {
  using type = __half;
};
template <>
struct WmmaType<__nv_bfloat16> {
  using type = __nv_bfloat16;
};

// Global data of one K step, held in registers while the previous step computes.
struct Prefetch {
  uint4 a[2];   // 2 x 8 values of A
  uint2 w;      // 16 codes of W
  float scale;  // their block's scale (0 outside N)
};

template <typename T>
__device__ __forceinline__ void load_step(const T* __restrict__ A, int64_t M, int64_t K,
                                          const uint8_t* __restrict__ packed,
                                          const float* __restrict__ absmax,
                                          const NestedAbsmax& nested, int64_t N, int blocksize,
                                          int64_t m0, int64_t n0, int64_t k0, Prefetch& p) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {  // A: 128 rows x 4 vectors of 8
    const int idx = threadIdx.x + i * kThreadsTc;
    const int64_t row = m0 + idx / 4;
    p.a[i] = row < M ? __ldg(reinterpret_cast<const uint4*>(A + row * K + k0 + (idx % 4) * 8))
                     : make_uint4(0, 0, 0, 0);
  }
  const int64_t n = n0 + threadIdx.x / 2;  // W: 128 rows x 2 halves of 16 codes
  p.w = make_uint2(0, 0);
  p.scale = 0.f;
  if (n < N) {
    const int64_t e = n * K + k0 + (threadIdx.x % 2) * 16;
    p.w = __ldcs(reinterpret_cast<const uint2*>(packed + e / 2));
    const int64_t qb = e / blocksize;
    p.scale = nested.codes
                  ? nested_absmax(__ldg(nested.code + nested.codes[qb]),
                                  __ldg(nested.absmax + qb / nested.blocksize), *nested.offset)
                  : __ldg(absmax + qb);
  }
}

// Two values rounded to T and packed low-first into 32 bits (one rounding each, like from_f32).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T l = from_f32<T>(lo), h = from_f32<T>(hi);
  uint16_t lb, hb;
  memcpy(&lb, &l, 2);
  memcpy(&hb, &h, 2);
  return uint32_t(lb) | (uint32_t(hb) << 16);
}

template <typename T>
__device__ __forceinline__ void store_step(const Prefetch& p, const float* table, T* As, T* Ws) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int idx = threadIdx.x + i * kThreadsTc;
    *reinterpret_cast<uint4*>(As + (idx / 4) * kLd + (idx % 4) * 8) = p.a[i];
  }
  uint32_t w[8];  // 16 dequantized weights, two per word, in element order
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const uint32_t byte = ((j < 4 ? p.w.x : p.w.y) >> (8 * (j % 4))) & 0xFF;
    w[j] = pack2<T>(mul_rn(table[byte >> 4], p.scale), mul_rn(table[byte & 0xF], p.scale));
  }
  T* dst = Ws + (threadIdx.x / 2) * kLd + (threadIdx.x % 2) * 16;
  *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
  *reinterpret_cast<uint4*>(dst + 8) = make_uint4(w[4], w[5], w[6], w[7]);
}

// One kBK step of the block tile: this warp's 64x32 of acc += As (rows wm..) x Ws^T (rows wn..).
template <typename WT, typename T, typename Acc>
__device__ __forceinline__ void mma_step(const T* As, const T* Ws, int wm, int wn,
                                         Acc (&acc)[kFragM][kFragN]) {
#pragma unroll
  for (int kk = 0; kk < kBK; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> fa[kFragM];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::col_major> fb[kFragN];
#pragma unroll
    for (int i = 0; i < kFragM; ++i)
      wmma::load_matrix_sync(fa[i], reinterpret_cast<const WT*>(As + (wm + 16 * i) * kLd + kk),
                             kLd);
#pragma unroll
    for (int j = 0; j < kFragN; ++j)  // Ws holds W as [n][k]: W^T column-major
      wmma::load_matrix_sync(fb[j], reinterpret_cast<const WT*>(Ws + (wn + 16 * j) * kLd + kk),
                             kLd);
#pragma unroll
    for (int i = 0; i < kFragM; ++i)
#pragma unroll
      for (int j = 0; j < kFragN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
  }
}

// The LoRA term as r_pad more K steps (LoraTerm: x_ext = xa * scale and w_ext = B, both [.,
// r_pad] in T): the same tiles and accumulators, plain 16-bit loads for both operands. One or
// two steps at the usual ranks, so they are not pipelined.
template <typename WT, typename T, typename Acc>
__device__ __forceinline__ void lora_steps(const T* __restrict__ x_ext, const T* __restrict__ w_ext,
                                           int r_pad, int64_t M, int64_t N, int64_t m0, int64_t n0,
                                           int wm, int wn, T* As, T* Ws,
                                           Acc (&acc)[kFragM][kFragN]) {
  for (int k0 = 0; k0 < r_pad; k0 += kBK) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // 128 rows x 4 vectors of 8, as load_step
      const int idx = threadIdx.x + i * kThreadsTc;
      const int64_t row = m0 + idx / 4;
      *reinterpret_cast<uint4*>(As + (idx / 4) * kLd + (idx % 4) * 8) =
          row < M ? __ldg(reinterpret_cast<const uint4*>(x_ext + row * r_pad + k0 + (idx % 4) * 8))
                  : make_uint4(0, 0, 0, 0);
    }
    const int64_t n = n0 + threadIdx.x / 2;  // 128 rows x 2 halves of 16 values
    const T* src = w_ext + n * r_pad + k0 + (threadIdx.x % 2) * 16;
    T* dst = Ws + (threadIdx.x / 2) * kLd + (threadIdx.x % 2) * 16;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      *reinterpret_cast<uint4*>(dst + 8 * h) =
          n < N ? __ldg(reinterpret_cast<const uint4*>(src + 8 * h)) : make_uint4(0, 0, 0, 0);
    }
    __syncthreads();
    mma_step<WT>(As, Ws, wm, wn, acc);
    __syncthreads();
  }
}

// @kernel-budget gemm_4bit_tc_kernel: regs<=128 stack<=0 sass=HMMA (256 threads x 128 registers
// = two blocks per SM; the math must run on the tensor cores)
// Register budget: 8 fp32 accumulator fragments (64 floats) + prefetch + fragments of A and W:
// about 128 registers; __launch_bounds__(256, 1) leaves room, no spills expected.
template <typename T, typename B>
__global__ void __launch_bounds__(kThreadsTc)
    gemm_4bit_tc_kernel(const T* __restrict__ A, int64_t M, int64_t N, int64_t K,
                        const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                        NestedAbsmax nested, int blocksize, CodeTable c, const B* __restrict__ bias,
                        const T* __restrict__ x_ext, const T* __restrict__ w_ext, int r_pad,
                        T* __restrict__ out) {
  using WT = typename WmmaType<T>::type;
  __shared__ __align__(128) T As[kBM * kLd];
  __shared__ __align__(128) T Ws[kBN * kLd];
  __shared__ __align__(128) float stage[8][16 * 16];
  __shared__ float table[16];
  __shared__ uint8_t unused_sorted[16];
  load_code_table(c, table, unused_sorted);

  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = (warp / 4) * 64, wn = (warp % 4) * 32;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFragM][kFragN];
#pragma unroll
  for (int i = 0; i < kFragM; ++i)
#pragma unroll
    for (int j = 0; j < kFragN; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  Prefetch p;
  load_step(A, M, K, packed, absmax, nested, N, blocksize, m0, n0, 0, p);
  __syncthreads();  // table ready
  store_step(p, table, As, Ws);
  __syncthreads();

  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
    const bool more = k0 + kBK < K;
    if (more) load_step(A, M, K, packed, absmax, nested, N, blocksize, m0, n0, k0 + kBK, p);
    mma_step<WT>(As, Ws, wm, wn, acc);
    __syncthreads();  // everyone is done reading this step's tiles
    if (more) {
      store_step(p, table, As, Ws);
      __syncthreads();
    }
  }
  if (x_ext) lora_steps<WT>(x_ext, w_ext, r_pad, M, N, m0, n0, wm, wn, As, Ws, acc);

  // Epilogue: one 16x16 fragment at a time through this warp's staging tile.
  float* st = stage[warp];
#pragma unroll
  for (int i = 0; i < kFragM; ++i) {
#pragma unroll
    for (int j = 0; j < kFragN; ++j) {
      wmma::store_matrix_sync(st, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int e = lane; e < 256; e += 32) {
        const int64_t m = m0 + wm + 16 * i + e / 16, n = n0 + wn + 16 * j + e % 16;
        if (m < M && n < N) {
          const float v = st[e] + (bias ? to_f32(bias[n]) : 0.f);
          out[m * N + n] = from_f32<T>(v);
        }
      }
      __syncwarp();
    }
  }
}

}  // namespace

cudaError_t launch_gemm_4bit_tc(const void* A, DType dt, int64_t M, int64_t N, int64_t K,
                                const uint8_t* packed, const float* absmax,
                                const NestedAbsmax& nested, int64_t blocksize, QuantType qt,
                                const void* bias, DType bias_dt, void* out, cudaStream_t stream,
                                const LoraTerm& lora) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (dt == DType::F32 || K % kBK != 0) return cudaErrorInvalidValue;  // glue routes these away
  if (lora.x_ext && (lora.r_pad <= 0 || lora.r_pad % kBK != 0 || !lora.w_ext)) {
    return cudaErrorInvalidValue;
  }
  const CodeTable c = code_table(qt);
  const dim3 grid(unsigned((N + kBN - 1) / kBN), unsigned((M + kBM - 1) / kBM));
  auto launch = [&](auto ttag) {
    using T = decltype(ttag);
    dispatch_dtype(bias_dt, [&](auto btag) {
      using Bt = decltype(btag);
      gemm_4bit_tc_kernel<T, Bt><<<grid, kThreadsTc, 0, stream>>>(
          static_cast<const T*>(A), M, N, K, packed, absmax, nested, int(blocksize), c,
          static_cast<const Bt*>(bias), static_cast<const T*>(lora.x_ext),
          static_cast<const T*>(lora.w_ext), lora.r_pad, static_cast<T*>(out));
    });
  };
  if (dt == DType::F16) {
    launch(__half{});
  } else {
    launch(__nv_bfloat16{});
  }
  return cudaGetLastError();
}

}  // namespace qlora_ext::cuda
