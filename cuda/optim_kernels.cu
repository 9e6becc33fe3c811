// CUDA kernels of the fused AdamW ops. The per-element maths is optim_math.h's (Note [AdamW
// order], Note [8-bit state quantization]), so the GPU computes the CPU kernels' exact values.
//
// Memory-bound: the 32-bit step reads and writes 12 B per fp32 parameter plus a 4 B gradient;
// the 8-bit step 6 B plus the gradient. One thread per element, grid-stride for the 32-bit op;
// the 8-bit op gives each 256-element quantization block one CUDA block of 256 threads, so the
// new absmax is a block reduction in registers and shared memory and the codes never leave it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "device_utils.cuh"
#include "optim_launchers.h"

namespace qlora_ext::cuda {
namespace {

constexpr int kThreads = 256;
static_assert(kOptimBlock == kThreads, "one thread per element of a quantization block");

// @kernel-budget count_nonfinite_kernel: regs<=48 stack<=0 (a reduction over the gradient)
template <typename T>
__global__ void count_nonfinite_kernel(const T* __restrict__ g, int64_t n,
                                       unsigned long long* __restrict__ count) {
  unsigned int bad = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    bad += is_finite(to_f32(g[i])) ? 0u : 1u;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) bad += __shfl_down_sync(0xffffffffu, bad, off);
  if ((threadIdx.x & 31) == 0 && bad) atomicAdd(count, (unsigned long long)bad);
}

// @kernel-budget adamw_32bit_kernel: regs<=48 stack<=0 (elementwise, memory-bound)
template <typename T>
__global__ void adamw_32bit_kernel(T* __restrict__ p, const T* __restrict__ g,
                                   float* __restrict__ m, float* __restrict__ v, int64_t n,
                                   AdamWScalars s, const unsigned long long* __restrict__ skip) {
  if (*skip) return;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    float pi = to_f32(p[i]), mi = m[i], vi = v[i];
    adamw_element(pi, to_f32(g[i]), mi, vi, s);
    p[i] = from_f32<T>(pi);
    m[i] = mi;
    v[i] = vi;
  }
}

// Max over the CUDA block; every thread gets the result.
__device__ __forceinline__ float block_max(float x, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = x;
  __syncthreads();
  float r = scratch[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) r = fmaxf(r, scratch[w]);
  return r;
}

// @kernel-budget adamw_8bit_kernel: regs<=64 stack<=0 (one thread per element of a
// 256-value block; the 8-bit code search must stay in registers)
template <typename T>
__global__ void __launch_bounds__(kThreads)
    adamw_8bit_kernel(T* __restrict__ p, const T* __restrict__ g, uint8_t* __restrict__ qm,
                      float* __restrict__ am, uint8_t* __restrict__ qv, float* __restrict__ av,
                      const float* __restrict__ cs, const float* __restrict__ cu, int64_t n,
                      AdamWScalars s, const unsigned long long* __restrict__ skip) {
  if (*skip) return;
  __shared__ float s_cs[256], s_cu[256], mid_s[kNumMidpoints], mid_u[kNumMidpoints];
  __shared__ float scratch_m[kThreads / 32], scratch_v[kThreads / 32];
  const int t = threadIdx.x;
  s_cs[t] = cs[t];
  s_cu[t] = cu[t];
  if (t < kNumMidpoints) {
    mid_s[t] = code_midpoint(cs, t);
    mid_u[t] = code_midpoint(cu, t);
  }
  __syncthreads();
  const int64_t blk = blockIdx.x;
  const int64_t i = blk * kOptimBlock + t;
  const bool live = i < n;
  float m = 0.0f, v = 0.0f;
  if (live) {
    m = dequantize_code(s_cs, qm[i], am[blk]);
    v = dequantize_code(s_cu, qv[i], av[blk]);
    float pi = to_f32(p[i]);
    adamw_element(pi, to_f32(g[i]), m, v, s);
    p[i] = from_f32<T>(pi);
  }
  // Every thread has read am[blk]/av[blk] before block_max's barrier, so thread 0 may overwrite.
  const float m_max = block_max(fabsf(m), scratch_m);
  const float v_max = block_max(v, scratch_v);
  if (t == 0) {
    am[blk] = m_max;
    av[blk] = v_max;
  }
  if (live) {
    qm[i] = quantize_nearest(mid_s, m, m_max);
    qv[i] = quantize_nearest(mid_u, v, v_max);
  }
}

int grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return int(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);  // grid-stride beyond
}

}  // namespace

cudaError_t launch_count_nonfinite(const void* g, DType dt, int64_t n, unsigned long long* count,
                                   cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    count_nonfinite_kernel<T>
        <<<grid_for(n), kThreads, 0, stream>>>(static_cast<const T*>(g), n, count);
  });
}

cudaError_t launch_adamw_32bit(void* p, const void* g, DType dt, float* m, float* v, int64_t n,
                               const AdamWScalars& s, const unsigned long long* skip,
                               cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    adamw_32bit_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<T*>(p), static_cast<const T*>(g), m, v, n, s, skip);
  });
}

cudaError_t launch_adamw_8bit(void* p, const void* g, DType dt, uint8_t* qm, float* am, uint8_t* qv,
                              float* av, const float* cs, const float* cu, int64_t n,
                              const AdamWScalars& s, const unsigned long long* skip,
                              cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + kOptimBlock - 1) / kOptimBlock;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    adamw_8bit_kernel<T><<<unsigned(blocks), kThreads, 0, stream>>>(
        static_cast<T*>(p), static_cast<const T*>(g), qm, am, qv, av, cs, cu, n, s, skip);
  });
}

}  // namespace qlora_ext::cuda
