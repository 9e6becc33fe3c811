// Per-element AdamW maths shared by the CPU and CUDA optimizer kernels (__host__ __device__), so
// the CPU tests exercise the arithmetic the GPU runs.
//
// Note [AdamW order]: the operations and their rounding follow torch.optim.AdamW's single-tensor
// path (torch/optim/adam.py, capturable=False): every scalar is computed on the host in double,
// as Python does, then rounded once to fp32, and each tensor op rounds once; FMAs are explicit
// where torch's kernels fuse, never left to the compiler (Note [Bit-exact rounding], codes.h).
// The one known difference: torch's CPU sqrt is not always correctly rounded (about 0.7% of
// values are 1 ulp off); ours is, on host and device.
//   p = p * (1 - lr * wd)
//   m = lerp(m, g, 1 - beta1)                 (one fused multiply-add, as torch's CPU kernel)
//   v = fma((1 - beta2) * g, g, v * beta2)    (addcmul: torch's vectorised loop fuses it too)
//   p = p + (-lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
#pragma once

#include <cmath>
#include <cstdint>

#include "codes.h"

namespace qlora_ext {

// The 8-bit optimizer states are quantized in blocks of this many elements, one fp32 absmax each.
constexpr int kOptimBlock = 256;

struct AdamWScalars {
  float decay;   // 1 - lr * weight_decay
  float weight;  // 1 - beta1, the lerp weight
  float beta2;
  float one_minus_beta2;
  float bc2_sqrt;       // sqrt(1 - beta2^step)
  float neg_step_size;  // -lr / (1 - beta1^step)
  float eps;
};

// Host only: the scalars of step `step` (1-based), in double first as torch computes them.
inline AdamWScalars adamw_scalars(int64_t step, double lr, double beta1, double beta2, double eps,
                                  double weight_decay) {
  const double t = double(step);
  const double bc1 = 1.0 - std::pow(beta1, t);
  const double bc2 = 1.0 - std::pow(beta2, t);
  AdamWScalars s;
  s.decay = float(1.0 - lr * weight_decay);
  s.weight = float(1.0 - beta1);
  s.beta2 = float(beta2);
  s.one_minus_beta2 = float(1.0 - beta2);
  s.bc2_sqrt = float(std::pow(bc2, 0.5));
  s.neg_step_size = float(-(lr / bc1));
  s.eps = float(eps);
  return s;
}

QX_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
QX_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

QX_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// torch's vectorised lerp (LerpKernel.cpp): one fused multiply-add, w * (b - a) + a for a small
// weight, (w - 1) * (b - a) + b otherwise.
QX_HD float lerp_rn(float a, float b, float w) {
  const float aw = w < 0.0f ? -w : w;
  return aw < 0.5f ? fma_rn(w, sub_rn(b, a), a) : fma_rn(sub_rn(w, 1.0f), sub_rn(b, a), b);
}

// One AdamW element update, in place on p, m and v (Note [AdamW order]).
QX_HD void adamw_element(float& p, float g, float& m, float& v, const AdamWScalars& s) {
  p = mul_rn(p, s.decay);
  m = lerp_rn(m, g, s.weight);
  v = fma_rn(mul_rn(s.one_minus_beta2, g), g, mul_rn(v, s.beta2));
  const float denom = add_rn(div_rn(sqrt_rn(v), s.bc2_sqrt), s.eps);
  p = add_rn(p, div_rn(mul_rn(s.neg_step_size, m), denom));
}

QX_HD bool is_finite(float x) { return x == x && x - x == 0.0f; }

// Note [8-bit state quantization]: a state element x of a block with absmax a is stored as the
// code nearest to x / a (a == 0 stores the code nearest 0). Nearest means: the number of
// midpoints 0.5 * (code[k] + code[k + 1]) strictly below the value, so a value exactly on a
// midpoint takes the lower code (the same deterministic rule on host and device). No lookup
// table: the 255 midpoints are computed once per call (shared memory on the GPU) and a
// branchless 8-step binary search finds the code (data-dependent branches mispredict on
// every other element).
constexpr int kNumMidpoints = 255;

QX_HD float code_midpoint(const float* code, int k) {
  return mul_rn(0.5f, add_rn(code[k], code[k + 1]));
}

// Number of the 255 sorted midpoints strictly below x.
QX_HD int count_below(const float* mid, float x) {
  int pos = 0;
  for (int step = 128; step > 0; step >>= 1) pos += (mid[pos + step - 1] < x) ? step : 0;
  return pos;
}

QX_HD uint8_t quantize_nearest(const float* mid, float x, float absmax) {
  const float scaled = absmax > 0.0f ? div_rn(x, absmax) : 0.0f;
  // An overflowed moment (x = +-inf in a block whose absmax is inf) keeps its sign at the end
  // of the map, so that it decodes to +-inf again, as the 32-bit state holds it; the search
  // below would give code 0, which decodes to 0 * inf = NaN in the unsigned map.
  if (scaled != scaled) return x > 0.0f ? uint8_t(kNumMidpoints) : uint8_t(0);
  return uint8_t(count_below(mid, scaled));
}

QX_HD float dequantize_code(const float* code, uint8_t q, float absmax) {
  return mul_rn(code[q], absmax);
}

}  // namespace qlora_ext
