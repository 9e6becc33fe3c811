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

// One pass of Note [Dropout by seed] over d[lo, hi). The hash is integer arithmetic and the
// scaling a single rounded multiply (no contraction), so every ISA's copy of this loop gives
// the same bits. The AVX-512 copy exists because the scalar hash was a tenth of a LoRA layer's
// time: fwd + bwd at 1024 x 576, r = 16, p = 0.1 took 15.4 ms with it and 14.0 ms without.
template <typename T>
inline void dropout_range(T* d, int64_t lo, int64_t hi, uint64_t seed, uint32_t threshold,
                          T inv_keep) {
  for (int64_t i = lo; i < hi; ++i) {
    d[i] = dropout_keep(seed, uint64_t(i), threshold) ? d[i] * inv_keep : T(0);
  }
}

#if QX_X86
// The same loop compiled for AVX-512, where GCC vectorizes the 64-bit hash (vpmullq). AVX2
// has no 64-bit multiply: its emulated copy measured no faster than the scalar loop.
template <typename T>
QX_TARGET_AVX512 void dropout_range_avx512(T* d, int64_t lo, int64_t hi, uint64_t seed,
                                           uint32_t threshold, T inv_keep) {
  for (int64_t i = lo; i < hi; ++i) {
    d[i] = dropout_keep(seed, uint64_t(i), threshold) ? d[i] * inv_keep : T(0);
  }
}
#endif

template <typename T>
void dropout_loop(T* d, int64_t n, uint64_t seed, uint32_t threshold, T inv_keep) {
  const Isa isa = current_isa();
  at::parallel_for(0, n, int64_t(1) << 14, [&](int64_t lo, int64_t hi) {
#if QX_X86
    if (isa == Isa::Avx512) return dropout_range_avx512(d, lo, hi, seed, threshold, inv_keep);
#endif
    dropout_range(d, lo, hi, seed, threshold, inv_keep);
  });
}

void dropout_cpu(at::Tensor& t, uint64_t seed, uint32_t threshold, double inv_keep) {
  TORCH_CHECK(t.is_contiguous(), "lora dropout needs a contiguous buffer");
  if (t.scalar_type() == at::kDouble) {
    dropout_loop(t.data_ptr<double>(), t.numel(), seed, threshold, inv_keep);
  } else {
    TORCH_CHECK(t.scalar_type() == at::kFloat, "lora dropout buffer must be fp32 or fp64, got ",
                t.scalar_type());
    dropout_loop(t.data_ptr<float>(), t.numel(), seed, threshold, static_cast<float>(inv_keep));
  }
}

const LoraBackend kCpu{true, &dropout_cpu};

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
