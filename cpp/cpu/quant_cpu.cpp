// CPU kernels for 4-bit and 8-bit blockwise quantization (TORCH_LIBRARY_IMPL CPU).
//
// Layout (bitsandbytes'): the input is flattened row-major and cut into blocks of `blocksize`;
// each block has one fp32 absmax; codes are packed two per byte, the even (first) element in the
// high nibble. The work is split over blocks with at::parallel_for; inside a block the AVX-512 /
// AVX2 variants handle 16 / 8 elements per step. All variants round exactly like the scalar one
// (Note [Bit-exact rounding] in codes.h), which the tests check by forcing each ISA in turn.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../codes.h"
#include "../quant_checks.h"
#include "cpu_alloc.h"
#include "cpu_isa.h"
#include "dequant4.h"
#include "simd.h"

namespace qlora_ext::cpu {
namespace {

// Blocks per parallel task: about 16K elements, enough to amortise the task overhead.
int64_t grain_for(int64_t blocksize) { return std::max<int64_t>(1, 16384 / blocksize); }

inline uint8_t pack2(uint8_t hi, uint8_t lo) { return uint8_t((hi << 4) | lo); }

// ---------------------------------------------------------------- 4-bit quantize, one block
// Returns the block's absmax (NaN if the block held a NaN) and writes ceil(len / 2) bytes.

template <typename T>
float quantize_block_scalar(const T* x, int64_t len, bool full, const CodeTable& c, const Bounds& b,
                            uint8_t* out) {
  float am = 0.0f;
  bool nan = false;
  for (int64_t i = 0; i < len; ++i) {
    float v = to_f32(x[i]);
    nan |= v != v;
    float a = v < 0 ? -v : v;
    am = a > am ? a : am;
  }
  if (!full) am = safe_absmax(am);  // a partial last block stores the clamped absmax
  const float inv = 1.0f / safe_absmax(am);
  auto scaled = [&](int64_t i) -> float {
    float v = to_f32(x[i]);
    return clamp_unit(full ? v * inv : v / am);
  };
  for (int64_t i = 0; i + 1 < len; i += 2) {
    out[i / 2] = pack2(quantize_scaled(scaled(i), c, b), quantize_scaled(scaled(i + 1), c, b));
  }
  if (len % 2)
    out[len / 2] = pack2(quantize_scaled(scaled(len - 1), c, b), quantize_scaled(0.f, c, b));
  return nan ? NAN : am;
}

#if QX_X86
template <typename T>
QX_TARGET_AVX512 float quantize_block_avx512(const T* x, int64_t len, const CodeTable& c,
                                             const Bounds& b, uint8_t* out) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t i = 0; i < len; i += 16) {
    __m512 v = load16(x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, _mm512_andnot_ps(sign, v));
  }
  const float am = _mm512_reduce_max_ps(vmax);
  const __m512 inv = _mm512_set1_ps(1.0f / safe_absmax(am));
  __m512i order = _mm512_setzero_si512();
  {
    alignas(64) int32_t o[16];
    for (int k = 0; k < 16; ++k) o[k] = c.sorted_code[k];
    order = _mm512_load_si512(o);
  }
  const __m512i one = _mm512_set1_epi32(1);
  for (int64_t i = 0; i < len; i += 16) {
    // Clamping to [-1, 1] cannot change the rank (every midpoint lies inside), so it is skipped.
    __m512 s = _mm512_mul_ps(load16(x + i), inv);
    __m512i rank = _mm512_setzero_si512();
    for (int k = 0; k < 15; ++k) {
      __mmask16 gt = _mm512_cmp_ps_mask(_mm512_set1_ps(b.mid[k]), s, _CMP_LT_OQ);
      rank = _mm512_mask_add_epi32(rank, gt, rank, one);
    }
    __m128i q = _mm512_cvtepi32_epi8(_mm512_permutexvar_epi32(rank, order));
    // 16-bit lane k holds q[2k] | q[2k+1] << 8; we want q[2k] << 4 | q[2k+1].
    __m128i hi = _mm_slli_epi16(_mm_and_si128(q, _mm_set1_epi16(0x00FF)), 4);
    __m128i lo = _mm_srli_epi16(q, 8);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i / 2),
                     _mm_packus_epi16(_mm_or_si128(hi, lo), _mm_setzero_si128()));
  }
  return nan ? NAN : am;
}

template <typename T>
QX_TARGET_AVX2 float quantize_block_avx2(const T* x, int64_t len, const CodeTable& c,
                                         const Bounds& b, uint8_t* out) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 vmax = _mm256_setzero_ps();
  __m256 nan = _mm256_setzero_ps();
  for (int64_t i = 0; i < len; i += 8) {
    __m256 v = load8(x + i);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
  }
  const float am = hmax8(vmax);
  const __m256 inv = _mm256_set1_ps(1.0f / safe_absmax(am));
  alignas(32) int32_t rank_out[8];
  for (int64_t i = 0; i < len; i += 8) {
    __m256 s = _mm256_mul_ps(load8(x + i), inv);
    __m256i rank = _mm256_setzero_si256();
    for (int k = 0; k < 15; ++k) {
      __m256 lt = _mm256_cmp_ps(_mm256_set1_ps(b.mid[k]), s, _CMP_LT_OQ);
      rank = _mm256_sub_epi32(rank, _mm256_castps_si256(lt));  // true lanes are -1
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(rank_out), rank);
    for (int k = 0; k < 8; k += 2) {
      out[(i + k) / 2] = pack2(c.sorted_code[rank_out[k]], c.sorted_code[rank_out[k + 1]]);
    }
  }
  return _mm256_movemask_ps(nan) ? NAN : am;
}
#endif

template <typename T>
void quantize_4bit_impl(const T* x, int64_t n, int64_t blocksize, QuantType qt, uint8_t* packed,
                        float* absmax) {
  const CodeTable c = code_table(qt);
  const Bounds b = sorted_midpoints(c);
  const int64_t nblocks = ceil_div(n, blocksize);
  const Isa isa = current_isa();
  at::parallel_for(0, nblocks, grain_for(blocksize), [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t start = blk * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      const bool full = len == blocksize;
      const T* xb = x + start;
      uint8_t* ob = packed + start / 2;
      float am;
#if QX_X86
      if (full && isa == Isa::Avx512) {
        am = quantize_block_avx512(xb, len, c, b, ob);
      } else if (full && isa == Isa::Avx2) {
        am = quantize_block_avx2(xb, len, c, b, ob);
      } else
#endif
      {
        am = quantize_block_scalar(xb, len, full, c, b, ob);
      }
      absmax[blk] = am;
    }
  });
}

template <typename T>
void dequantize_4bit_impl(const uint8_t* packed, const AbsmaxSource& src, int64_t n,
                          int64_t blocksize, QuantType qt, T* out) {
  const CodeTable c = code_table(qt);
  const Isa isa = current_isa();
  at::parallel_for(0, ceil_div(n, blocksize), grain_for(blocksize), [&](int64_t lo, int64_t hi) {
    dequantize_blocks(packed, src, lo, hi, n, blocksize, c.value, isa, out + lo * blocksize);
  });
}

// ---------------------------------------------------------------- ops

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& A, int64_t blocksize,
                                                     c10::string_view quant_type) {
  check_blocksize_4bit(blocksize);
  const QuantType qt = parse_quant_type(std::string(quant_type));
  check_float_input(A, "w");
  const at::Tensor x = A.contiguous();
  const int64_t n = x.numel();
  auto packed = empty_large({ceil_div(n, 2)}, at::kByte);
  auto absmax = at::empty({ceil_div(n, blocksize)}, x.options().dtype(at::kFloat));
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    quantize_4bit_impl<T>(x.const_data_ptr<T>(), n, blocksize, qt, packed.data_ptr<uint8_t>(),
                          absmax.data_ptr<float>());
  });
  TORCH_CHECK(n == 0 || at::isfinite(absmax).all().item<bool>(),
              "w contains NaN or Inf; 4-bit quantization needs finite values");
  return {packed, absmax};
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                               int64_t blocksize, c10::string_view quant_type,
                               at::IntArrayRef shape, at::ScalarType dtype,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code,
                               const std::optional<at::Tensor>& nested_offset,
                               int64_t nested_blocksize) {
  const QuantType qt = parse_quant_type(std::string(quant_type));
  check_dequantize_4bit_args(packed, absmax, blocksize, shape, dtype, nested_absmax, nested_code,
                             nested_offset, nested_blocksize);
  const at::Tensor p = packed.contiguous();
  const at::Tensor am = absmax.contiguous();
  std::optional<at::Tensor> na, nc, no;
  if (nested_absmax) na = nested_absmax->contiguous();
  if (nested_code) nc = nested_code->contiguous();
  if (nested_offset) no = nested_offset->contiguous();
  auto out = empty_large(shape, dtype);  // Note [Large CPU outputs]
  const int64_t n = out.numel();
  const AbsmaxSource src = absmax_source(am, na, nc, no, nested_blocksize);
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    dequantize_4bit_impl<T>(p.const_data_ptr<uint8_t>(), src, n, blocksize, qt, out.data_ptr<T>());
  });
  return out;
}

// ---------------------------------------------------------------- 8-bit blockwise

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_8bit_cpu(const at::Tensor& A,
                                                               const at::Tensor& code,
                                                               int64_t blocksize) {
  check_float_input(A, "A");
  check_blockwise_8bit_args(code, blocksize, A);
  check_code_sorted(code);
  const at::Tensor x = A.contiguous();
  const at::Tensor cd = code.contiguous();
  const int64_t n = x.numel();
  const int64_t nblocks = ceil_div(n, blocksize);
  auto q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  auto absmax = at::empty({nblocks}, x.options().dtype(at::kFloat));
  // bitsandbytes' 65536-entry table (see codes.h): entry i = quantize_8bit_scaled of the grid
  // value i, built by one merge over the sorted midpoints instead of a search per element.
  std::vector<uint8_t> lut(kLutSize);
  {
    const float* c = cd.const_data_ptr<float>();
    int k = 0;
    for (int i = 0; i < kLutSize; ++i) {
      const float v = lut_grid_value(i);
      while (k < 255 && 0.5f * (c[k] + c[k + 1]) < v) ++k;
      lut[i] = uint8_t(k);
    }
  }
  const uint8_t* table = lut.data();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* ap = absmax.data_ptr<float>();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    at::parallel_for(0, nblocks, grain_for(blocksize), [&](int64_t lo, int64_t hi) {
      for (int64_t blk = lo; blk < hi; ++blk) {
        const int64_t start = blk * blocksize, end = std::min(n, start + blocksize);
        float am = 0.0f;
        bool nan = false;
        for (int64_t i = start; i < end; ++i) {
          float v = to_f32(xp[i]);
          nan |= v != v;
          float a = v < 0 ? -v : v;
          am = a > am ? a : am;
        }
        ap[blk] = nan ? NAN : am;
        if (am == 0.0f) {  // bitsandbytes stores code 0 for an all-zero block
          std::memset(qp + start, 0, end - start);
          continue;
        }
        // Note [Tiny 8-bit blocks]: below 2^-128 the reciprocal overflows to inf, and x * inf is
        // no quotient (0 * inf is NaN, every other value +-1): such a block divides instead.
        // bitsandbytes multiplies there too; its codes for such a block are not x / absmax.
        const float inv = 1.0f / am;
        if (std::isinf(inv)) {
          for (int64_t i = start; i < end; ++i) qp[i] = table[lut_index(to_f32(xp[i]) / am)];
          continue;
        }
        for (int64_t i = start; i < end; ++i) qp[i] = table[lut_index(to_f32(xp[i]) * inv)];
      }
    });
  });
  TORCH_CHECK(n == 0 || at::isfinite(absmax).all().item<bool>(),
              "A contains NaN or Inf; blockwise quantization needs finite values");
  return {q, absmax};
}

at::Tensor dequantize_blockwise_8bit_cpu(const at::Tensor& A, const at::Tensor& absmax,
                                         const at::Tensor& code, int64_t blocksize,
                                         at::ScalarType dtype) {
  check_blockwise_8bit_args(code, blocksize, A);
  check_float_output_dtype(dtype);
  TORCH_CHECK(A.scalar_type() == at::kByte, "q must be uint8, got ", A.scalar_type());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "absmax must be float32, got ",
              absmax.scalar_type());
  TORCH_CHECK(absmax.numel() == ceil_div(A.numel(), blocksize), "absmax has ", absmax.numel(),
              " elements but q has ", A.numel(), " values in blocks of ", blocksize, ", needing ",
              ceil_div(A.numel(), blocksize));
  const at::Tensor q = A.contiguous(), am = absmax.contiguous(), cd = code.contiguous();
  auto out = empty_large(q.sizes(), dtype);
  const int64_t n = q.numel();
  const uint8_t* qp = q.const_data_ptr<uint8_t>();
  const float* ap = am.const_data_ptr<float>();
  const float* c = cd.const_data_ptr<float>();
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    T* op = out.data_ptr<T>();
    at::parallel_for(0, n, 16384, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) op[i] = from_f32<T>(c[qp[i]] * ap[i / blocksize]);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
  m.impl("quantize_blockwise_8bit", &quantize_blockwise_8bit_cpu);
  m.impl("dequantize_blockwise_8bit", &dequantize_blockwise_8bit_cpu);
}

}  // namespace qlora_ext::cpu
