// CUDA kernels for 4-bit and 8-bit blockwise quantization.
//
// Memory-bound: each byte is read once and written once, so the design goal is full-width,
// coalesced accesses. A thread owns 8 consecutive elements: 32 B (fp32) or 16 B (fp16/bf16) of
// input, 4 B of packed output. Every allowed blocksize is a multiple of 8, so a thread's
// elements always share one absmax. Rounding follows Note [Bit-exact rounding] (codes.h), so
// the GPU produces the same bytes as the CPU kernels and bitsandbytes' CPU path.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "device_utils.cuh"
#include "quant_launchers.h"

namespace qlora_ext::cuda {
namespace {

constexpr int kElemsPerThread = 8;

// Register budget: these kernels hold 8 inputs and a few scalars; 256 threads x 64 registers
// keeps 8 blocks resident per SM. Checked by scripts/check_cuda_build.py.
constexpr int kThreads = 256;

// Load 8 elements as 16-byte vectors when they are all in range and aligned, else one by one.
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ x, int64_t i, int64_t n, bool vec,
                                      float (&v)[kElemsPerThread]) {
  if (vec && i + kElemsPerThread <= n) {
    constexpr int kPerVec = 16 / sizeof(T);
#pragma unroll
    for (int k = 0; k < kElemsPerThread; k += kPerVec) {
      uint4 raw = __ldg(reinterpret_cast<const uint4*>(x + i + k));
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < kPerVec; ++j) v[k + j] = to_f32(e[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kElemsPerThread; ++j) v[j] = (i + j < n) ? to_f32(x[i + j]) : 0.0f;
  }
}

// max that keeps NaN sticky, so a NaN anywhere in a block makes its absmax NaN (and the host
// raises); fmaxf would silently drop it.
__device__ __forceinline__ float nan_max(float a, float b) {
  return (a != a) ? a : ((b != b) ? b : fmaxf(a, b));
}

// ---------------------------------------------------------------- 4-bit quantize
// Threads per quant block = blocksize / 8 (4 .. 512). Up to 32 they reduce with shuffles inside
// a warp; beyond, each warp reduces and the warps of one quant block combine through shared
// memory. The CUDA block has max(256, blocksize / 8) threads, so a quant block never spans two.
// @kernel-budget quantize_4bit_kernel: regs<=64 stack<=0 sass=LDG.E.128 (memory-bound: 64
// registers keep 1024 threads per SM resident; the input must arrive in 16-byte loads)
template <typename T>
__global__ void __launch_bounds__(512)
    quantize_4bit_kernel(const T* __restrict__ x, int64_t n, int blocksize, CodeTable c, Bounds b,
                         bool vec, uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  __shared__ float warp_max[16];
  __shared__ float s_value[16], s_mid[15];
  __shared__ uint8_t s_sorted[16];
  load_code_table(c, s_value, s_sorted);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < 15; ++i) s_mid[i] = b.mid[i];
  }
  __syncthreads();
  const int tpb = blocksize / kElemsPerThread;  // threads per quant block
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t i = t * kElemsPerThread;
  float v[kElemsPerThread];
  load8(x, i, n, vec, v);

  float m = 0.0f;
#pragma unroll
  for (int j = 0; j < kElemsPerThread; ++j) m = nan_max(m, fabsf(v[j]));
  const int width = tpb < 32 ? tpb : 32;
  for (int off = width / 2; off > 0; off >>= 1)
    m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, off));
  if (tpb > 32) {
    const int warp = threadIdx.x / 32, warps_per_qb = tpb / 32;
    if ((threadIdx.x & 31) == 0) warp_max[warp] = m;
    __syncthreads();
    const int first = (warp / warps_per_qb) * warps_per_qb;
    m = warp_max[first];
    for (int w = 1; w < warps_per_qb; ++w) m = nan_max(m, warp_max[first + w]);
  }
  if (i >= n) return;  // after the barrier: whole warps past the end still took part in it

  const int64_t qb = i / blocksize;
  const bool full = (qb + 1) * blocksize <= n;
  if (!full) m = safe_absmax(m);
  if (i % blocksize == 0) absmax[qb] = m;
  const float inv = div_rn(1.0f, safe_absmax(m));
  uint8_t q[kElemsPerThread];
#pragma unroll
  for (int j = 0; j < kElemsPerThread; ++j) {
    const float s = (i + j < n) ? clamp_unit(full ? mul_rn(v[j], inv) : div_rn(v[j], m)) : 0.0f;
    q[j] = quantize_scaled(s, s_mid, s_sorted);
  }
  uint32_t word = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) word |= uint32_t((q[2 * j] << 4) | q[2 * j + 1]) << (8 * j);
  if (i + kElemsPerThread <= n) {
    *reinterpret_cast<uint32_t*>(packed + i / 2) = word;  // i / 2 is a multiple of 4
  } else {
    for (int j = 0; j < 4 && i + 2 * j < n; ++j) packed[i / 2 + j] = uint8_t(word >> (8 * j));
  }
}

// ---------------------------------------------------------------- 4-bit dequantize
// A thread decodes 32 codes from one 16-byte load (evict-first: the weight is read once). Its
// 32 outputs are contiguous, so storing them straight from registers would make each warp store
// instruction touch 32 scattered 16-byte pieces; instead the warp stages its 1024 outputs in
// shared memory and writes them back as consecutive 16-byte vectors, fully coalesced.
constexpr int kCodes = 32;  // per thread; every blocksize and panel width is a multiple of 32

template <typename T>
struct Stage {
  // Row pitch per lane, padded so 16-byte accesses of 8 consecutive lanes hit distinct banks.
  static constexpr int kPitch = kCodes + 16 / int(sizeof(T));
};

// @kernel-budget dequantize_4bit_kernel: regs<=64 stack<=0 sass=LDG.E.128 (memory-bound, as
// above; the packed weight must arrive in 16-byte loads)
template <typename T>
__global__ void __launch_bounds__(kThreads)
    dequantize_4bit_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                           NestedAbsmax nested, Slice slice, int blocksize, CodeTable c,
                           bool vec_in, T* __restrict__ out) {
  constexpr int kPitch = Stage<T>::kPitch, kPerVec = 16 / int(sizeof(T));
  __shared__ __align__(16) T stage[kThreads * kPitch];
  __shared__ float table[16];
  __shared__ uint8_t unused_sorted[16];
  load_code_table(c, table, unused_sorted);
  __syncthreads();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t n = slice.rows * slice.cols;
  const int64_t warp_base = (int64_t(blockIdx.x) * blockDim.x + warp * 32) * kCodes;
  if (warp_base >= n) return;  // whole warp past the end (no block-wide barrier follows)
  const int64_t i = warp_base + int64_t(lane) * kCodes;
  T* my = stage + threadIdx.x * kPitch;
  if (i < n) {
    // The 32 elements sit in one row of the slice (cols is a multiple of 32 unless the slice is
    // a single row) and in one quant block (blocksize and col0 are multiples of 32).
    const int64_t r = i / slice.cols;
    const int64_t e = (slice.row0 + r) * slice.ld + slice.col0 + (i - r * slice.cols);
    const int64_t qb = e / blocksize;
    const float scale =
        nested.codes ? nested_absmax(__ldg(nested.code + nested.codes[qb]),
                                     __ldg(nested.absmax + qb / nested.blocksize), *nested.offset)
                     : __ldg(absmax + qb);
    const bool whole = i - r * slice.cols + kCodes <= slice.cols && i + kCodes <= n;
    if (vec_in && whole) {
      const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(packed + e / 2));
      const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t byte = (words[w] >> (8 * j)) & 0xFF;
          my[8 * w + 2 * j] = from_f32<T>(mul_rn(table[byte >> 4], scale));
          my[8 * w + 2 * j + 1] = from_f32<T>(mul_rn(table[byte & 0xF], scale));
        }
      }
    } else {
      for (int j = 0; j < kCodes && i + j < n; ++j) {
        const int64_t ej = e + j;
        const uint8_t byte = packed[ej / 2];
        my[j] = from_f32<T>(mul_rn(table[(ej % 2 == 0) ? (byte >> 4) : (byte & 0xF)], scale));
      }
    }
  }
  __syncwarp();
  // Write the warp's 1024 contiguous outputs back as 16-byte vectors, lane-consecutive.
  const T* wstage = stage + warp * 32 * kPitch;
  for (int off = lane * kPerVec; off < 32 * kCodes; off += 32 * kPerVec) {
    const int64_t o = warp_base + off;
    if (o >= n) break;
    const T* src = wstage + (off / kCodes) * kPitch + off % kCodes;
    if (o + kPerVec <= n) {
      *reinterpret_cast<uint4*>(out + o) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int j = 0; o + j < n; ++j) out[o + j] = src[j];
    }
  }
}

// ---------------------------------------------------------------- 8-bit blockwise
// Used for the nested absmax (small): one CUDA block per quant block, threads striding over it,
// and blocks striding over the quant blocks past the grid (a blocksize of 1 over 2^31 values
// is more quant blocks than a grid may have).
// @kernel-budget quantize_8bit_kernel: regs<=32 stack<=0 (small inputs: the nested absmax)
template <typename T>
__global__ void __launch_bounds__(kThreads)
    quantize_8bit_kernel(const T* __restrict__ x, int64_t n, int64_t blocksize, int64_t nblocks,
                         const float* __restrict__ code, uint8_t* __restrict__ q,
                         float* __restrict__ absmax) {
  __shared__ float s_code[256];
  __shared__ float s_red[kThreads / 32];
  for (int k = threadIdx.x; k < 256; k += blockDim.x) s_code[k] = code[k];
  for (int64_t qb = blockIdx.x; qb < nblocks; qb += gridDim.x) {
    const int64_t start = qb * blocksize;
    const int64_t end = min(n, start + blocksize);
    float m = 0.0f;
    for (int64_t k = start + threadIdx.x; k < end; k += blockDim.x)
      m = nan_max(m, fabsf(to_f32(x[k])));
    for (int off = 16; off > 0; off >>= 1) m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, off));
    if ((threadIdx.x & 31) == 0) s_red[threadIdx.x / 32] = m;
    __syncthreads();  // also publishes s_code, on the first pass
    m = s_red[0];
    for (int w = 1; w < kThreads / 32; ++w) m = nan_max(m, s_red[w]);
    __syncthreads();  // s_red is read before the next quant block writes it
    if (threadIdx.x == 0) absmax[qb] = m;
    const float inv = m == 0.0f ? 0.0f : div_rn(1.0f, m);
    const bool tiny = isinf(inv);  // Note [Tiny 8-bit blocks] (cpp/cpu/quant_cpu.cpp)
    for (int64_t k = start + threadIdx.x; k < end; k += blockDim.x) {
      // bitsandbytes stores code 0 for an all-zero block.
      const float v = to_f32(x[k]);
      q[k] = m == 0.0f ? 0 : quantize_8bit_scaled(s_code, tiny ? div_rn(v, m) : mul_rn(v, inv));
    }
  }
}

// @kernel-budget dequantize_8bit_kernel: regs<=32 stack<=0 (elementwise)
template <typename T>
__global__ void __launch_bounds__(kThreads)
    dequantize_8bit_kernel(const uint8_t* __restrict__ q, const float* __restrict__ absmax,
                           const float* __restrict__ code, int64_t n, int64_t blocksize,
                           T* __restrict__ out) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    out[k] = from_f32<T>(mul_rn(__ldg(code + q[k]), __ldg(absmax + k / blocksize)));
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

cudaError_t launch_quantize_4bit(const void* x, DType dt, int64_t n, int64_t blocksize,
                                 QuantType qt, uint8_t* packed, float* absmax,
                                 cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const CodeTable c = code_table(qt);
  const Bounds b = sorted_midpoints(c);
  const int threads =
      blocksize / kElemsPerThread > kThreads ? int(blocksize / kElemsPerThread) : kThreads;
  const int64_t groups = (n + kElemsPerThread - 1) / kElemsPerThread;
  const unsigned grid = unsigned((groups + threads - 1) / threads);
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    quantize_4bit_kernel<T><<<grid, threads, 0, stream>>>(
        static_cast<const T*>(x), n, int(blocksize), c, b, aligned16(x), packed, absmax);
  });
}

cudaError_t launch_dequantize_4bit(const uint8_t* packed, const float* absmax,
                                   const NestedAbsmax& nested, const Slice& slice,
                                   int64_t blocksize, QuantType qt, void* out, DType dt,
                                   cudaStream_t stream) {
  const int64_t n = slice.rows * slice.cols;
  if (n == 0) return cudaSuccess;
  const CodeTable c = code_table(qt);
  const int64_t groups = (n + kCodes - 1) / kCodes;
  const unsigned grid = unsigned((groups + kThreads - 1) / kThreads);
  // out is a fresh allocation or panel (16-byte aligned); packed may sit at any byte offset.
  const bool vec_in = (reinterpret_cast<uintptr_t>(packed) & 15) == 0;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    dequantize_4bit_kernel<T><<<grid, kThreads, 0, stream>>>(
        packed, absmax, nested, slice, int(blocksize), c, vec_in, static_cast<T*>(out));
  });
}

cudaError_t launch_quantize_blockwise_8bit(const void* x, DType dt, int64_t n, int64_t blocksize,
                                           const float* code, uint8_t* q, float* absmax,
                                           cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t nblocks = ceil_div(n, blocksize);  // n + blocksize - 1 may overflow
  const unsigned grid = unsigned(nblocks < 65536 ? nblocks : 65536);  // block-stride beyond
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    quantize_8bit_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), n, blocksize,
                                                           nblocks, code, q, absmax);
  });
}

cudaError_t launch_dequantize_blockwise_8bit(const uint8_t* q, const float* absmax,
                                             const float* code, int64_t n, int64_t blocksize,
                                             void* out, DType dt, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t want = (n + kThreads - 1) / kThreads;
  const unsigned grid = unsigned(want < 65536 ? want : 65536);  // grid-stride beyond that
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    dequantize_8bit_kernel<T>
        <<<grid, kThreads, 0, stream>>>(q, absmax, code, n, blocksize, static_cast<T*>(out));
  });
}

}  // namespace qlora_ext::cuda
