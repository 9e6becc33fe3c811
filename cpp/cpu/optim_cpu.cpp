// CPU kernels of the fused AdamW ops (TORCH_LIBRARY_IMPL CPU). The per-element maths is in
// optim_math.h (Note [AdamW order]), shared with the CUDA kernels.
//
// Both ops first count the non-finite gradient elements; if there is any, the whole tensor is
// skipped (param and states untouched) and the count is returned, so a NaN/Inf never reaches
// the state. Check and update share one OpenMP region (check_then_update): each thread owns a
// slice, in whole 256-element quantization blocks for the 8-bit op (a block's absmax needs all
// of its elements). The build requires OpenMP, as torch's own CPU kernels do.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <omp.h>

#include <array>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../optim_checks.h"
#include "../optim_math.h"
#include "cpu_isa.h"
#include "dequant4.h"
#include "simd.h"

namespace qlora_ext::cpu {
namespace {

constexpr int64_t kGrain = 32768;  // elements per task: amortises the task overhead

// A value is non-finite exactly when its exponent bits are all ones; testing the bits keeps the
// scan a few integer ops per element, so it runs at memory speed (the gradient then sits in the
// L3 for the update that follows). A scalar float test here cost 40% of the 32-bit step.
inline uint32_t exponent_mask(float) { return 0x7F800000u; }
inline uint32_t exponent_mask(c10::Half) { return 0x7C00u; }
inline uint32_t exponent_mask(c10::BFloat16) { return 0x7F80u; }

template <typename T>
int64_t count_nonfinite_scalar(const T* g, int64_t lo, int64_t hi) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;
  const Bits e = Bits(exponent_mask(T{}));
  int64_t bad = 0;
  for (int64_t i = lo; i < hi; ++i) {
    Bits b;
    std::memcpy(&b, g + i, sizeof(b));
    bad += (b & e) == e;
  }
  return bad;
}

#if QX_X86
// Whether [lo, hi) holds a non-finite value: an unsigned max of (bits & exponent) over four
// interleaved streams (more loads in flight), two instructions per 64 bytes; the exact count
// is only taken, by the scalar loop, when the answer is yes.
template <typename T>
QX_TARGET_AVX512 bool any_nonfinite_avx512(const T* g, int64_t lo, int64_t hi) {
  constexpr int64_t kLanes = 64 / sizeof(T);
  constexpr bool k32 = sizeof(T) == 4;
  const __m512i e = k32 ? _mm512_set1_epi32(int(exponent_mask(T{})))
                        : _mm512_set1_epi16(short(exponent_mask(T{})));
  __m512i acc[4];
  for (auto& a : acc) a = _mm512_setzero_si512();
  const int64_t q = (hi - lo) / (4 * kLanes) * kLanes;  // four streams of q elements
  for (int64_t j = 0; j < q; j += kLanes) {
    for (int s = 0; s < 4; ++s) {
      const __m512i t = _mm512_and_si512(_mm512_loadu_si512(g + lo + s * q + j), e);
      acc[s] = k32 ? _mm512_max_epu32(acc[s], t) : _mm512_max_epu16(acc[s], t);
    }
  }
  __m512i m =
      k32 ? _mm512_max_epu32(_mm512_max_epu32(acc[0], acc[1]), _mm512_max_epu32(acc[2], acc[3]))
          : _mm512_max_epu16(_mm512_max_epu16(acc[0], acc[1]), _mm512_max_epu16(acc[2], acc[3]));
  const bool hit = k32 ? _mm512_cmpeq_epi32_mask(m, e) != 0 : _mm512_cmpeq_epi16_mask(m, e) != 0;
  return hit || count_nonfinite_scalar(g, lo + 4 * q, hi) > 0;
}
#endif

template <typename T>
int64_t count_nonfinite(const T* g, int64_t lo, int64_t hi, Isa isa) {
#if QX_X86
  if (isa == Isa::Avx512 && !any_nonfinite_avx512(g, lo, hi)) return 0;
#endif
  (void)isa;
  return count_nonfinite_scalar(g, lo, hi);
}

// Counts the non-finite gradient elements of [0, n) and, only if there are none, runs
// update(lo, hi) over the same range: the op's whole contract in one parallel region. Each
// thread checks its own slice, waits at one barrier for the total, then updates that same
// slice, which (up to ~1 MB, every LoRA adapter) is still in its L2. Two at::parallel_for
// passes cost a second fork-join per tensor and a second trip to memory for the gradient.
// `align` keeps the slices whole blocks of the 8-bit state.
template <typename Check, typename Update>
int64_t check_then_update(int64_t n, int64_t align, const Check& check, const Update& update) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), ceil_div(n, kGrain));
  // omp_in_parallel: also inside our own omp regions (the multi-tensor op's owned tensors).
  if (threads <= 1 || at::in_parallel_region() || omp_in_parallel()) {
    const int64_t bad = check(0, n);
    if (bad == 0) update(0, n);
    return bad;
  }
  std::atomic<int64_t> bad{0};
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t per = ceil_div(ceil_div(n, nt), align) * align;
    const int64_t lo = std::min(n, t * per), hi = std::min(n, lo + per);
    if (hi > lo) bad.fetch_add(check(lo, hi), std::memory_order_relaxed);
#pragma omp barrier
    if (hi > lo && bad.load(std::memory_order_relaxed) == 0) update(lo, hi);
  }
  return bad.load();
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
// adamw_element on 16 (AVX-512) or 8 (AVX2) lanes: the same operations in the same order, each
// correctly rounded (FMA where adamw_element has fma_rn), so every ISA gives the scalar loop's
// bits.
struct AdamW16 {  // the scalars broadcast to 16 lanes
  bool small;
  __m512 decay, beta2, w, omb2, bc2, nss, eps;
};

QX_TARGET_AVX512 inline AdamW16 adamw16(const AdamWScalars& s) {
  const bool small = (s.weight < 0.0f ? -s.weight : s.weight) < 0.5f;
  return {small,
          _mm512_set1_ps(s.decay),
          _mm512_set1_ps(s.beta2),
          _mm512_set1_ps(small ? s.weight : s.weight - 1.0f),
          _mm512_set1_ps(s.one_minus_beta2),
          _mm512_set1_ps(s.bc2_sqrt),
          _mm512_set1_ps(s.neg_step_size),
          _mm512_set1_ps(s.eps)};
}

template <typename T>
QX_TARGET_AVX512 inline void adamw_16(T* p, const T* g, float* m, float* v, const AdamW16& c) {
  const __m512 G = load16(g);
  __m512 M = _mm512_loadu_ps(m), V = _mm512_loadu_ps(v);
  const __m512 P = _mm512_mul_ps(load16(p), c.decay);
  M = _mm512_fmadd_ps(c.w, _mm512_sub_ps(G, M), c.small ? M : G);
  V = _mm512_fmadd_ps(_mm512_mul_ps(c.omb2, G), G, _mm512_mul_ps(V, c.beta2));
  const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(V), c.bc2), c.eps);
  store16(p, _mm512_add_ps(P, _mm512_div_ps(_mm512_mul_ps(c.nss, M), denom)));
  _mm512_storeu_ps(m, M);
  _mm512_storeu_ps(v, V);
}

// The range is walked as two halves in lockstep: twice the memory streams in flight, measured
// faster than one pass on 2 cores (36.6 against 37.8 ms for 50M parameters); the step is bound
// by memory, not by its two divisions (dropping one changed nothing).
template <typename T>
QX_TARGET_AVX512 void adamw_32bit_avx512(T* p, const T* g, float* m, float* v, int64_t lo,
                                         int64_t hi, const AdamWScalars& s) {
  const AdamW16 c = adamw16(s);
  const int64_t half = (hi - lo) / 32 * 16;
  for (int64_t i = lo; i < lo + half; i += 16) {
    adamw_16(p + i, g + i, m + i, v + i, c);
    const int64_t j = i + half;
    adamw_16(p + j, g + j, m + j, v + j, c);
  }
  int64_t i = lo + 2 * half;
  for (; i + 16 <= hi; i += 16) adamw_16(p + i, g + i, m + i, v + i, c);
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
void adamw_32bit_range(T* p, const T* g, float* m, float* v, int64_t lo, int64_t hi,
                       const AdamWScalars& s, Isa isa) {
#if QX_X86
  if (isa == Isa::Avx512) return adamw_32bit_avx512(p, g, m, v, lo, hi, s);
  if (isa == Isa::Avx2) return adamw_32bit_avx2(p, g, m, v, lo, hi, s);
#endif
  adamw_32bit_scalar(p, g, m, v, lo, hi, s);
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

// quantize_nearest's rule for a NaN quotient (an overflowed moment: +-inf over an inf absmax) on
// 16 lanes: the end of the map that keeps its sign.
QX_TARGET_AVX512 inline __m512i nan_to_end16(__m512i q, __m512 scaled, __m512 x) {
  const __mmask16 nan = _mm512_cmp_ps_mask(scaled, scaled, _CMP_UNORD_Q);
  const __mmask16 pos = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ);
  q = _mm512_mask_mov_epi32(q, nan, _mm512_setzero_si512());
  return _mm512_mask_mov_epi32(q, nan & pos, _mm512_set1_epi32(kNumMidpoints));
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
    // vmaxps returns its second operand when either is NaN: with the running max second, a NaN
    // moment is left out of the absmax, as the scalar comparison and CUDA's fmaxf leave it out
    // (otherwise whether it counted would depend on its lane and position in the block).
    m_max = _mm512_max_ps(_mm512_andnot_ps(sign, M), m_max);
    v_max = _mm512_max_ps(V, v_max);
  }
  am = _mm512_reduce_max_ps(m_max);
  av = _mm512_reduce_max_ps(v_max);
  const __m512 am_new = _mm512_set1_ps(am), av_new = _mm512_set1_ps(av);
  const __m512 zero = _mm512_setzero_ps();
  for (int k = 0; k < kOptimBlock; k += 16) {
    const __m512 sm = am > 0.0f ? _mm512_div_ps(_mm512_load_ps(m + k), am_new) : zero;
    const __m512 sv = av > 0.0f ? _mm512_div_ps(_mm512_load_ps(v + k), av_new) : zero;
    const __m512i cm = nan_to_end16(count_below16(ts, sm), sm, _mm512_load_ps(m + k));
    const __m512i cv = nan_to_end16(count_below16(tu, sv), sv, _mm512_load_ps(v + k));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qm + k), _mm512_cvtepi32_epi8(cm));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qv + k), _mm512_cvtepi32_epi8(cv));
  }
}
#endif

// The 8-bit tables, built once per call.
struct Tables8 {
  std::array<float, kNumMidpoints> mid_s, mid_u;
  Maps8 maps;
#if QX_X86
  Mid16 ts, tu;
#endif
  Tables8(const float* cs, const float* cu)
      : mid_s(midpoints(cs)),
        mid_u(midpoints(cu)),
        maps{cs, cu, mid_s.data(), mid_u.data()}
#if QX_X86
        ,
        ts(mid16(mid_s.data())),
        tu(mid16(mid_u.data()))
#endif
  {
  }
};

// Elements [lo, hi), lo a multiple of kOptimBlock.
template <typename T>
void adamw_8bit_range(T* p, const T* g, uint8_t* qm, float* am, uint8_t* qv, float* av, int64_t lo,
                      int64_t hi, const Tables8& t, const AdamWScalars& s, Isa isa) {
  for (int64_t i = lo; i < hi; i += kOptimBlock) {
    const int64_t blk = i / kOptimBlock, len = std::min<int64_t>(kOptimBlock, hi - i);
#if QX_X86
    if (len == kOptimBlock && isa == Isa::Avx512) {
      adamw_8bit_block_avx512(p + i, g + i, qm + i, am[blk], qv + i, av[blk], t.maps, t.ts, t.tu,
                              s);
      continue;
    }
#endif
    adamw_8bit_block_scalar(p + i, g + i, qm + i, am[blk], qv + i, av[blk], len, t.maps, s);
  }
}

// One tensor's 32-bit step (g contiguous, arguments checked): its non-finite count, and the
// update over all threads when that is 0. Inside a parallel region it runs on the calling
// thread (check_then_update).
int64_t adamw_32bit_tensor(at::Tensor& param, const at::Tensor& g, at::Tensor& exp_avg,
                           at::Tensor& exp_avg_sq, const AdamWScalars& s, Isa isa) {
  int64_t bad = 0;
  dispatch_float(param.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* gp = g.const_data_ptr<T>();
    T* pp = param.data_ptr<T>();
    float *m = exp_avg.data_ptr<float>(), *v = exp_avg_sq.data_ptr<float>();
    bad = check_then_update(
        param.numel(), 1, [&](int64_t lo, int64_t hi) { return count_nonfinite(gp, lo, hi, isa); },
        [&](int64_t lo, int64_t hi) { adamw_32bit_range(pp, gp, m, v, lo, hi, s, isa); });
  });
  return bad;
}

at::Tensor adamw_step_32bit_cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                                at::Tensor& exp_avg_sq, int64_t step, double lr, double beta1,
                                double beta2, double eps, double weight_decay) {
  check_adamw_32bit_args(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps,
                         weight_decay);
  const int64_t bad =
      adamw_32bit_tensor(param, grad.contiguous(), exp_avg, exp_avg_sq,
                         adamw_scalars(step, lr, beta1, beta2, eps, weight_decay), current_isa());
  return at::scalar_tensor(bad, param.options().dtype(at::kLong));
}

// Tensors up to this size are updated whole by one thread (check then update, no barrier),
// several at once; larger ones are shared by all threads as in the single-tensor op.
constexpr int64_t kOwnedNumel = int64_t(1) << 20;

at::Tensor adamw_step_32bit_multi_cpu(at::TensorList params, at::TensorList grads,
                                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                      at::IntArrayRef steps, double lr, double beta1, double beta2,
                                      double eps, double weight_decay) {
  check_adamw_multi_args(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps,
                         weight_decay);
  const int64_t n = int64_t(params.size());
  const Isa isa = current_isa();
  std::vector<int64_t> owned, shared;
  for (int64_t i = 0; i < n; ++i) (params[i].numel() <= kOwnedNumel ? owned : shared).push_back(i);
  at::Tensor result = at::zeros({n}, at::TensorOptions().dtype(at::kLong));
  int64_t* bad = result.data_ptr<int64_t>();
  auto step_tensor = [&](int64_t i) {
    at::Tensor p = params[i], m = exp_avgs[i], v = exp_avg_sqs[i];
    bad[i] = adamw_32bit_tensor(p, grads[i].contiguous(), m, v,
                                adamw_scalars(steps[i], lr, beta1, beta2, eps, weight_decay), isa);
  };
  for (const int64_t i : shared) step_tensor(i);
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t j = 0; j < int64_t(owned.size()); ++j) step_tensor(owned[j]);
  return result;
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
    const T* gp = g.const_data_ptr<T>();
    T* pp = param.data_ptr<T>();
    uint8_t *qm = exp_avg_q.data_ptr<uint8_t>(), *qv = exp_avg_sq_q.data_ptr<uint8_t>();
    float *am = exp_avg_absmax.data_ptr<float>(), *av = exp_avg_sq_absmax.data_ptr<float>();
    const Tables8 t(code_signed.const_data_ptr<float>(), code_unsigned.const_data_ptr<float>());
    const AdamWScalars s = adamw_scalars(step, lr, beta1, beta2, eps, weight_decay);
    const Isa isa = current_isa();
    bad = check_then_update(
        n, kOptimBlock, [&](int64_t lo, int64_t hi) { return count_nonfinite(gp, lo, hi, isa); },
        [&](int64_t lo, int64_t hi) {
          adamw_8bit_range(pp, gp, qm, am, qv, av, lo, hi, t, s, isa);
        });
  });
  return at::scalar_tensor(bad, param.options().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CPU, m) {
  m.impl("adamw_step_32bit", &adamw_step_32bit_cpu);
  m.impl("adamw_step_32bit_multi", &adamw_step_32bit_multi_cpu);
  m.impl("adamw_step_8bit_blockwise", &adamw_step_8bit_blockwise_cpu);
}

}  // namespace qlora_ext::cpu
