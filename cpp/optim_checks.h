// Argument checks shared by the CPU and CUDA optimizer ops; every message names the argument
// (the fake kernels in _ops.py check the same things).
#pragma once

#include <ATen/ATen.h>

#include "optim_math.h"
#include "quant_checks.h"

namespace qlora_ext {

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& param) {
  TORCH_CHECK(t.device() == param.device(), name, " is on ", t.device(), " but param is on ",
              param.device());
}

inline void check_state(const at::Tensor& t, const char* name, at::ScalarType dt, int64_t numel,
                        const at::Tensor& param) {
  TORCH_CHECK(t.scalar_type() == dt, name, " must be ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == numel, name, " has ", t.numel(), " elements, expected ", numel);
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (it is updated in place)");
  check_same_device(t, name, param);
}

inline void check_adamw_args(const at::Tensor& param, const at::Tensor& grad, int64_t step,
                             double lr, double beta1, double beta2, double eps,
                             double weight_decay) {
  check_float_input(param, "param");
  TORCH_CHECK(param.is_contiguous(), "param must be contiguous (it is updated in place)");
  TORCH_CHECK(grad.scalar_type() == param.scalar_type(), "grad must have param's dtype ",
              param.scalar_type(), ", got ", grad.scalar_type());
  TORCH_CHECK(grad.numel() == param.numel(), "grad has ", grad.numel(), " elements but param has ",
              param.numel());
  check_same_device(grad, "grad", param);
  TORCH_CHECK(step >= 1, "step must be >= 1 (1-based), got ", step);
  TORCH_CHECK(lr >= 0.0, "lr must be >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, "beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK(eps > 0.0, "eps must be > 0, got ", eps);
  TORCH_CHECK(weight_decay >= 0.0, "weight_decay must be >= 0, got ", weight_decay);
}

inline void check_adamw_8bit_states(const at::Tensor& param, const at::Tensor& exp_avg_q,
                                    const at::Tensor& exp_avg_absmax,
                                    const at::Tensor& exp_avg_sq_q,
                                    const at::Tensor& exp_avg_sq_absmax,
                                    const at::Tensor& code_signed,
                                    const at::Tensor& code_unsigned) {
  const int64_t n = param.numel(), nb = ceil_div(n, kOptimBlock);
  check_state(exp_avg_q, "exp_avg_q", at::kByte, n, param);
  check_state(exp_avg_absmax, "exp_avg_absmax", at::kFloat, nb, param);
  check_state(exp_avg_sq_q, "exp_avg_sq_q", at::kByte, n, param);
  check_state(exp_avg_sq_absmax, "exp_avg_sq_absmax", at::kFloat, nb, param);
  check_state(code_signed, "code_signed", at::kFloat, 256, param);
  check_state(code_unsigned, "code_unsigned", at::kFloat, 256, param);
}

// adamw_step_32bit's arguments: the scalars and gradient, and both fp32 states of the
// parameter's size on its device.
inline void check_adamw_32bit_args(const at::Tensor& param, const at::Tensor& grad,
                                   const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                                   int64_t step, double lr, double beta1, double beta2, double eps,
                                   double weight_decay) {
  check_adamw_args(param, grad, step, lr, beta1, beta2, eps, weight_decay);
  check_state(exp_avg, "exp_avg", at::kFloat, param.numel(), param);
  check_state(exp_avg_sq, "exp_avg_sq", at::kFloat, param.numel(), param);
}

// The list arguments of adamw_step_32bit_multi: equal lengths, then each tensor's own checks,
// with the failing index in the message.
inline void check_adamw_multi_args(at::TensorList params, at::TensorList grads,
                                   at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                   at::IntArrayRef steps, double lr, double beta1, double beta2,
                                   double eps, double weight_decay) {
  const size_t n = params.size();
  TORCH_CHECK(
      grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
      "params, grads, exp_avgs, exp_avg_sqs and steps must have the same length, got ", n, ", ",
      grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", steps.size());
  for (size_t i = 0; i < n; ++i) {
    try {
      check_adamw_32bit_args(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], steps[i], lr, beta1,
                             beta2, eps, weight_decay);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "tensor ", i, " of the lists: ", e.what_without_backtrace());
    }
    TORCH_CHECK(params[i].device() == params[0].device(), "params[", i, "] is on ",
                params[i].device(), " but params[0] is on ", params[0].device());
  }
}

}  // namespace qlora_ext
