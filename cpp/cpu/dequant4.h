// Shared by the dequantize op and the 4-bit GEMMs: turn a range of 4-bit blocks back into
// floats, with the same AVX-512 / AVX2 / portable variants and the same rounding everywhere.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

#include "../codes.h"
#include "../quant_checks.h"
#include "cpu_isa.h"
#include "simd.h"

namespace qlora_ext::cpu {

#if QX_X86
// nested_absmax on 16 blocks at a time: one gather from the 256-entry code table (a scalar
// loop of dependent loads was a fifth of a decode-size GEMV's time).
QX_TARGET_AVX512 inline int64_t nested_scales_avx512(const uint8_t* q, const float* code,
                                                     float group_absmax, float offset,
                                                     int64_t count, float* out) {
  const __m512 ga = _mm512_set1_ps(group_absmax), off = _mm512_set1_ps(offset);
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m512i idx =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i)));
    const __m512 c = _mm512_i32gather_ps(idx, code, 4);
    _mm512_storeu_ps(out + i, _mm512_add_ps(_mm512_mul_ps(c, ga), off));  // two roundings
  }
  return i;
}
#endif

// out[i] = the fp32 scale of block blk0 + i, plain or double-quantized, for i < count. The
// nested group is found once per group: a 64-bit division per block cost more than
// decoding the block's 64 codes.
inline void block_scales(const AbsmaxSource& s, int64_t blk0, int64_t count, float* out,
                         Isa isa = current_isa()) {
  if (s.absmax_f32) {
    std::copy(s.absmax_f32 + blk0, s.absmax_f32 + blk0 + count, out);
    return;
  }
  const float offset = *s.nested_offset;
  for (int64_t b = blk0, end = blk0 + count; b < end;) {
    const int64_t group = b / s.nested_blocksize;
    const int64_t stop = std::min(end, (group + 1) * s.nested_blocksize);
    const float group_absmax = s.nested_absmax[group];
#if QX_X86
    if (isa == Isa::Avx512) {
      const int64_t done =
          nested_scales_avx512(s.absmax_u8 + b, s.nested_code, group_absmax, offset, stop - b, out);
      b += done;
      out += done;
    }
#endif
    for (; b < stop; ++b) {
      *out++ = nested_absmax(s.nested_code[s.absmax_u8[b]], group_absmax, offset);
    }
  }
}

template <typename T>
void dequantize_block_scalar(const uint8_t* p, int64_t len, float scale, const float* table,
                             T* out) {
  for (int64_t i = 0; i < len; ++i) {
    uint8_t byte = p[i / 2];
    uint8_t q = (i % 2 == 0) ? (byte >> 4) : (byte & 0xF);
    out[i] = from_f32<T>(table[q] * scale);
  }
}

#if QX_X86
template <typename T>
QX_TARGET_AVX512 void dequantize_block_avx512(const uint8_t* p, int64_t len, float scale,
                                              const float* table, T* out) {
  const __m512 tab = _mm512_loadu_ps(table);
  const __m512 vs = _mm512_set1_ps(scale);
  const __m128i low4 = _mm_set1_epi16(0x000F);
  for (int64_t i = 0; i < len; i += 16) {
    __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + i / 2)));
    // Byte order hi0, lo0, hi1, lo1, ... (even element in the high nibble).
    __m128i nib = _mm_or_si128(_mm_srli_epi16(w, 4), _mm_slli_epi16(_mm_and_si128(w, low4), 8));
    __m512 v = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(nib), tab);
    store16(out + i, _mm512_mul_ps(v, vs));
  }
}

template <typename T>
QX_TARGET_AVX2 void dequantize_block_avx2(const uint8_t* p, int64_t len, float scale,
                                          const float* table, T* out) {
  const __m256 tab_lo = _mm256_loadu_ps(table);
  const __m256 tab_hi = _mm256_loadu_ps(table + 8);
  const __m256 vs = _mm256_set1_ps(scale);
  const __m128i low4 = _mm_set1_epi16(0x000F);
  const __m256i seven = _mm256_set1_epi32(7);
  for (int64_t i = 0; i < len; i += 8) {
    int32_t four;
    std::memcpy(&four, p + i / 2, 4);
    __m128i w = _mm_cvtepu8_epi16(_mm_cvtsi32_si128(four));
    __m128i nib = _mm_or_si128(_mm_srli_epi16(w, 4), _mm_slli_epi16(_mm_and_si128(w, low4), 8));
    __m256i idx = _mm256_cvtepu8_epi32(nib);
    __m256 lo = _mm256_permutevar8x32_ps(tab_lo, idx);
    __m256 hi = _mm256_permutevar8x32_ps(tab_hi, idx);
    __m256 v = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven)));
    store8(out + i, _mm256_mul_ps(v, vs));
  }
}
#endif

// Dequantize blocks [blk_lo, blk_hi) of a tensor of n elements into out, which receives the
// first element of block blk_lo.
template <typename T>
void dequantize_blocks(const uint8_t* packed, const AbsmaxSource& src, int64_t blk_lo,
                       int64_t blk_hi, int64_t n, int64_t blocksize, const float* table, Isa isa,
                       T* out) {
  const int64_t base = blk_lo * blocksize;
  constexpr int64_t kBatch = 64;
  float scales[kBatch];
  for (int64_t blk = blk_lo; blk < blk_hi; ++blk) {
    if ((blk - blk_lo) % kBatch == 0) {
      block_scales(src, blk, std::min(kBatch, blk_hi - blk), scales);
    }
    const float scale = scales[(blk - blk_lo) % kBatch];
    const int64_t start = blk * blocksize;
    const int64_t len = std::min(blocksize, n - start);
    const uint8_t* pb = packed + start / 2;
#if QX_X86
    if (len == blocksize && isa == Isa::Avx512) {
      dequantize_block_avx512(pb, len, scale, table, out + (start - base));
      continue;
    }
    if (len == blocksize && isa == Isa::Avx2) {
      dequantize_block_avx2(pb, len, scale, table, out + (start - base));
      continue;
    }
#endif
    dequantize_block_scalar(pb, len, scale, table, out + (start - base));
  }
}

// Pointers into a 4-bit tensor's absmax (plain fp32, or double-quantized). The tensors must
// be contiguous and outlive the returned view.
inline AbsmaxSource absmax_source(const at::Tensor& absmax, const std::optional<at::Tensor>& na,
                                  const std::optional<at::Tensor>& nc,
                                  const std::optional<at::Tensor>& no, int64_t nested_blocksize) {
  AbsmaxSource s;
  if (absmax.scalar_type() == at::kFloat) {
    s.absmax_f32 = absmax.const_data_ptr<float>();
  } else {
    s.absmax_u8 = absmax.const_data_ptr<uint8_t>();
    s.nested_absmax = na->const_data_ptr<float>();
    s.nested_code = nc->const_data_ptr<float>();
    s.nested_offset = no->const_data_ptr<float>();
    s.nested_blocksize = nested_blocksize;
  }
  return s;
}

// Explicit dtype switch: float, half and bfloat16 are the only element types we compile.
template <typename F>
inline void dispatch_float(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, "unsupported dtype ", dt);
  }
}

}  // namespace qlora_ext::cpu
