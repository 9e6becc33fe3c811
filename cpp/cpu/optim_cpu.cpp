// CPU kernels of the fused AdamW ops (TORCH_LIBRARY_IMPL CPU). The per-element maths is in
// optim_math.h (Note [AdamW order]), shared with the CUDA kernels.
//
// Both ops first count the non-finite gradient elements; if there is any, the whole tensor is
// skipped (param and states untouched) and the count is returned, so a NaN/Inf never reaches
// the state. Work is split with at::parallel_for: by elements for the 32-bit op, by 256-element
// quantization blocks for the 8-bit op (a block's absmax needs all of its elements).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>

#include "../optim_checks.h"
#include "../optim_math.h"
#include "cpu_isa.h"
#include "dequant4.h"
#include "simd.h"

namespace qlora_ext::cpu {
namespace {

constexpr int64_t kGrain = 32768;  // elements per task: amortises the task overhead

template <typename T>
int64_t count_nonfinite(const T* g, int64_t n) {
  return at::parallel_reduce(
      0, n, kGrain, int64_t(0),
      [&](int64_t lo, int64_t hi, int64_t acc) {
        for (int64_t i = lo; i < hi; ++i) acc += is_finite(to_f32(g[i])) ? 0 : 1;
        return acc;
      },
      [](int64_t a, int64_t b) { return a + b; });
}

template <typename T>
void adamw_32bit_scalar(T* p, const T* g, float* m, float* v, int64_t lo, int64_t hi,
                        const AdamWScalars& s) {
  for (int64_t i = lo; i < hi; ++i) {
    float pi = to_f32(p[i]);
    adamw_element(pi, to_f32(g[i]), m[i], v[i], s);
    p[i] = from_f32<T>(pi);
  }
}

#if QX_X86
// adamw_element on 16 / 8 lanes: the same operations in the same order, each correctly rounded
// (FMA where adamw_element has fma_rn), so every ISA gives the scalar loop's bits.
template <typename T>
QX_TARGET_AVX512 void adamw_32bit_avx512(T* p, const T* g, float* m, float* v, int64_t lo,
                                         int64_t hi, const AdamWScalars& s) {
  const bool small = (s.weight < 0.0f ? -s.weight : s.weight) < 0.5f;
  const __m512 decay = _mm512_set1_ps(s.decay), beta2 = _mm512_set1_ps(s.beta2);
  const __m512 w = _mm512_set1_ps(small ? s.weight : s.weight - 1.0f);
  const __m512 omb2 = _mm512_set1_ps(s.one_minus_beta2), bc2 = _mm512_set1_ps(s.bc2_sqrt);
  const __m512 nss = _mm512_set1_ps(s.neg_step_size), eps = _mm512_set1_ps(s.eps);
  int64_t i = lo;
  for (; i + 16 <= hi; i += 16) {
    const __m512 G = load16(g + i);
    __m512 M = _mm512_loadu_ps(m + i), V = _mm512_loadu_ps(v + i);
    const __m512 P = _mm512_mul_ps(load16(p + i), decay);
    M = _mm512_fmadd_ps(w, _mm512_sub_ps(G, M), small ? M : G);
    V = _mm512_fmadd_ps(_mm512_mul_ps(omb2, G), G, _mm512_mul_ps(V, beta2));
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(V), bc2), eps);
    store16(p + i, _mm512_add_ps(P, _mm512_div_ps(_mm512_mul_ps(nss, M), denom)));
    _mm512_storeu_ps(m + i, M);
    _mm512_storeu_ps(v + i, V);
  }
  adamw_32bit_scalar(p, g, m, v, i, hi, s);
}

template <typename T>
QX_TARGET_AVX2 void adamw_32bit_avx2(T* p, const T* g, float* m, float* v, int64_t lo, int64_t hi,
                                     const AdamWScalars& s) {
  const bool small = (s.weight < 0.0f ? -s.weight : s.weight) < 0.5f;
  const __m256 decay = _mm256_set1_ps(s.decay), beta2 = _mm256_set1_ps(s.beta2);
  const __m256 w = _mm256_set1_ps(small ? s.weight : s.weight - 1.0f);
  const __m256 omb2 = _mm256_set1_ps(s.one_minus_beta2), bc2 = _mm256_set1_ps(s.bc2_sqrt);
  const __m256 nss = _mm256_set1_ps(s.neg_step_size), eps = _mm256_set1_ps(s.eps);
  int64_t i = lo;
  for (; i + 8 <= hi; i += 8) {
    const __m256 G = load8(g + i);
    __m256 M = _mm256_loadu_ps(m + i), V = _mm256_loadu_ps(v + i);
    const __m256 P = _mm256_mul_ps(load8(p + i), decay);
    M = _mm256_fmadd_ps(w, _mm256_sub_ps(G, M), small ? M : G);
    V = _mm256_fmadd_ps(_mm256_mul_ps(omb2, G), G, _mm256_mul_ps(V, beta2));
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(V), bc2), eps);
    store8(p + i, _mm256_add_ps(P, _mm256_div_ps(_mm256_mul_ps(nss, M), denom)));
    _mm256_storeu_ps(m + i, M);
    _mm256_storeu_ps(v + i, V);
  }
  adamw_32bit_scalar(p, g, m, v, i, hi, s);
}
#endif

template <typename T>
void adamw_32bit_impl(T* p, const T* g, float* m, float* v, int64_t n, const AdamWScalars& s) {
  const Isa isa = current_isa();
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
#if QX_X86
    if (isa == Isa::Avx512) return adamw_32bit_avx512(p, g, m, v, lo, hi, s);
    if (isa == Isa::Avx2) return adamw_32bit_avx2(p, g, m, v, lo, hi, s);
#endif
    adamw_32bit_scalar(p, g, m, v, lo, hi, s);
  });
}

std::array<float, kNumMidpoints> midpoints(const float* code) {
  std::array<float, kNumMidpoints> mid;
  for (int k = 0; k < kNumMidpoints; ++k) mid[k] = code_midpoint(code, k);
  return mid;
}

// The two 256-entry maps and their 255 midpoints (Note [8-bit state quantization]).
struct Maps8 {
  const float* cs;
  const float* cu;
  const float* mid_s;
  const float* mid_u;
};

// One quantization block of len <= 256 elements starting at element 0 of each pointer; am/av
// are the block's absmax, read and then overwritten.
template <typename T>
void adamw_8bit_block_scalar(T* p, const T* g, uint8_t* qm, float& am, uint8_t* qv, float& av,
                             int64_t len, const Maps8& maps, const AdamWScalars& s) {
  float m[kOptimBlock], v[kOptimBlock];
  float m_max = 0.0f, v_max = 0.0f;
  for (int64_t k = 0; k < len; ++k) {
    m[k] = dequantize_code(maps.cs, qm[k], am);
    v[k] = dequantize_code(maps.cu, qv[k], av);
    float pk = to_f32(p[k]);
    adamw_element(pk, to_f32(g[k]), m[k], v[k], s);
    p[k] = from_f32<T>(pk);
    const float a = m[k] < 0.0f ? -m[k] : m[k];
    m_max = a > m_max ? a : m_max;
    v_max = v[k] > v_max ? v[k] : v_max;
  }
  am = m_max;
  av = v_max;
  for (int64_t k = 0; k < len; ++k) {
    qm[k] = quantize_nearest(maps.mid_s, m[k], m_max);
    qv[k] = quantize_nearest(maps.mid_u, v[k], v_max);
  }
}

#if QX_X86
// The 255 midpoints laid out for a two-level search on 16 lanes without gathers (slow on CPUs
// with the gather-data-sampling mitigation): coarse[j] = mid[16j + 15] counts the groups of 16
// that lie wholly below x, then fine[k][c] = mid[16c + k] is permuted into each lane to count
// inside its group c. The result equals count_below (mid[255] = +inf pads the last group).
struct Mid16 {
  alignas(64) float coarse[16];
  alignas(64) float fine[16][16];
};

Mid16 mid16(const float* mid) {
  Mid16 t;
  for (int j = 0; j < 16; ++j) {
    t.coarse[j] = j < 15 ? mid[16 * j + 15] : INFINITY;
    for (int k = 0; k < 16; ++k) {
      const int i = 16 * j + k;
      t.fine[k][j] = i < kNumMidpoints ? mid[i] : INFINITY;
    }
  }
  return t;
}

QX_TARGET_AVX512 inline __m512i count_below16(const Mid16& t, __m512 x) {
  const __m512i one = _mm512_set1_epi32(1);
  __m512i c = _mm512_setzero_si512(), f = _mm512_setzero_si512();
  for (int j = 0; j < 15; ++j) {
    const __mmask16 lt = _mm512_cmp_ps_mask(_mm512_set1_ps(t.coarse[j]), x, _CMP_LT_OQ);
    c = _mm512_mask_add_epi32(c, lt, c, one);
  }
  for (int k = 0; k < 16; ++k) {
    const __m512 mk = _mm512_permutexvar_ps(c, _mm512_load_ps(t.fine[k]));
    f = _mm512_mask_add_epi32(f, _mm512_cmp_ps_mask(mk, x, _CMP_LT_OQ), f, one);
  }
  return _mm512_add_epi32(_mm512_slli_epi32(c, 4), f);
}

// The scalar block's operations on 16 lanes, so the bits are the same. Full blocks only.
template <typename T>
QX_TARGET_AVX512 void adamw_8bit_block_avx512(T* p, const T* g, uint8_t* qm, float& am, uint8_t* qv,
                                              float& av, const Maps8& maps, const Mid16& ts,
                                              const Mid16& tu, const AdamWScalars& s) {
  const bool small = (s.weight < 0.0f ? -s.weight : s.weight) < 0.5f;
  const __m512 decay = _mm512_set1_ps(s.decay), beta2 = _mm512_set1_ps(s.beta2);
  const __m512 w = _mm512_set1_ps(small ? s.weight : s.weight - 1.0f);
  const __m512 omb2 = _mm512_set1_ps(s.one_minus_beta2), bc2 = _mm512_set1_ps(s.bc2_sqrt);
  const __m512 nss = _mm512_set1_ps(s.neg_step_size), eps = _mm512_set1_ps(s.eps);
  const __m512 am_v = _mm512_set1_ps(am), av_v = _mm512_set1_ps(av);
  const __m512 sign = _mm512_set1_ps(-0.0f);
  alignas(64) float m[kOptimBlock], v[kOptimBlock];
  for (int k = 0; k < kOptimBlock; ++k) {  // table lookups: plain loads beat gathers
    m[k] = maps.cs[qm[k]];
    v[k] = maps.cu[qv[k]];
  }
  __m512 m_max = _mm512_setzero_ps(), v_max = _mm512_setzero_ps();
  for (int k = 0; k < kOptimBlock; k += 16) {
    __m512 M = _mm512_mul_ps(_mm512_load_ps(m + k), am_v);
    __m512 V = _mm512_mul_ps(_mm512_load_ps(v + k), av_v);
    const __m512 G = load16(g + k);
    const __m512 P = _mm512_mul_ps(load16(p + k), decay);
    M = _mm512_fmadd_ps(w, _mm512_sub_ps(G, M), small ? M : G);
    V = _mm512_fmadd_ps(_mm512_mul_ps(omb2, G), G, _mm512_mul_ps(V, beta2));
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(V), bc2), eps);
    store16(p + k, _mm512_add_ps(P, _mm512_div_ps(_mm512_mul_ps(nss, M), denom)));
    _mm512_store_ps(m + k, M);
    _mm512_store_ps(v + k, V);
    m_max = _mm512_max_ps(m_max, _mm512_andnot_ps(sign, M));
    v_max = _mm512_max_ps(v_max, V);
  }
  am = _mm512_reduce_max_ps(m_max);
  av = _mm512_reduce_max_ps(v_max);
  const __m512 am_new = _mm512_set1_ps(am), av_new = _mm512_set1_ps(av);
  const __m512 zero = _mm512_setzero_ps();
  for (int k = 0; k < kOptimBlock; k += 16) {
    const __m512 sm = am > 0.0f ? _mm512_div_ps(_mm512_load_ps(m + k), am_new) : zero;
    const __m512 sv = av > 0.0f ? _mm512_div_ps(_mm512_load_ps(v + k), av_new) : zero;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qm + k),
                     _mm512_cvtepi32_epi8(count_below16(ts, sm)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qv + k),
                     _mm512_cvtepi32_epi8(count_below16(tu, sv)));
  }
}
#endif

template <typename T>
void adamw_8bit_impl(T* p, const T* g, uint8_t* qm, float* am, uint8_t* qv, float* av,
                     const float* cs, const float* cu, int64_t n, const AdamWScalars& s) {
  const int64_t nblocks = ceil_div(n, kOptimBlock);
  const auto mid_s = midpoints(cs), mid_u = midpoints(cu);
  const Maps8 maps{cs, cu, mid_s.data(), mid_u.data()};
  const Isa isa = current_isa();
#if QX_X86
  const Mid16 ts = mid16(mid_s.data()), tu = mid16(mid_u.data());
#endif
  at::parallel_for(0, nblocks, kGrain / kOptimBlock, [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t i = blk * kOptimBlock;
      const int64_t len = std::min<int64_t>(kOptimBlock, n - i);
#if QX_X86
      if (len == kOptimBlock && isa == Isa::Avx512) {
        adamw_8bit_block_avx512(p + i, g + i, qm + i, am[blk], qv + i, av[blk], maps, ts, tu, s);
        continue;
      }
#endif
      adamw_8bit_block_scalar(p + i, g + i, qm + i, am[blk], qv + i, av[blk], len, maps, s);
    }
  });
}

at::Tensor adamw_step_32bit_cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                                at::Tensor& exp_avg_sq, int64_t step, double lr, double beta1,
                                double beta2, double eps, double weight_decay) {
  check_adamw_args(param, grad, step, lr, beta1, beta2, eps, weight_decay);
  check_state(exp_avg, "exp_avg", at::kFloat, param.numel(), param);
  check_state(exp_avg_sq, "exp_avg_sq", at::kFloat, param.numel(), param);
  const at::Tensor g = grad.contiguous();
  const int64_t n = param.numel();
  int64_t bad = 0;
  dispatch_float(param.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    bad = count_nonfinite(g.const_data_ptr<T>(), n);
    if (bad) return;
    adamw_32bit_impl(param.data_ptr<T>(), g.const_data_ptr<T>(), exp_avg.data_ptr<float>(),
                     exp_avg_sq.data_ptr<float>(), n,
                     adamw_scalars(step, lr, beta1, beta2, eps, weight_decay));
  });
  return at::scalar_tensor(bad, param.options().dtype(at::kLong));
}

at::Tensor adamw_step_8bit_blockwise_cpu(at::Tensor& param, const at::Tensor& grad,
                                         at::Tensor& exp_avg_q, at::Tensor& exp_avg_absmax,
                                         at::Tensor& exp_avg_sq_q, at::Tensor& exp_avg_sq_absmax,
                                         const at::Tensor& code_signed,
                                         const at::Tensor& code_unsigned, int64_t step, double lr,
                                         double beta1, double beta2, double eps,
                                         double weight_decay) {
  check_adamw_args(param, grad, step, lr, beta1, beta2, eps, weight_decay);
  check_adamw_8bit_states(param, exp_avg_q, exp_avg_absmax, exp_avg_sq_q, exp_avg_sq_absmax,
                          code_signed, code_unsigned);
  const at::Tensor g = grad.contiguous();
  const int64_t n = param.numel();
  int64_t bad = 0;
  dispatch_float(param.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    bad = count_nonfinite(g.const_data_ptr<T>(), n);
    if (bad) return;
    adamw_8bit_impl(param.data_ptr<T>(), g.const_data_ptr<T>(), exp_avg_q.data_ptr<uint8_t>(),
                    exp_avg_absmax.data_ptr<float>(), exp_avg_sq_q.data_ptr<uint8_t>(),
                    exp_avg_sq_absmax.data_ptr<float>(), code_signed.const_data_ptr<float>(),
                    code_unsigned.const_data_ptr<float>(), n,
                    adamw_scalars(step, lr, beta1, beta2, eps, weight_decay));
  });
  return at::scalar_tensor(bad, param.options().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CPU, m) {
  m.impl("adamw_step_32bit", &adamw_step_32bit_cpu);
  m.impl("adamw_step_8bit_blockwise", &adamw_step_8bit_blockwise_cpu);
}

}  // namespace qlora_ext::cpu
