// Code tables and per-element maths shared by the CPU and CUDA kernels.
//
// Everything here is __host__ __device__ so that the CPU tests exercise the exact arithmetic
// the GPU runs. Note [Bit-exact rounding]: the kernels must reproduce bitsandbytes 0.50.2's
// CPU results bit for bit, so every float operation below is written to round once, in the
// order bitsandbytes rounds (no FMA contraction: the host build uses -ffp-contract=off and the
// device code uses the explicit _rn intrinsics).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define QX_HD __host__ __device__ __forceinline__
#else
#define QX_HD inline
#endif

namespace qlora_ext {

enum class QuantType : int { NF4 = 0, FP4 = 1, INT4 = 2 };

// For a >= 0, b > 0; (a + b - 1) / b would overflow for a blocksize near 2^63.
QX_HD int64_t ceil_div(int64_t a, int64_t b) { return a == 0 ? 0 : 1 + (a - 1) / b; }

// NF4: quantiles of N(0, 1), normalised to [-1, 1] (QLoRA, appendix E). Index = code.
// FP4: bitsandbytes' E2M1 values (bias 2, one subnormal) / 12, indexed by bit pattern; bit 3
// is the sign. INT4: symmetric absmax, k/7 for k in -7..7, indexed like FP4 (sign in bit 3).
// Code 8 of FP4/INT4 ("minus zero") is +0.0, as in bitsandbytes' quant_map.
struct CodeTable {
  float value[16];
  // Codes listed by increasing value. Codes 0 and 8 are both zero; code 0 comes first, the
  // order bitsandbytes' argsort gives, so a tiny positive input maps to code 8 in both.
  uint8_t sorted_code[16];
};

QX_HD CodeTable code_table(QuantType t) {
  switch (t) {
    case QuantType::NF4:
      return {
          {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
           -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
           0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
           0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f},
          {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}};
    case QuantType::FP4:
      return {{0.0f, 0.0625f / 12.0f, 8.0f / 12.0f, 1.0f, 4.0f / 12.0f, 6.0f / 12.0f, 2.0f / 12.0f,
               3.0f / 12.0f, 0.0f, -0.0625f / 12.0f, -8.0f / 12.0f, -1.0f, -4.0f / 12.0f,
               -6.0f / 12.0f, -2.0f / 12.0f, -3.0f / 12.0f},
              {11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3}};
    default:
      return {{1.0f, 6.0f / 7.0f, 5.0f / 7.0f, 4.0f / 7.0f, 3.0f / 7.0f, 2.0f / 7.0f, 1.0f / 7.0f,
               0.0f, 0.0f, -1.0f / 7.0f, -2.0f / 7.0f, -3.0f / 7.0f, -4.0f / 7.0f, -5.0f / 7.0f,
               -6.0f / 7.0f, -1.0f},
              {15, 14, 13, 12, 11, 10, 9, 7, 8, 6, 5, 4, 3, 2, 1, 0}};
  }
}

// The 15 decision boundaries between consecutive sorted codes: (a + b) / 2 in fp32.
struct Bounds {
  float mid[15];
};

QX_HD Bounds sorted_midpoints(const CodeTable& c) {
  Bounds b{};
  for (int i = 0; i < 15; ++i) {
    b.mid[i] = (c.value[c.sorted_code[i]] + c.value[c.sorted_code[i + 1]]) * 0.5f;
  }
  return b;
}

// Nearest code for a value already scaled into [-1, 1]. A value exactly on a midpoint goes to
// the lower code (torch.bucketize(right=False), bitsandbytes' rule). mid: 15 sorted midpoints;
// sorted_code: the codes in value order (arrays, so CUDA kernels can keep them in shared memory).
QX_HD uint8_t quantize_scaled(float scaled, const float* mid, const uint8_t* sorted_code) {
  int rank = 0;
  for (int i = 0; i < 15; ++i) rank += (mid[i] < scaled) ? 1 : 0;
  return sorted_code[rank];
}
QX_HD uint8_t quantize_scaled(float scaled, const CodeTable& c, const Bounds& b) {
  return quantize_scaled(scaled, b.mid, c.sorted_code);
}

QX_HD float clamp_unit(float x) { return x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x); }

QX_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
QX_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
QX_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// 4-bit scaling, as bitsandbytes does it: full blocks multiply by a reciprocal, a partial last
// block divides (and its absmax is clamped to 1e-38, which is also what gets stored).
constexpr float kMinAbsmax = 1e-38f;
QX_HD float safe_absmax(float absmax) { return absmax < kMinAbsmax ? kMinAbsmax : absmax; }

// Double quantization: the 8-bit code of a block's absmax, its group's fp32 scale and the mean
// that was subtracted. Two roundings, as bitsandbytes' dequantize_blockwise then `+= offset`.
QX_HD float nested_absmax(float code8, float group_absmax, float offset) {
  return add_rn(mul_rn(code8, group_absmax), offset);
}

// ---- 8-bit dynamic quantization (bitsandbytes' CPU rule) ----
// bitsandbytes quantizes through a 65536-entry table: index = uint16((v + 1) * 0.5 * 65535 +
// 0.5), and entry i holds how many midpoints lie below -1 + 2i / 65535. We compute the entry
// instead of storing the table (a binary search over the 255 midpoints), which gives identical
// codes on CPU and GPU without a per-call table upload.
constexpr int kLutSize = 65536;

QX_HD int lut_index(float v) {
  // A NaN (a block holding NaN or Inf, which the op then refuses) would make the int
  // conversion below undefined and the table read out of bounds: it reads entry 0 instead.
  v = v == v ? clamp_unit(v) : -1.0f;
  float t = mul_rn(mul_rn(add_rn(v, 1.0f), 0.5f), float(kLutSize - 1));
  return int(add_rn(t, 0.5f));
}

QX_HD float lut_grid_value(int i) {
  return add_rn(-1.0f, div_rn(2.0f * float(i), float(kLutSize - 1)));
}

// Number of midpoints (0.5 * (code[k] + code[k + 1])) strictly below x, for a sorted 256-code.
QX_HD int count_midpoints_below(const float* code, float x) {
  int lo = 0, hi = 255;  // answer in [0, 255]
  while (lo < hi) {
    int m = (lo + hi) >> 1;
    float mid = mul_rn(0.5f, add_rn(code[m], code[m + 1]));
    if (mid < x)
      lo = m + 1;
    else
      hi = m;
  }
  return lo;
}

QX_HD uint8_t quantize_8bit_scaled(const float* code, float scaled) {
  return uint8_t(count_midpoints_below(code, lut_grid_value(lut_index(scaled))));
}

}  // namespace qlora_ext
