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
void adamw_32bit_impl(T* p, const T* g, float* m, float* v, int64_t n, const AdamWScalars& s) {
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      float pi = to_f32(p[i]);
      adamw_element(pi, to_f32(g[i]), m[i], v[i], s);
      p[i] = from_f32<T>(pi);
    }
  });
}

std::array<float, kNumMidpoints> midpoints(const float* code) {
  std::array<float, kNumMidpoints> mid;
  for (int k = 0; k < kNumMidpoints; ++k) mid[k] = code_midpoint(code, k);
  return mid;
}

template <typename T>
void adamw_8bit_impl(T* p, const T* g, uint8_t* qm, float* am, uint8_t* qv, float* av,
                     const float* cs, const float* cu, int64_t n, const AdamWScalars& s) {
  const int64_t nblocks = ceil_div(n, kOptimBlock);
  const auto mid_s = midpoints(cs), mid_u = midpoints(cu);
  at::parallel_for(0, nblocks, kGrain / kOptimBlock, [&](int64_t lo, int64_t hi) {
    float m[kOptimBlock], v[kOptimBlock];
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t start = blk * kOptimBlock;
      const int64_t len = std::min<int64_t>(kOptimBlock, n - start);
      float m_max = 0.0f, v_max = 0.0f;
      for (int64_t k = 0; k < len; ++k) {
        const int64_t i = start + k;
        m[k] = dequantize_code(cs, qm[i], am[blk]);
        v[k] = dequantize_code(cu, qv[i], av[blk]);
        float pi = to_f32(p[i]);
        adamw_element(pi, to_f32(g[i]), m[k], v[k], s);
        p[i] = from_f32<T>(pi);
        const float a = m[k] < 0.0f ? -m[k] : m[k];
        m_max = a > m_max ? a : m_max;
        v_max = v[k] > v_max ? v[k] : v_max;
      }
      am[blk] = m_max;
      av[blk] = v_max;
      for (int64_t k = 0; k < len; ++k) {
        qm[start + k] = quantize_nearest(mid_s.data(), m[k], m_max);
        qv[start + k] = quantize_nearest(mid_u.data(), v[k], v_max);
      }
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
