// CPU kernels for the 4-bit GEMMs (TORCH_LIBRARY_IMPL CPU): gemm_4bit and its input gradient.
//
// Neither ever holds the whole dequantized weight:
// - M <= kSmallM (decode, small batches) is memory-bound on the weight, so each task dequantizes
//   four rows of W into an L1-resident buffer and dots them with every row of A; the weight is
//   read exactly once. fp32 accumulation, one rounding to A's dtype at the end.
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
#include "simd.h"

namespace qlora_ext::cpu {
namespace {

// Where streaming the weight stops paying: measured on 2 AVX-512 cores, the panel GEMM wins
// from M = 32 on (see benchmarks/RESULTS.md, bench_matmul).
constexpr int64_t kSmallM = 16;
constexpr int kRows = 4;  // weight rows per streaming step

// acc[m * kRows + j] = dot(A[m, :], w[j, :]) for m < M, j < kRows. K is a multiple of 32.
void dot_rows_scalar(const float* A, int64_t M, int64_t K, const float* w, float* acc) {
  for (int64_t m = 0; m < M; ++m) {
    for (int j = 0; j < kRows; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += A[m * K + k] * w[j * K + k];
      acc[m * kRows + j] = s;
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
// Fused AVX-512 streaming kernel: one row of W at a time is decoded in registers (16 bytes =
// 32 codes per step: nibble split, byte interleave, 2 x permutexvar on the 16-entry table,
// times the block scale, which makes exactly the dequantized weight) and multiplied into MT
// fp32 accumulators, one per row of A. Nothing is written back but the MT results, so the
// weight is read once and the only other traffic is A, which stays in L1/L2.
// A: MT rows with leading dimension lda; the row of W and A are read over [0, len).
template <int MT>
QX_TARGET_AVX512 void gemv_row_avx512(const float* A, int64_t lda, int64_t len, const uint8_t* wrow,
                                      const float* scales, int64_t blocksize, const float* table,
                                      float* result) {
  constexpr int kAcc = MT <= 8 ? 2 : 1;  // two chains per row of A while registers allow
  __m512 acc[MT][kAcc];
  for (int m = 0; m < MT; ++m)
    for (int a = 0; a < kAcc; ++a) acc[m][a] = _mm512_setzero_ps();
  const __m512 tab = _mm512_loadu_ps(table);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t k0 = 0, blk = 0; k0 < len; k0 += blocksize, ++blk) {
    const __m512 vs = _mm512_set1_ps(scales[blk]);
    for (int64_t k = k0; k < k0 + blocksize; k += 32) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow + k / 2));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
      const __m128i lo = _mm_and_si128(b, low4);
      // Even elements sit in high nibbles: interleaving hi, lo restores element order.
      const __m512 w0 = _mm512_mul_ps(
          _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)), tab), vs);
      const __m512 w1 = _mm512_mul_ps(
          _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo)), tab), vs);
      for (int m = 0; m < MT; ++m) {
        const float* a = A + m * lda + k;
        acc[m][0] = _mm512_fmadd_ps(_mm512_loadu_ps(a), w0, acc[m][0]);
        acc[m][kAcc - 1] = _mm512_fmadd_ps(_mm512_loadu_ps(a + 16), w1, acc[m][kAcc - 1]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    __m512 v = acc[m][0];
    if constexpr (kAcc == 2) v = _mm512_add_ps(v, acc[m][1]);
    result[m] = _mm512_reduce_add_ps(v);
  }
}

using GemvRowFn = void (*)(const float*, int64_t, int64_t, const uint8_t*, const float*, int64_t,
                           const float*, float*);

// The compiled row counts: every M from 1 to 16, so the accumulators are exactly M registers.
GemvRowFn gemv_row_for(int64_t M) {
  switch (M) {
    // clang-format off: it cannot lay out a run of case-generating macros
#define QX_CASE(n) \
  case n:          \
    return &gemv_row_avx512<n>;
    QX_CASE(1) QX_CASE(2) QX_CASE(3) QX_CASE(4) QX_CASE(5) QX_CASE(6) QX_CASE(7) QX_CASE(8)
    QX_CASE(9) QX_CASE(10) QX_CASE(11) QX_CASE(12) QX_CASE(13) QX_CASE(14) QX_CASE(15)
    QX_CASE(16)
#undef QX_CASE
    default:
      return nullptr;
  }
  // clang-format on
}
#endif

struct Weight4 {
  const uint8_t* packed;
  AbsmaxSource src;
  int64_t N, K, blocksize;
  CodeTable code;
};

// Small M: stream W once. A32 is [M, K] fp32; out is [M, N] in T.
template <typename T>
void gemm_streaming(const float* A32, int64_t M, const Weight4& W, const float* bias, T* out) {
  const int64_t K = W.K, N = W.N, kblocks = K / W.blocksize;
  const Isa isa = current_isa();
#if QX_X86
  if (isa == Isa::Avx512) {
    const GemvRowFn row_fn = gemv_row_for(M);
    // One whole row of W per call. (Walking K in L1-sized chunks of A was tried and measured
    // slower at every M here: M = 16 went from 5.3 to 7.4 ms on 4096 x 4096.)
    at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) {
      std::vector<float> scales(kblocks), res(M);
      for (int64_t n = lo; n < hi; ++n) {
        for (int64_t b = 0; b < kblocks; ++b) scales[b] = block_scale(W.src, n * kblocks + b);
        row_fn(A32, K, K, W.packed + n * K / 2, scales.data(), W.blocksize, W.code.value,
               res.data());
        for (int64_t m = 0; m < M; ++m) {
          out[m * N + n] = from_f32<T>(res[m] + (bias ? bias[n] : 0.f));
        }
      }
    });
    return;
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

// Rows of W per panel: about 8 MB of dequantized weight, a multiple of 16 rows.
int64_t panel_rows(int64_t N, int64_t K, int64_t elem) {
  int64_t rows = ((int64_t(8) << 20) / (K * elem)) / 16 * 16;
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
  check_gemm_4bit_args(A, "A", K, packed, absmax, N, K, blocksize, nested_absmax, nested_code,
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
  const bool small = M > 0 && M <= kSmallM && acc == at::kFloat && path != GemmPath::Panel;
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
    const int64_t rows = panel_rows(N, K, sizeof(float));
    at::Tensor panel = at::empty({rows, K}, A32.options().dtype(at::kFloat));
    const std::optional<at::Tensor> b = bias ? std::optional(bias->to(acc)) : bias;
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t r = std::min(rows, N - n0);
      at::Tensor p = panel.narrow(0, 0, r);
      dequantize_panel(W, n0, r, p);
      if (acc == at::kDouble) p = p.to(acc);
      at::Tensor o = out32.narrow(1, n0, r);
      if (b) {
        at::addmm_out(o, b->narrow(0, n0, r), A32, p.t());
      } else {
        at::mm_out(o, A32, p.t());
      }
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
  at::Tensor grad_A = at::zeros({M, K}, grad_out.options().dtype(acc));
  if (M > 0) {
    // grad_A = sum over panels of G[:, panel] @ W[panel, :]: each panel is read once, and the
    // fp32 accumulator is rounded to grad_out's dtype once, at the end.
    const at::Tensor G32 = G.to(acc);
    const int64_t rows = panel_rows(N, K, sizeof(float));
    at::Tensor panel = at::empty({rows, K}, G32.options().dtype(at::kFloat));
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t r = std::min(rows, N - n0);
      at::Tensor p = panel.narrow(0, 0, r);
      dequantize_panel(W, n0, r, p);
      if (acc == at::kDouble) p = p.to(acc);
      grad_A.addmm_(G32.narrow(1, n0, r), p);
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
