// CPU kernels for the 4-bit GEMMs (TORCH_LIBRARY_IMPL CPU): gemm_4bit and its input gradient.
//
// Neither ever holds the whole dequantized weight:
// - Small M (decode, small batches) streams the weight once. On AVX-512 a fused kernel decodes
//   the codes in registers (Note [Nibble planes]); elsewhere each task dequantizes four rows
//   of W into an L1-resident buffer and dots them with every row of A. fp32 accumulation,
//   one rounding to A's dtype at the end.
// - Larger M is compute-bound: W is dequantized panel by panel (about 8 MB each, rows of W)
//   and each panel goes to at::mm / at::addmm (oneDNN/MKL), which runs at the dense GEMM's
//   speed; the dequantization is a few percent on top. Panels and accumulation are fp32 for
//   every input dtype: measured here, oneDNN's bf16 GEMM (AVX512-BF16, no AMX) was slower than
//   its fp32 one, and fp32 accumulation across panels keeps one rounding to bf16/fp16 at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../gemm_checks.h"
#include "../gemm_path.h"
#include "cpu_isa.h"
#include "dequant4.h"
#include "panel_blas.h"
#include "simd.h"

namespace qlora_ext::cpu {
namespace {

// Where streaming the weight stops paying, measured on 2 AVX-512 cores with 4096 x 4096:
// the fused kernel beats the panel GEMM up to M = 40 (0.59x / 0.84x / 0.99x dense at M = 16 /
// 32 / 40 against the panels' 0.77x / 0.85x / 1.09x) and loses at 48 (1.04x against 0.94x).
// Without AVX-512 the streaming paths win up to M = 4 (AVX2 forced on the same machine: the
// AVX2 planes 0.40x dense at M = 4, dequantized rows 0.82x, the panels 0.98x; at M = 5 the
// rows took 1.04x, at M = 8 0.84x against the panels' 0.71x).
constexpr int64_t kSmallM = 40;
constexpr int64_t kSmallMFallback = 4;
constexpr int kRows = 4;  // weight rows per streaming step

// acc[m * kRows + j] = dot(A[m, :], w[j, :]) for m < M, j < kRows. K is a multiple of 32.
// Sixteen interleaved partial sums, as the vector kernels keep: one running sum over K = 4096
// had 5x the rounding error of torch's own fp32 product.
void dot_rows_scalar(const float* A, int64_t M, int64_t K, const float* w, float* acc) {
  for (int64_t m = 0; m < M; ++m) {
    for (int j = 0; j < kRows; ++j) {
      float s[16] = {};
      for (int64_t k = 0; k < K; k += 16) {
        for (int l = 0; l < 16; ++l) s[l] += A[m * K + k + l] * w[j * K + k + l];
      }
      for (int h = 8; h > 0; h /= 2)
        for (int l = 0; l < h; ++l) s[l] += s[l + h];
      acc[m * kRows + j] = s[0];
    }
  }
}

#if QX_X86
QX_TARGET_AVX512 void dot_rows_avx512(const float* A, int64_t M, int64_t K, const float* w,
                                      float* acc) {
  for (int64_t m = 0; m < M; ++m) {
    const float* a = A + m * K;
    // Two accumulators per row (8 chains) hide the FMA latency.
    __m512 s[2 * kRows];
    for (auto& v : s) v = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      const __m512 a0 = _mm512_loadu_ps(a + k), a1 = _mm512_loadu_ps(a + k + 16);
      for (int j = 0; j < kRows; ++j) {
        s[2 * j] = _mm512_fmadd_ps(a0, _mm512_loadu_ps(w + j * K + k), s[2 * j]);
        s[2 * j + 1] = _mm512_fmadd_ps(a1, _mm512_loadu_ps(w + j * K + k + 16), s[2 * j + 1]);
      }
    }
    for (int j = 0; j < kRows; ++j) {
      acc[m * kRows + j] = _mm512_reduce_add_ps(_mm512_add_ps(s[2 * j], s[2 * j + 1]));
    }
  }
}

QX_TARGET_AVX2 inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

QX_TARGET_AVX2 void dot_rows_avx2(const float* A, int64_t M, int64_t K, const float* w,
                                  float* acc) {
  for (int64_t m = 0; m < M; ++m) {
    const float* a = A + m * K;
    __m256 s[2 * kRows];
    for (auto& v : s) v = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __m256 a0 = _mm256_loadu_ps(a + k), a1 = _mm256_loadu_ps(a + k + 8);
      for (int j = 0; j < kRows; ++j) {
        s[2 * j] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(w + j * K + k), s[2 * j]);
        s[2 * j + 1] = _mm256_fmadd_ps(a1, _mm256_loadu_ps(w + j * K + k + 8), s[2 * j + 1]);
      }
    }
    for (int j = 0; j < kRows; ++j) {
      acc[m * kRows + j] = hsum8(_mm256_add_ps(s[2 * j], s[2 * j + 1]));
    }
  }
}
#endif

void dot_rows(Isa isa, const float* A, int64_t M, int64_t K, const float* w, float* acc) {
#if QX_X86
  if (isa == Isa::Avx512) return dot_rows_avx512(A, M, K, w, acc);
  if (isa == Isa::Avx2) return dot_rows_avx2(A, M, K, w, acc);
#endif
  dot_rows_scalar(A, M, K, w, acc);
}

#if QX_X86
// Note [Nibble planes]: the fused AVX-512 small-M kernel decodes 128 codes per 64-byte load
// with one shift and one permute per 16 codes. vpermps reads only the low 4 bits of each
// 32-bit index lane, so with the 64 packed bytes viewed as 16 dwords, shifting right by 4t
// puts nibble t of every dword in its lane's index bits: the permute of the 16-entry code
// table *is* the decode, no unpacking. Nibble t of dword j holds element 8j + (t ^ 1) of the
// chunk (bytes are little-endian, the even element in each byte's high nibble), so A's rows
// are reordered once per call into the same "planes" (permute_rows) and every product is a
// plain lane-wise FMA. The earlier kernel (unpack, widen, permute: 3 shuffles per 16 codes)
// was bound by the one shuffle port at half the speed.
constexpr int64_t kChunk = 128;  // elements per 64-byte load
constexpr int64_t kPrefetchBytes = 4096;

// The planes of A chunk by chunk: Ap[(cM + m) 128 + 16t + j] = A[m, 128c + 8j + (t ^ 1)], zero
// past K. Within a chunk every row's operand sits at a fixed offset from one pointer, so the
// kernel's loads are base + constant: with rows a runtime stride apart GCC kept 16 x 8
// addresses as induction variables, spilled them, and the M = 16 kernel ran at 60% speed. A
// K tile of a group of g rows is g x 512 B per chunk, every chunk's part spread over the L1's
// 64 sets, so its <= 24 KB never puts more lines in one set than the 12 ways (rows a whole row
// apart had put all 16 rows' operands for a chunk in the same few sets).
// `chunk` is 128 (16 lanes) here and 64 (8 lanes) for the AVX2 kernel: lane j of plane t is
// element 8j + (t ^ 1) of its chunk either way.
void permute_rows(const float* A, int64_t M, int64_t K, float* Ap, int64_t chunk = kChunk) {
  const int64_t lanes = chunk / 8;
  for (int64_t c = 0; c < ceil_div(K, chunk); ++c) {
    for (int64_t m = 0; m < M; ++m) {
      float* dst = Ap + (c * M + m) * chunk;
      for (int t = 0; t < 8; ++t) {
        for (int j = 0; j < lanes; ++j) {
          const int64_t k = c * chunk + 8 * j + (t ^ 1);
          dst[lanes * t + j] = k < K ? A[m * K + k] : 0.0f;
        }
      }
    }
  }
}

// Lane j of a chunk belongs to block (128c + 8j) / blocksize; blocksizes are powers of two
// >= 32, so that is the chunk's first block plus (8j) >> bs_log2: the permute index that
// spreads a chunk's block scales over its lanes.
QX_TARGET_AVX512 inline __m512i lane_blocks(int bs_log2) {
  return _mm512_srlv_epi32(
      _mm512_slli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 3),
      _mm512_set1_epi32(bs_log2));
}

// The 64 packed bytes of the chunk starting at element k of a row of K. K is a whole number of
// >= 32-element blocks, so a short last chunk is whole dwords; its missing lanes read as code
// 0, which meets zero planes of A (or is never written back) and adds nothing.
// Note [Masked loads under ASan]: GCC's AddressSanitizer checks plain vector loads and stores
// but not masked loads (builtins, not memory references), so a mask too wide would read past
// the weight unseen; sanitizer builds also copy the bytes the mask covers, which ASan checks.
QX_TARGET_AVX512 inline __m512i load_chunk(const uint8_t* wrow, int64_t K, int64_t k) {
  const int64_t bytes = std::min<int64_t>(64, (K - k) / 2);
  const __mmask16 lanes = bytes == 64 ? __mmask16(0xFFFF) : __mmask16((1u << (bytes / 4)) - 1);
#if QX_ASAN
  uint8_t probe[64];
  std::memcpy(probe, wrow + k / 2, 4 * size_t(__builtin_popcount(lanes)));
  asm volatile("" : : "r"(probe) : "memory");  // the copy is otherwise dead
#endif
  return _mm512_maskz_loadu_epi32(lanes, wrow + k / 2);
}

// For MT rows of A (planes of chunks [c0, c1), chunks ldp apart: Ap[(c - c0) ldp + 128m + 16t
// + j]) and R rows of W over chunks [c0, c1):
// part[r * pstride + 16m ...+16) += the 16 lane sums of row r of W times row m of A, kept as
// vectors so a K tile costs two memory operations per output instead of a horizontal
// reduction (the caller sums the lanes once, at the end). wrow: the first row's packed bytes
// (rows wstride apart); scales: its block scales (rows sstride apart, each padded with 16
// zeros so one 16-float load serves every chunk); table: the 16 code values.
// One row of A (decode-bound) sums the unscaled codes' products per chunk and applies the
// block scales once per chunk. Several rows scale the decoded weights once and
// share them; up to 8 rows of A meet two rows of W, sharing each load of A (the loads, not
// the FMAs, were the limit with one), with one or two accumulators per product (two while FMA
// latency would show); 9 to 16 rows meet one row of W, which there has loads to spare.
template <int MT, int R>
QX_TARGET_AVX512 void rows_planes_avx512(const float* Ap, int64_t ldp, const uint8_t* wrow,
                                         int64_t wstride, int64_t K, int64_t c0, int64_t c1,
                                         const float* scales, int64_t sstride, int64_t blocksize,
                                         const float* table, float* part, int64_t pstride) {
  static_assert(MT == 1 || MT > 8 ? R == 1 : R <= 2, "at most 16 accumulators and 8 per row of W");
  constexpr int kAcc = MT <= 4 ? 2 : 1;
  const __m512 lut = _mm512_loadu_ps(table);
  const int bs_log2 = __builtin_ctzll(uint64_t(blocksize));  // not a 64-bit divide per chunk
  const __m512i lane_idx = lane_blocks(bs_log2);
  // Fully unrolled (the pragmas): acc is indexed by loop counters and must live in registers.
  __m512 acc[R][MT][kAcc];
#pragma GCC unroll 2
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      acc[r][m][0] = _mm512_load_ps(part + r * pstride + 16 * m);
#pragma GCC unroll 4
      for (int i = 1; i < kAcc; ++i) acc[r][m][i] = _mm512_setzero_ps();
    }
  }
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t k = c * kChunk;
    __m512i v[R];
    __m512 sv[R];
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) {
      v[r] = load_chunk(wrow + r * wstride, K, k);
      sv[r] =
          _mm512_permutexvar_ps(lane_idx, _mm512_loadu_ps(scales + r * sstride + (k >> bs_log2)));
    }
    const float* a = Ap + (c - c0) * ldp;
    if constexpr (MT == 1) {
      // Decoding takes ~13 cycles per 64-byte line, too slow for the hardware prefetcher to
      // stay a DRAM latency ahead: rotated past the L3 this kernel drew 11 GB/s, not the 29
      // of a dense GEMV. Rows are contiguous, so ahead is also the next row.
      _mm_prefetch(reinterpret_cast<const char*>(wrow + k / 2 + kPrefetchBytes), _MM_HINT_T0);
      // Two chains per chunk: each chunk's sums are independent of the last chunk's, so the
      // out-of-order core overlaps chunks and more chains would only add uops.
      __m512 s[2];
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) {
        const __m512 w = _mm512_permutexvar_ps(v[0], lut);
        const __m512 x = _mm512_load_ps(a + 16 * t);
        s[t % 2] = t < 2 ? _mm512_mul_ps(x, w) : _mm512_fmadd_ps(x, w, s[t % 2]);
        v[0] = _mm512_srli_epi32(v[0], 4);
      }
      const __m512 sum = _mm512_add_ps(s[0], s[1]);
      acc[0][0][c % kAcc] = _mm512_fmadd_ps(sum, sv[0], acc[0][0][c % kAcc]);
    } else {
      // The same line of the next K tile: this row's next visit (rows are K / 2 bytes apart,
      // so the hardware sees no stream). Past the row's end it is the next row, also needed.
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(
            reinterpret_cast<const char*>(wrow + r * wstride + (k + (c1 - c0) * kChunk) / 2),
            _MM_HINT_T0);
      }
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) {
        __m512 w[R];
#pragma GCC unroll 2
        for (int r = 0; r < R; ++r) {
          w[r] = _mm512_mul_ps(_mm512_permutexvar_ps(v[r], lut), sv[r]);
          v[r] = _mm512_srli_epi32(v[r], 4);
        }
#pragma GCC unroll 16
        for (int m = 0; m < MT; ++m) {
          const __m512 x = _mm512_load_ps(a + m * kChunk + 16 * t);
#pragma GCC unroll 2
          for (int r = 0; r < R; ++r) {
            acc[r][m][t % kAcc] = _mm512_fmadd_ps(x, w[r], acc[r][m][t % kAcc]);
          }
        }
      }
    }
  }
#pragma GCC unroll 2
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      __m512 sum = acc[r][m][0];
#pragma GCC unroll 4
      for (int i = 1; i < kAcc; ++i) sum = _mm512_add_ps(sum, acc[r][m][i]);
      _mm512_store_ps(part + r * pstride + 16 * m, sum);
    }
  }
}

// sums[i] = the 16 lanes of part[16i ...] added. A scalar loop was one 16-add dependency chain
// per output, 64 cycles of latency each: 19% of the time at M = 16 on one thread.
QX_TARGET_AVX512 void lane_sums(const float* part, int64_t count, float* sums) {
  for (int64_t i = 0; i < count; ++i) sums[i] = _mm512_reduce_add_ps(_mm512_load_ps(part + 16 * i));
}

using RowsPlanesFn = void (*)(const float*, int64_t, const uint8_t*, int64_t, int64_t, int64_t,
                              int64_t, const float*, int64_t, int64_t, const float*, float*,
                              int64_t);
constexpr int kMaxMT = 16;     // rows of A per kernel call: 16 accumulators, or 2 x 8
constexpr int kMaxMTPair = 8;  // the most rows of A that two rows of W share

// kernels[MT - 1][R - 1]: every group size from 1 to 16 is compiled, so the accumulators are
// exactly registers.
constexpr RowsPlanesFn kRowsPlanes[kMaxMT][2] = {
    {&rows_planes_avx512<1, 1>, nullptr},
    {&rows_planes_avx512<2, 1>, &rows_planes_avx512<2, 2>},
    {&rows_planes_avx512<3, 1>, &rows_planes_avx512<3, 2>},
    {&rows_planes_avx512<4, 1>, &rows_planes_avx512<4, 2>},
    {&rows_planes_avx512<5, 1>, &rows_planes_avx512<5, 2>},
    {&rows_planes_avx512<6, 1>, &rows_planes_avx512<6, 2>},
    {&rows_planes_avx512<7, 1>, &rows_planes_avx512<7, 2>},
    {&rows_planes_avx512<8, 1>, &rows_planes_avx512<8, 2>},
    {&rows_planes_avx512<9, 1>, nullptr},
    {&rows_planes_avx512<10, 1>, nullptr},
    {&rows_planes_avx512<11, 1>, nullptr},
    {&rows_planes_avx512<12, 1>, nullptr},
    {&rows_planes_avx512<13, 1>, nullptr},
    {&rows_planes_avx512<14, 1>, nullptr},
    {&rows_planes_avx512<15, 1>, nullptr},
    {&rows_planes_avx512<16, 1>, nullptr},
};

// Note [Fused input gradient]: grad_A = G @ dequant(W) for M <= kGradSmallM (the backward of
// small batches), the forward's decode in reverse: each row n of W is decoded chunk by chunk
// exactly as in rows_planes_avx512 and added, times G[m, n], into grad_A's rows kept in the
// same nibble-plane order. The sums stay in registers over a group of rows of W: for one chunk,
// MT rows of G by TP of its 8 planes (MT x TP <= 16 accumulators), one FMA per 16 weights and
// row of G with G[m, n] broadcast from memory; the 8 / TP passes over the planes reload the
// group's chunks from L1/L2. The panel path wrote and re-read 4 bytes per weight instead, and
// an earlier kernel kept the sums in memory, a load and a store per FMA (L2-bound past M = 4).
// Measured on 4096 x 4096 (bench_matmul's rotation): 0.31x / 0.26x / 0.38x / 0.53x dense at
// M = 1 / 4 / 8 / 16, against 0.33x / 0.34x for the in-memory sums at M = 1 / 4 and 1.1x for
// the panels at 8 and 16. Larger M runs in groups of up to 16 rows of G (kGradSmallM).
//
// For one chunk c and rows [0, rows) of W from wrow (wstride apart): total[m * lda + 16t + j]
// += sum over the rows n of gt[n * ldg + m] * w_n[16t + j], where w_n is row n's chunk decoded
// and times sv[16n ...] (its block scales spread over the lanes).
template <int MT>
QX_TARGET_AVX512 void grad_chunk_regs_avx512(const float* gt, int64_t ldg, int64_t rows,
                                             const uint8_t* wrow, int64_t wstride, int64_t K,
                                             int64_t k, const float* sv, const float* table,
                                             float* total, int64_t lda) {
  constexpr int TP = MT <= 2 ? 8 : MT <= 4 ? 4 : MT <= 8 ? 2 : 1;
  const __m512 lut = _mm512_loadu_ps(table);
  for (int t0 = 0; t0 < 8; t0 += TP) {
    const __m128i shift = _mm_cvtsi32_si128(4 * t0);
    __m512 acc[MT][TP];
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
#pragma GCC unroll 8
      for (int p = 0; p < TP; ++p) acc[m][p] = _mm512_setzero_ps();
    }
    for (int64_t n = 0; n < rows; ++n) {
      // The rows are 2 KB apart at K = 4096, a stride the hardware prefetcher does not follow:
      // the first pass fetches this chunk of the next group of rows.
      if (t0 == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(wrow + (n + rows) * wstride + k / 2),
                     _MM_HINT_T0);
      }
      __m512i v = _mm512_srl_epi32(load_chunk(wrow + n * wstride, K, k), shift);
      const __m512 s = _mm512_load_ps(sv + 16 * n);
      const float* g = gt + n * ldg;
#pragma GCC unroll 8
      for (int p = 0; p < TP; ++p) {
        const __m512 w = _mm512_mul_ps(_mm512_permutexvar_ps(v, lut), s);
        v = _mm512_srli_epi32(v, 4);
#pragma GCC unroll 16
        for (int m = 0; m < MT; ++m)
          acc[m][p] = _mm512_fmadd_ps(_mm512_set1_ps(g[m]), w, acc[m][p]);
      }
    }
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
#pragma GCC unroll 8
      for (int p = 0; p < TP; ++p) {
        float* dst = total + m * lda + 16 * (t0 + p);
        _mm512_store_ps(dst, _mm512_add_ps(_mm512_load_ps(dst), acc[m][p]));
      }
    }
  }
}

// sv[16n + j] = the block scale of lane j of chunk k in row n (row n's scales at
// scales + n * sstride, the first being block b0's).
QX_TARGET_AVX512 void spread_scales(const float* scales, int64_t sstride, int64_t rows, int64_t k,
                                    int64_t b0, int64_t blocksize, float* sv) {
  const int bs_log2 = __builtin_ctzll(uint64_t(blocksize));
  const __m512i lane_idx = lane_blocks(bs_log2);
  for (int64_t n = 0; n < rows; ++n) {
    const __m512 b = _mm512_loadu_ps(scales + n * sstride + (k >> bs_log2) - b0);
    _mm512_store_ps(sv + 16 * n, _mm512_permutexvar_ps(lane_idx, b));
  }
}

using GradChunkFn = void (*)(const float*, int64_t, int64_t, const uint8_t*, int64_t, int64_t,
                             int64_t, const float*, const float*, float*, int64_t);
constexpr int64_t kGradMaxMT = 16;  // rows of grad_out per kernel call
// Rows of grad_out, in groups of <= 16 that each decode W again; beyond, the panels. On
// 4096 x 4096: 0.81x / 0.94x / 1.08x dense at M = 32 / 48 / 64, the panels 1.1x / 1.14x / 1.14x.
constexpr int64_t kGradSmallM = 64;
constexpr GradChunkFn kGradChunk[kGradMaxMT] = {
    &grad_chunk_regs_avx512<1>,  &grad_chunk_regs_avx512<2>,  &grad_chunk_regs_avx512<3>,
    &grad_chunk_regs_avx512<4>,  &grad_chunk_regs_avx512<5>,  &grad_chunk_regs_avx512<6>,
    &grad_chunk_regs_avx512<7>,  &grad_chunk_regs_avx512<8>,  &grad_chunk_regs_avx512<9>,
    &grad_chunk_regs_avx512<10>, &grad_chunk_regs_avx512<11>, &grad_chunk_regs_avx512<12>,
    &grad_chunk_regs_avx512<13>, &grad_chunk_regs_avx512<14>, &grad_chunk_regs_avx512<15>,
    &grad_chunk_regs_avx512<16>};
#endif

struct Weight4 {
  const uint8_t* packed;
  AbsmaxSource src;
  int64_t N, K, blocksize;
  CodeTable code;
};

#if QX_X86
// Small M on AVX-512 (Note [Nibble planes]). Rows of W are taken in groups of kRowTile; for
// each group the K axis is walked in tiles whose planes of A fit in half the L1 (one row of A:
// the whole K up to 6144), so every load of A hits L1, and each group's block scales are
// computed once, before the tiles. A group of up to 8 rows of A meets two rows of W at a time;
// 9 to 16 rows meet one (16 accumulators, and each decoded weight feeds 16 FMAs where two
// groups of 8 decoded every weight twice: 0.59x dense at M = 16 against 0.62-0.72x). M > 16
// runs in groups of at most 16 rows, each decoding the tile's weights again (cheaper than
// spilling accumulators).
template <typename T>
void gemm_planes_avx512(const float* A32, int64_t M, const Weight4& W, const float* bias, T* out) {
  constexpr int64_t kRowTile = 16;
  const int64_t K = W.K, N = W.N, bs = W.blocksize, kblocks = K / bs;
  const int64_t chunks = ceil_div(K, kChunk);
  const int64_t groups = ceil_div(M, kMaxMT), mt0 = ceil_div(M, groups);
  // K tiles of A's planes: 24 KB, half the L1; a whole K of up to 40 KB in one tile (one
  // kernel call per row of W instead of two: 0.80x dense at M = 16 on 1536 x 576, not 0.88x).
  const int64_t whole = mt0 * chunks * kChunk * int64_t(sizeof(float));
  const int64_t tile =
      whole <= (40 << 10) ? chunks : std::max<int64_t>(1, (24 << 10) / (whole / chunks));
  const int64_t ldp = M * kChunk;
  // 64-byte aligned: every operand load is one whole cache line, never a split load.
  std::vector<float> Ap_buf(chunks * ldp + 16);
  float* Ap = Ap_buf.data() + (16 - (reinterpret_cast<uintptr_t>(Ap_buf.data()) / 4) % 16) % 16;
  permute_rows(A32, M, K, Ap);
  const int64_t sstride = kblocks + 16, pstride = M * 16;
  at::parallel_for(0, N, kRowTile, [&](int64_t lo, int64_t hi) {
    std::vector<float> part_buf(kRowTile * pstride + 16);
    float* part =
        part_buf.data() + (16 - (reinterpret_cast<uintptr_t>(part_buf.data()) / 4) % 16) % 16;
    std::vector<float> scales(kRowTile * sstride, 0.0f);  // the pads stay zero
    std::vector<float> sums(kRowTile * M);
    for (int64_t n0 = lo; n0 < hi; n0 += kRowTile) {
      const int64_t rows = std::min(kRowTile, hi - n0);
      for (int64_t r = 0; r < rows; ++r) {
        block_scales(W.src, (n0 + r) * kblocks, kblocks, scales.data() + r * sstride);
      }
      std::fill(part, part + rows * pstride, 0.0f);
      for (int64_t c0 = 0; c0 < chunks; c0 += tile) {
        const int64_t c1 = std::min(chunks, c0 + tile);
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t m0 = g * mt0, mt = std::min(mt0, M - m0);
          for (int64_t r = 0; r < rows;) {
            const int64_t R = (mt > 1 && mt <= kMaxMTPair && r + 1 < rows) ? 2 : 1;
            kRowsPlanes[mt - 1][R - 1](Ap + c0 * ldp + m0 * kChunk, ldp,
                                       W.packed + (n0 + r) * K / 2, K / 2, K, c0, c1,
                                       scales.data() + r * sstride, sstride, bs, W.code.value,
                                       part + r * pstride + m0 * 16, pstride);
            r += R;
          }
        }
      }
      lane_sums(part, rows * M, sums.data());
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t m = 0; m < M; ++m) {
          out[m * N + n0 + r] = from_f32<T>(sums[r * M + m] + (bias ? bias[n0 + r] : 0.f));
        }
      }
    }
  });
}
#endif

#if QX_X86
// grad_A [M, K] = G [M, N] @ dequant(W) for M <= kGradSmallM (Note [Fused input gradient]).
// Each thread owns a range of 128-element chunks of K and walks every row of W over it, so
// every weight byte is read once and no two threads write the same output. Rows are summed in
// groups of kRowGroup in registers and each group's sums added to the total: one running sum
// over N = 11008 rows would have several times the rounding error of torch's blocked GEMM.
// The M planes of a thread's range stay in L1/L2 (M x K / threads x 4 bytes). A K of fewer
// than 4 chunks per thread (SmolLM2's 576 is 4.5 chunks) would leave threads idle or uneven,
// so there the threads split the rows of W instead, each into its own total, added at the end.
template <typename T>
void grad_input_planes_avx512(const float* G32, int64_t M, const Weight4& W, T* out) {
  constexpr int64_t kRowGroup = 64;
  const int64_t K = W.K, N = W.N, bs = W.blocksize, kblocks = K / bs;
  const int64_t chunks = ceil_div(K, kChunk);
  std::vector<float> Gt(N * M);  // [n][m]: one row of W meets its M gradients in one line
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) Gt[n * M + m] = G32[m * N + n];
  const int64_t groups = ceil_div(M, kGradMaxMT), mt0 = ceil_div(M, groups);
  // total[m * lda + 128 (c - c0) + 16t + j] += the products of rows [r0, r1) of W, chunks
  // [c0, c1); lda a multiple of 16 plus one line (the rows' planes in different L1 sets).
  const auto accumulate = [&](int64_t c0, int64_t c1, int64_t r0, int64_t r1, float* total,
                              int64_t lda) {
    const int64_t b0 = (c0 * kChunk) / bs, b1 = std::min(kblocks, ceil_div(c1 * kChunk, bs));
    const int64_t sstride = (b1 - b0) + 16;
    std::vector<float> sv_buf(16 * kRowGroup + 16), scales(kRowGroup * sstride, 0.0f);
    float* sv = sv_buf.data() + (16 - (reinterpret_cast<uintptr_t>(sv_buf.data()) / 4) % 16) % 16;
    for (int64_t n0 = r0; n0 < r1; n0 += kRowGroup) {
      const int64_t n1 = std::min(r1, n0 + kRowGroup);
      for (int64_t n = n0; n < n1; ++n) {
        block_scales(W.src, n * kblocks + b0, b1 - b0, scales.data() + (n - n0) * sstride);
      }
      for (int64_t c = c0; c < c1; ++c) {
        spread_scales(scales.data(), sstride, n1 - n0, c * kChunk, b0, bs, sv);
        for (int64_t m0 = 0; m0 < M; m0 += mt0) {
          kGradChunk[std::min(mt0, M - m0) - 1](
              Gt.data() + n0 * M + m0, M, n1 - n0, W.packed + n0 * (K / 2), K / 2, K, c * kChunk,
              sv, W.code.value, total + m0 * lda + (c - c0) * kChunk, lda);
        }
      }
    }
  };
  // out[m, k] for chunks [c0, c1) = the sum of `parts` totals, back from planes to elements.
  const auto write_out = [&](int64_t c0, int64_t c1, const float* totals, int64_t parts,
                             int64_t part_stride, int64_t lda, int64_t cbase) {
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t c = c0; c < c1; ++c) {
        for (int t = 0; t < 8; ++t) {
          for (int j = 0; j < 16; ++j) {
            const int64_t k = c * kChunk + 8 * j + (t ^ 1);
            if (k >= K) continue;
            const int64_t i = m * lda + (c - cbase) * kChunk + 16 * t + j;
            float sum = totals[i];
            for (int64_t p = 1; p < parts; ++p) sum += totals[p * part_stride + i];
            out[m * K + k] = from_f32<T>(sum);
          }
        }
      }
    }
  };
  const auto aligned = [](std::vector<float>& v) {
    return v.data() + (16 - (reinterpret_cast<uintptr_t>(v.data()) / 4) % 16) % 16;
  };
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t row_parts = std::min(nt, ceil_div(N, kRowGroup));
  if (chunks >= 4 * nt || row_parts == 1) {
    const int64_t threads = std::min(nt, chunks);
    at::parallel_for(0, chunks, ceil_div(chunks, threads), [&](int64_t c0, int64_t c1) {
      const int64_t lda = (c1 - c0) * kChunk + 16;
      std::vector<float> buf(M * lda + 16, 0.0f);
      float* total = aligned(buf);
      accumulate(c0, c1, 0, N, total, lda);
      write_out(c0, c1, total, 1, 0, lda, c0);
    });
    return;
  }
  const int64_t lda = chunks * kChunk + 16, stride = M * lda;
  std::vector<float> buf(row_parts * stride + 16, 0.0f);
  float* totals = aligned(buf);
  const int64_t rows_per = ceil_div(ceil_div(N, row_parts), kRowGroup) * kRowGroup;
  at::parallel_for(0, row_parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r0 = std::min(N, p * rows_per), r1 = std::min(N, r0 + rows_per);
      if (r1 > r0) accumulate(0, chunks, r0, r1, totals + p * stride, lda);
    }
  });
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    write_out(c0, c1, totals, row_parts, stride, lda, 0);
  });
}
#endif

// Small M: stream W once. A32 is [M, K] fp32; out is [M, N] in T.
#if QX_X86
// Note [Nibble planes, AVX2]: the AVX-512 kernel's decode (Note [Nibble planes]) on 8 lanes,
// for M <= kPlanesAvx2M rows of A and blocksizes >= 64. A 32-byte load holds the 64 codes of
// one block-aligned chunk; nibble t of dword j is element 8j + (t ^ 1). vpermps reads 3 index
// bits, so the 16-entry table is two halves, picked per lane by the code's bit 3 (shifted to
// the sign bit for blendv). A chunk lies within one block, so the two halves are scaled once
// per chunk and the decoded weights come out scaled. Measured with AVX2 forced on the AVX-512
// machine, 4096 x 4096: 0.3x dense at M = 1 where dequantizing rows and dotting took 1.1x.
constexpr int64_t kChunk8 = 64;  // elements per 32-byte load
constexpr int64_t kPlanesAvx2M = 4;

// sums[m] = row m of A (planes Ap) times one row of W (packed bytes wrow, block scales
// `scales`, blocks of 64 << bs_shift), for MT rows. Two accumulators per row of A, each lane
// summing its own elements: 16 partial sums over K.
template <int MT>
QX_TARGET_AVX2 void row_planes_avx2(const float* Ap, const uint8_t* wrow, int64_t K,
                                    const float* scales, int bs_shift, const float* table,
                                    float* sums) {
  const __m256 tlo = _mm256_loadu_ps(table), thi = _mm256_loadu_ps(table + 8);
  __m256 acc[MT][2];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t c = 0; c < K / kChunk8; ++c) {
    _mm_prefetch(reinterpret_cast<const char*>(wrow + c * 32 + kPrefetchBytes), _MM_HINT_T0);
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + c * 32));
    const __m256 sc = _mm256_set1_ps(scales[c >> bs_shift]);
    const __m256 lo = _mm256_mul_ps(tlo, sc), hi = _mm256_mul_ps(thi, sc);
    const float* a = Ap + c * MT * kChunk8;
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) {
      const __m256 w =
          _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, v), _mm256_permutevar8x32_ps(hi, v),
                           _mm256_castsi256_ps(_mm256_slli_epi32(v, 28)));
#pragma GCC unroll 4
      for (int m = 0; m < MT; ++m) {
        acc[m][t % 2] = _mm256_fmadd_ps(_mm256_loadu_ps(a + m * kChunk8 + 8 * t), w, acc[m][t % 2]);
      }
      v = _mm256_srli_epi32(v, 4);
    }
  }
  for (int m = 0; m < MT; ++m) sums[m] = hsum8(_mm256_add_ps(acc[m][0], acc[m][1]));
}

using RowPlanesAvx2Fn = void (*)(const float*, const uint8_t*, int64_t, const float*, int,
                                 const float*, float*);
constexpr RowPlanesAvx2Fn kRowPlanesAvx2[kPlanesAvx2M] = {&row_planes_avx2<1>, &row_planes_avx2<2>,
                                                          &row_planes_avx2<3>, &row_planes_avx2<4>};

template <typename T>
void gemm_planes_avx2(const float* A32, int64_t M, const Weight4& W, const float* bias, T* out) {
  const int64_t K = W.K, N = W.N, kblocks = K / W.blocksize;
  const int bs_shift = __builtin_ctzll(uint64_t(W.blocksize)) - 6;
  std::vector<float> Ap(K * M);
  permute_rows(A32, M, K, Ap.data(), kChunk8);  // K is a whole number of these chunks
  const RowPlanesAvx2Fn fn = kRowPlanesAvx2[M - 1];
  at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) {
    std::vector<float> scales(kblocks);
    float sums[kPlanesAvx2M];
    for (int64_t n = lo; n < hi; ++n) {
      block_scales(W.src, n * kblocks, kblocks, scales.data());
      fn(Ap.data(), W.packed + n * (K / 2), K, scales.data(), bs_shift, W.code.value, sums);
      for (int64_t m = 0; m < M; ++m) {
        out[m * N + n] = from_f32<T>(sums[m] + (bias ? bias[n] : 0.f));
      }
    }
  });
}
#endif

template <typename T>
void gemm_streaming(const float* A32, int64_t M, const Weight4& W, const float* bias, T* out) {
  const int64_t K = W.K, N = W.N, kblocks = K / W.blocksize;
  const Isa isa = current_isa();
#if QX_X86
  if (isa == Isa::Avx512) return gemm_planes_avx512(A32, M, W, bias, out);
  if (isa == Isa::Avx2 && M <= kPlanesAvx2M && W.blocksize >= kChunk8) {
    return gemm_planes_avx2(A32, M, W, bias, out);
  }
#endif
  at::parallel_for(0, ceil_div(N, kRows), 8, [&](int64_t lo, int64_t hi) {
    std::vector<float> w(kRows * K, 0.f), acc(M * kRows);
    for (int64_t g = lo; g < hi; ++g) {
      const int64_t n0 = g * kRows, nr = std::min<int64_t>(kRows, N - n0);
      if (nr < kRows) std::fill(w.begin(), w.end(), 0.f);
      dequantize_blocks(W.packed, W.src, n0 * kblocks, (n0 + nr) * kblocks, N * K, W.blocksize,
                        W.code.value, isa, w.data());
      dot_rows(isa, A32, M, K, w.data(), acc.data());
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t j = 0; j < nr; ++j) {
          float v = acc[m * kRows + j] + (bias ? bias[n0 + j] : 0.f);
          out[m * N + n0 + j] = from_f32<T>(v);
        }
      }
    }
  });
}

// Rows of W per panel: about `bytes` of dequantized weight, a multiple of 16 rows.
int64_t panel_rows(int64_t N, int64_t K, int64_t elem, int64_t bytes) {
  int64_t rows = (bytes / (K * elem)) / 16 * 16;
  return std::max<int64_t>(16, std::min(rows, N));
}

// Dequantize rows [n0, n0 + rows) of W into panel (a [rows, K] tensor of A's dtype).
void dequantize_panel(const Weight4& W, int64_t n0, int64_t rows, at::Tensor& panel) {
  const int64_t kblocks = W.K / W.blocksize;
  const Isa isa = current_isa();
  dispatch_float(panel.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    T* dst = panel.data_ptr<T>();
    at::parallel_for(n0 * kblocks, (n0 + rows) * kblocks, 64, [&](int64_t lo, int64_t hi) {
      dequantize_blocks(W.packed, W.src, lo, hi, W.N * W.K, W.blocksize, W.code.value, isa,
                        dst + (lo - n0 * kblocks) * W.blocksize);
    });
  });
}

Weight4 make_weight(const at::Tensor& packed, const AbsmaxSource& src, int64_t N, int64_t K,
                    int64_t blocksize, QuantType qt) {
  return Weight4{packed.const_data_ptr<uint8_t>(), src, N, K, blocksize, code_table(qt)};
}

struct Contig {  // keeps the contiguous copies alive while raw pointers into them are used
  at::Tensor packed, absmax;
  std::optional<at::Tensor> na, nc, no;
  Contig(const at::Tensor& p, const at::Tensor& a, const std::optional<at::Tensor>& na_,
         const std::optional<at::Tensor>& nc_, const std::optional<at::Tensor>& no_)
      : packed(p.contiguous()), absmax(a.contiguous()) {
    if (na_) na = na_->contiguous();
    if (nc_) nc = nc_->contiguous();
    if (no_) no = no_->contiguous();
  }
};

at::Tensor gemm_4bit_cpu(const at::Tensor& A, const at::Tensor& packed, const at::Tensor& absmax,
                         int64_t N, int64_t K, int64_t blocksize, c10::string_view quant_type,
                         const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& nested_absmax,
                         const std::optional<at::Tensor>& nested_code,
                         const std::optional<at::Tensor>& nested_offset, int64_t nested_blocksize) {
  const QuantType qt = parse_quant_type(std::string(quant_type));
  check_gemm_4bit_args(A, "x", K, packed, absmax, N, K, blocksize, nested_absmax, nested_code,
                       nested_offset, nested_blocksize);
  check_bias(bias, A, N);
  const Contig c(packed, absmax, nested_absmax, nested_code, nested_offset);
  const Weight4 W = make_weight(
      c.packed, absmax_source(c.absmax, c.na, c.nc, c.no, nested_blocksize), N, K, blocksize, qt);
  const at::Tensor A2 = A.reshape({-1, K}).contiguous();
  const int64_t M = A2.size(0);
  at::Tensor out = at::empty({M, N}, A.options());
  // Panels compute in fp32 (fp64 for fp64 inputs); see the note at the top.
  const at::ScalarType acc = A.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const GemmPath path = gemm_path();
  const int64_t small_m = current_isa() == Isa::Avx512 ? kSmallM : kSmallMFallback;
  const bool small = M > 0 && M <= small_m && acc == at::kFloat && path != GemmPath::Panel;
  if (small) {
    const at::Tensor A32 = A2.to(at::kFloat).contiguous();
    std::optional<at::Tensor> b32;
    if (bias) b32 = bias->to(at::kFloat).contiguous();
    dispatch_float(A.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      gemm_streaming<T>(A32.const_data_ptr<float>(), M, W,
                        b32 ? b32->const_data_ptr<float>() : nullptr, out.data_ptr<T>());
    });
  } else if (M > 0) {
    const at::Tensor A32 = A2.to(acc);
    at::Tensor out32 = A.scalar_type() == acc ? out : at::empty({M, N}, A32.options());
    // 8 MB: at M = 512 on 4096 x 4096, 2 / 4 / 16 / 32 MB took 1.20x / 1.10x / 1.08x / 1.16x
    // dense against 1.07x.
    const int64_t rows = panel_rows(N, K, sizeof(float), int64_t(8) << 20);
    at::Tensor panel = at::empty({rows, K}, A32.options().dtype(at::kFloat));
    const std::optional<at::Tensor> b = bias ? std::optional(bias->to(acc)) : bias;
    // Below M = 64 each panel computes out[:, panel]^T = panel @ A^T into a small buffer and
    // copies it back transposed: oneDNN takes A @ panel^T at M = 16 / 32 very slowly (10.9 /
    // 12.0 ms on 4096 x 4096, against 4.2 / 5.8 ms this way and 5.3 / 6.8 ms for the dense
    // F.linear). From M = 64 the two are even on 4096 x 4096, and the transposed form lost at
    // M = 512 on 1536 x 576 (1.31x dense against 1.04x), so there A @ panel^T writes into out.
    const bool transposed = M < 64;
    const bool onednn = !transposed && acc == at::kFloat && panel_blas() == PanelBlas::OneDnn;
    at::Tensor tmp = transposed ? at::empty({rows, M}, A32.options()) : at::Tensor();
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t r = std::min(rows, N - n0);
      at::Tensor p = panel.narrow(0, 0, r);
      dequantize_panel(W, n0, r, p);
      if (acc == at::kDouble) p = p.to(acc);
      at::Tensor o = out32.narrow(1, n0, r);
      if (onednn) {  // Note [Panel BLAS]
        const at::Tensor y = onednn_linear(A32, p, b ? std::optional(b->narrow(0, n0, r)) : b);
        if (r == N && out32.is_same(out)) {
          out = out32 = y;  // one panel: oneDNN's result is the output
        } else {
          o.copy_(y);
        }
        continue;
      }
      // transposed: t = p @ A^T [r, M] (bias per row of t); else o = A @ p^T (bias per column)
      at::Tensor t = transposed ? tmp.narrow(0, 0, r) : o;
      const at::Tensor lhs = transposed ? p : A32, rhs = transposed ? A32.t() : p.t();
      if (b) {
        const at::Tensor bn = b->narrow(0, n0, r);
        at::addmm_out(t, transposed ? bn.unsqueeze(1) : bn, lhs, rhs);
      } else {
        at::mm_out(t, lhs, rhs);
      }
      if (transposed) o.copy_(t.t());
    }
    if (!out32.is_same(out)) out.copy_(out32);
  }
  return out.view(gemm_out_shape(A, N));
}

at::Tensor gemm_4bit_grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& packed,
                                    const at::Tensor& absmax, int64_t N, int64_t K,
                                    int64_t blocksize, c10::string_view quant_type,
                                    const std::optional<at::Tensor>& nested_absmax,
                                    const std::optional<at::Tensor>& nested_code,
                                    const std::optional<at::Tensor>& nested_offset,
                                    int64_t nested_blocksize) {
  const QuantType qt = parse_quant_type(std::string(quant_type));
  check_gemm_4bit_args(grad_out, "grad_out", N, packed, absmax, N, K, blocksize, nested_absmax,
                       nested_code, nested_offset, nested_blocksize);
  const Contig c(packed, absmax, nested_absmax, nested_code, nested_offset);
  const Weight4 W = make_weight(
      c.packed, absmax_source(c.absmax, c.na, c.nc, c.no, nested_blocksize), N, K, blocksize, qt);
  const at::Tensor G = grad_out.reshape({-1, N}).contiguous();
  const int64_t M = G.size(0);
  const at::ScalarType acc = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
#if QX_X86
  if (M > 0 && M <= kGradSmallM && acc == at::kFloat && current_isa() == Isa::Avx512 &&
      gemm_path() != GemmPath::Panel) {
    const at::Tensor G32 = G.to(at::kFloat).contiguous();
    at::Tensor grad_A = at::empty({M, K}, grad_out.options());
    dispatch_float(grad_out.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      grad_input_planes_avx512<T>(G32.const_data_ptr<float>(), M, W, grad_A.data_ptr<T>());
    });
    return grad_A.view(gemm_out_shape(grad_out, K));
  }
#endif
  at::Tensor grad_A;
  if (M == 0 || N == 0) {  // an empty sum over N: zeros
    grad_A = at::zeros({M, K}, grad_out.options().dtype(acc));
  } else {
    // grad_A = sum over panels of G[:, panel] @ W[panel, :]: each panel is read once, and the
    // fp32 accumulator is rounded to grad_out's dtype once, at the end. (Panels of whole
    // blocks of columns, each finished in one GEMM and written once, measured 4% slower at
    // M = 512 on 4096 x 4096: the strided per-row dequantization cost more than the
    // accumulator's traffic, which stays in the L3.)
    const at::Tensor G32 = G.to(acc);
    // At most 8 MB and 256 rows. Each panel's product is summed into all of grad_A, so panels
    // too short re-read it too often (4096 x 11008 at M = 512: 80-row 4 MB panels took 1.12x
    // dense, 176-row 8 MB ones 0.95-0.98x), and 512-row 8 MB panels at K = 4096 took 1.04-1.08x
    // against 256-row ones' 1.00-1.05x (three runs each; the spread is this machine's noise).
    // A weight that fits in one panel is one GEMM: no partial sums to re-read at all.
    const int64_t panel_bytes = int64_t(8) << 20;
    const int64_t rows = N * K * int64_t(sizeof(float)) <= panel_bytes
                             ? N
                             : std::min<int64_t>(256, panel_rows(N, K, sizeof(float), panel_bytes));
    at::Tensor panel = at::empty({rows, K}, G32.options().dtype(at::kFloat));
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t r = std::min(rows, N - n0);
      at::Tensor p = panel.narrow(0, 0, r);
      dequantize_panel(W, n0, r, p);
      if (acc == at::kDouble) p = p.to(acc);
      // The first panel writes grad_A (beta = 0), so it is never zero-filled first.
      const at::Tensor g = G32.narrow(1, n0, r);
      if (acc == at::kFloat && panel_blas() == PanelBlas::OneDnn) {  // Note [Panel BLAS]
        const at::Tensor part = onednn_linear(g, p.t(), std::nullopt);
        grad_A = n0 == 0 ? part : grad_A.add_(part);
      } else if (n0 == 0) {
        grad_A = at::mm(g, p);
      } else {
        grad_A.addmm_(g, p);
      }
    }
  }
  return grad_A.to(grad_out.scalar_type()).view(gemm_out_shape(grad_out, K));
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CPU, m) {
  m.impl("gemm_4bit", &gemm_4bit_cpu);
  m.impl("gemm_4bit_grad_input", &gemm_4bit_grad_input_cpu);
}

}  // namespace qlora_ext::cpu
