// Argument validation shared by the CPU and CUDA implementations of the quantization ops.
// Every message names the argument and what was expected (the fake kernels in _ops.py check
// the same things, so torch.compile traces fail with the same words).
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "codes.h"

namespace qlora_ext {

inline QuantType parse_quant_type(const std::string& s) {
  if (s == "nf4") return QuantType::NF4;
  if (s == "fp4") return QuantType::FP4;
  if (s == "int4") return QuantType::INT4;
  TORCH_CHECK(false, "quant_type must be 'nf4', 'fp4' or 'int4', got '", s, "'");
}

inline void check_blocksize_4bit(int64_t blocksize) {
  TORCH_CHECK(blocksize == 32 || blocksize == 64 || blocksize == 128 || blocksize == 256 ||
                  blocksize == 512 || blocksize == 1024 || blocksize == 2048 || blocksize == 4096,
              "blocksize must be one of 32, 64, 128, 256, 512, 1024, 2048, 4096, got ", blocksize);
}

inline void check_float_input(const at::Tensor& t, const char* name) {
  auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", dt);
}

inline void check_float_output_dtype(at::ScalarType dt) {
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "dtype must be float32, float16 or bfloat16, got ", dt);
}

inline int64_t shape_numel(at::IntArrayRef shape) {
  int64_t n = 1;
  for (auto d : shape) {
    TORCH_CHECK(d >= 0, "shape must not have negative sizes, got ", shape);
    // A product that wraps could equal the bytes given and pass the size checks below.
    TORCH_CHECK(!__builtin_mul_overflow(n, d, &n), "shape ", shape,
                " has more elements than an int64 holds");
  }
  return n;
}

// Where the fp32 per-block scale of a 4-bit tensor comes from: stored directly (fp32 absmax),
// or double-quantized (uint8 codes + per-group fp32 scale + offset).
struct AbsmaxSource {
  const float* absmax_f32 = nullptr;
  const uint8_t* absmax_u8 = nullptr;
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;
  const float* nested_offset = nullptr;  // one element
  int64_t nested_blocksize = 256;
};

inline void check_dequantize_4bit_args(const at::Tensor& packed, const at::Tensor& absmax,
                                       int64_t blocksize, at::IntArrayRef shape,
                                       at::ScalarType dtype,
                                       const std::optional<at::Tensor>& nested_absmax,
                                       const std::optional<at::Tensor>& nested_code,
                                       const std::optional<at::Tensor>& nested_offset,
                                       int64_t nested_blocksize) {
  check_blocksize_4bit(blocksize);
  check_float_output_dtype(dtype);
  TORCH_CHECK(packed.scalar_type() == at::kByte, "packed must be uint8, got ",
              packed.scalar_type());
  int64_t n = shape_numel(shape);
  TORCH_CHECK(packed.numel() == ceil_div(n, 2), "packed has ", packed.numel(), " bytes but shape ",
              shape, " needs ", ceil_div(n, 2));
  TORCH_CHECK(absmax.numel() == ceil_div(n, blocksize), "absmax has ", absmax.numel(),
              " elements but shape ", shape, " with blocksize ", blocksize, " needs ",
              ceil_div(n, blocksize));
  TORCH_CHECK(absmax.device() == packed.device(), "absmax is on ", absmax.device(),
              " but packed is on ", packed.device());
  bool nested = absmax.scalar_type() == at::kByte;
  TORCH_CHECK(nested || absmax.scalar_type() == at::kFloat,
              "absmax must be float32 (plain) or uint8 (double-quantized), got ",
              absmax.scalar_type());
  if (!nested) {
    TORCH_CHECK(!nested_absmax.has_value() && !nested_code.has_value(),
                "nested_absmax/nested_code are only valid with uint8 absmax");
    return;
  }
  TORCH_CHECK(nested_absmax.has_value() && nested_code.has_value() && nested_offset.has_value(),
              "a uint8 (double-quantized) absmax needs nested_absmax, nested_code and "
              "nested_offset");
  TORCH_CHECK(nested_blocksize > 0, "nested_blocksize must be positive, got ", nested_blocksize);
  const auto& na = *nested_absmax;
  const auto& nc = *nested_code;
  const auto& no = *nested_offset;
  TORCH_CHECK(na.scalar_type() == at::kFloat, "nested_absmax must be float32, got ",
              na.scalar_type());
  TORCH_CHECK(na.numel() == ceil_div(absmax.numel(), nested_blocksize), "nested_absmax has ",
              na.numel(), " elements but ", absmax.numel(), " absmax codes in groups of ",
              nested_blocksize, " need ", ceil_div(absmax.numel(), nested_blocksize));
  TORCH_CHECK(nc.scalar_type() == at::kFloat && nc.numel() == 256,
              "nested_code must be a float32 tensor of 256 values, got ", nc.scalar_type(), " ",
              nc.sizes());
  TORCH_CHECK(no.scalar_type() == at::kFloat && no.numel() == 1,
              "nested_offset must be a float32 tensor of one value, got ", no.scalar_type(), " ",
              no.sizes());
  for (const at::Tensor* t : {&na, &nc, &no}) {
    TORCH_CHECK(t->device() == packed.device(), "nested state is on ", t->device(),
                " but packed is on ", packed.device());
  }
}

// quantize_blockwise_8bit's code: its nearest-code search assumes 256 sorted values, and an
// unsorted (or NaN) table would silently give wrong codes. 256 host reads (a copy on CUDA, where
// quantization runs once per weight).
inline void check_code_sorted(const at::Tensor& code) {
  const at::Tensor c = code.to(at::kCPU).contiguous();
  const float* p = c.const_data_ptr<float>();
  for (int i = 0; i + 1 < 256; ++i) {
    TORCH_CHECK(p[i] <= p[i + 1],
                "code must be sorted in ascending order (and hold no NaN): ", "code[", i,
                "] = ", p[i], ", code[", i + 1, "] = ", p[i + 1]);
  }
}

inline void check_blockwise_8bit_args(const at::Tensor& code, int64_t blocksize,
                                      const at::Tensor& ref) {
  TORCH_CHECK(blocksize > 0, "blocksize must be positive, got ", blocksize);
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 256,
              "code must be a float32 tensor of 256 sorted values, got ", code.scalar_type(), " ",
              code.sizes());
  TORCH_CHECK(code.device() == ref.device(), "code is on ", code.device(), " but the data is on ",
              ref.device());
}

}  // namespace qlora_ext
