// CPU kernels for the LoRA ops (TORCH_LIBRARY_IMPL CPU). The maths is in cpp/lora_impl.h; here
// only the dropout loop and the choice to run the base product in fp32: the CPU 4-bit GEMM
// accumulates in fp32 for every input dtype, so asking for an fp32 result costs nothing and y
// is rounded once, after the rank-r term is added (Note [LoRA accumulation]).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../lora_impl.h"
#include "cpu_isa.h"

namespace qlora_ext::cpu {
namespace {

// One pass of Note [Dropout by seed] over [lo, hi): d[i] = dropout(d[i]) (InPlace),
// d[i] = dropout(s[i]) (Into) or d[i] += dropout(s[i]) (Add; Note [Fused dropout passes]). In
// place reads d alone, so no run-time alias check can send the vectorized loop to its scalar
// fallback. The hash is integer arithmetic, the scaling a single rounded multiply and the add
// a single rounded add (no contraction), so every ISA's copy of this loop gives the same bits.
// The AVX-512 copy exists because the scalar hash was a tenth of a LoRA layer's time: fwd + bwd
// at 1024 x 576, r = 16, p = 0.1 took 15.4 ms with it and 14.0 ms without.
enum class Mode { InPlace, Into, Add };

template <Mode mode, typename T>
__attribute__((always_inline)) inline void dropout_range(const T* s, T* d, int64_t lo, int64_t hi,
                                                         uint64_t seed, uint32_t threshold,
                                                         T inv_keep) {
  for (int64_t i = lo; i < hi; ++i) {
    const T x = mode == Mode::InPlace ? d[i] : s[i];
    const T v = dropout_keep(seed, uint64_t(i), threshold) ? x * inv_keep : T(0);
    if constexpr (mode == Mode::Add) {
      d[i] += v;
    } else {
      d[i] = v;
    }
  }
}

#if QX_X86
// The same loop inlined into an AVX-512 function, where GCC vectorizes the 64-bit hash
// (vpmullq). AVX2 has no 64-bit multiply: its emulated copy measured no faster than scalar.
template <Mode mode, typename T>
QX_TARGET_AVX512 void dropout_range_avx512(const T* s, T* d, int64_t lo, int64_t hi, uint64_t seed,
                                           uint32_t threshold, T inv_keep) {
  dropout_range<mode>(s, d, lo, hi, seed, threshold, inv_keep);
}
#endif

template <Mode mode, typename T>
void dropout_loop(const T* s, T* d, int64_t n, uint64_t seed, uint32_t threshold, T inv_keep) {
  const Isa isa = current_isa();
  at::parallel_for(0, n, int64_t(1) << 14, [&](int64_t lo, int64_t hi) {
#if QX_X86
    if (isa == Isa::Avx512) {
      return dropout_range_avx512<mode>(s, d, lo, hi, seed, threshold, inv_keep);
    }
#endif
    dropout_range<mode>(s, d, lo, hi, seed, threshold, inv_keep);
  });
}

template <Mode mode>
void dropout_pass(const at::Tensor& src, at::Tensor& dst, uint64_t seed, uint32_t threshold,
                  double inv_keep) {
  TORCH_CHECK(src.is_contiguous() && dst.is_contiguous() && src.numel() == dst.numel(),
              "lora dropout needs contiguous buffers of one size");
  TORCH_CHECK(src.scalar_type() == dst.scalar_type(),
              "lora dropout buffers differ in dtype: ", src.scalar_type(), " and ",
              dst.scalar_type());
  if (dst.scalar_type() == at::kDouble) {
    dropout_loop<mode>(src.const_data_ptr<double>(), dst.data_ptr<double>(), dst.numel(), seed,
                       threshold, inv_keep);
  } else {
    TORCH_CHECK(dst.scalar_type() == at::kFloat, "lora dropout buffer must be fp32 or fp64, got ",
                dst.scalar_type());
    dropout_loop<mode>(src.const_data_ptr<float>(), dst.data_ptr<float>(), dst.numel(), seed,
                       threshold, static_cast<float>(inv_keep));
  }
}

void dropout_cpu(at::Tensor& t, uint64_t seed, uint32_t threshold, double inv_keep) {
  dropout_pass<Mode::InPlace>(t, t, seed, threshold, inv_keep);
}

void dropout_into_cpu(const at::Tensor& src, at::Tensor& dst, uint64_t seed, uint32_t threshold,
                      double inv_keep) {
  dropout_pass<Mode::Into>(src, dst, seed, threshold, inv_keep);
}

void dropout_add_cpu(const at::Tensor& src, at::Tensor& dst, uint64_t seed, uint32_t threshold,
                     double inv_keep) {
  dropout_pass<Mode::Add>(src, dst, seed, threshold, inv_keep);
}

const LoraBackend kCpu{true, &dropout_cpu, nullptr, &dropout_into_cpu, &dropout_add_cpu};

std::tuple<at::Tensor, at::Tensor> lora_4bit_forward_cpu(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t N, int64_t K,
    int64_t blocksize, c10::string_view quant_type, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scale, double dropout_p, const std::optional<at::Tensor>& seed,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& nested_absmax,
    const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& nested_offset,
    int64_t nested_blocksize) {
  const Weight4Ref w{
      packed,        absmax,          N, K, blocksize, quant_type, nested_absmax, nested_code,
      nested_offset, nested_blocksize};
  return lora_forward(kCpu, x, w, lora_A, lora_B, scale, dropout_p, seed, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_4bit_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& xa, const at::Tensor& packed,
    const at::Tensor& absmax, int64_t N, int64_t K, int64_t blocksize, c10::string_view quant_type,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& nested_absmax,
    const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& nested_offset,
    int64_t nested_blocksize) {
  const Weight4Ref w{
      packed,        absmax,          N, K, blocksize, quant_type, nested_absmax, nested_code,
      nested_offset, nested_blocksize};
  return lora_backward(kCpu, grad_out, x, xa, w, lora_A, lora_B, scale, dropout_p, seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CPU, m) {
  m.impl("lora_4bit_forward", &lora_4bit_forward_cpu);
  m.impl("lora_4bit_backward", &lora_4bit_backward_cpu);
}

}  // namespace qlora_ext::cpu
