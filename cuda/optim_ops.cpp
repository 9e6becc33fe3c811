// ATen glue for the CUDA AdamW kernels (TORCH_LIBRARY_IMPL CUDA): checks, device guard, the
// current stream, and the device-side skip counter that is also the op's result (no host sync).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "cuda_glue.h"
#include "optim_checks.h"
#include "optim_launchers.h"

namespace qlora_ext::cuda {
namespace {

// The counter is an int64 tensor; the kernels add to it as unsigned 64-bit (same bytes).
unsigned long long* counter_ptr(at::Tensor& c) {
  return reinterpret_cast<unsigned long long*>(c.data_ptr<int64_t>());
}

// One tensor's count and update kernels on the current stream, arguments already checked.
at::Tensor adamw_32bit_launch(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                              at::Tensor& exp_avg_sq, int64_t step, double lr, double beta1,
                              double beta2, double eps, double weight_decay) {
  const c10::cuda::CUDAGuard guard(param.device());
  const at::Tensor g = grad.contiguous();
  auto skipped = at::zeros({}, param.options().dtype(at::kLong));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const DType dt = to_dtype(param.scalar_type());
  check_launch(
      launch_count_nonfinite(g.const_data_ptr(), dt, g.numel(), counter_ptr(skipped), stream),
      "adamw_step_32bit (non-finite count)");
  check_launch(
      launch_adamw_32bit(param.data_ptr(), g.const_data_ptr(), dt, exp_avg.data_ptr<float>(),
                         exp_avg_sq.data_ptr<float>(), param.numel(),
                         adamw_scalars(step, lr, beta1, beta2, eps, weight_decay),
                         counter_ptr(skipped), stream),
      "adamw_step_32bit");
  return skipped;
}

at::Tensor adamw_step_32bit_cuda(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                                 at::Tensor& exp_avg_sq, int64_t step, double lr, double beta1,
                                 double beta2, double eps, double weight_decay) {
  check_adamw_32bit_args(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps,
                         weight_decay);
  return adamw_32bit_launch(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps,
                            weight_decay);
}

// One launch pair per tensor for now (a multi-tensor-apply kernel is future work); the call
// still saves the per-op dispatch of hundreds of small adapter tensors.
at::Tensor adamw_step_32bit_multi_cuda(at::TensorList params, at::TensorList grads,
                                       at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                       at::IntArrayRef steps, double lr, double beta1, double beta2,
                                       double eps, double weight_decay) {
  check_adamw_multi_args(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps,
                         weight_decay);
  std::vector<at::Tensor> counts;  // the dispatcher never brings empty lists here
  counts.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor p = params[i], m = exp_avgs[i], v = exp_avg_sqs[i];
    counts.push_back(
        adamw_32bit_launch(p, grads[i], m, v, steps[i], lr, beta1, beta2, eps, weight_decay));
  }
  return at::stack(counts);
}

at::Tensor adamw_step_8bit_blockwise_cuda(at::Tensor& param, const at::Tensor& grad,
                                          at::Tensor& exp_avg_q, at::Tensor& exp_avg_absmax,
                                          at::Tensor& exp_avg_sq_q, at::Tensor& exp_avg_sq_absmax,
                                          const at::Tensor& code_signed,
                                          const at::Tensor& code_unsigned, int64_t step, double lr,
                                          double beta1, double beta2, double eps,
                                          double weight_decay) {
  check_adamw_args(param, grad, step, lr, beta1, beta2, eps, weight_decay);
  check_adamw_8bit_states(param, exp_avg_q, exp_avg_absmax, exp_avg_sq_q, exp_avg_sq_absmax,
                          code_signed, code_unsigned);
  const c10::cuda::CUDAGuard guard(param.device());
  const at::Tensor g = grad.contiguous();
  auto skipped = at::zeros({}, param.options().dtype(at::kLong));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const DType dt = to_dtype(param.scalar_type());
  check_launch(
      launch_count_nonfinite(g.const_data_ptr(), dt, g.numel(), counter_ptr(skipped), stream),
      "adamw_step_8bit_blockwise (non-finite count)");
  check_launch(
      launch_adamw_8bit(param.data_ptr(), g.const_data_ptr(), dt, exp_avg_q.data_ptr<uint8_t>(),
                        exp_avg_absmax.data_ptr<float>(), exp_avg_sq_q.data_ptr<uint8_t>(),
                        exp_avg_sq_absmax.data_ptr<float>(), code_signed.const_data_ptr<float>(),
                        code_unsigned.const_data_ptr<float>(), param.numel(),
                        adamw_scalars(step, lr, beta1, beta2, eps, weight_decay),
                        counter_ptr(skipped), stream),
      "adamw_step_8bit_blockwise");
  return skipped;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) {
  m.impl("adamw_step_32bit", &adamw_step_32bit_cuda);
  m.impl("adamw_step_32bit_multi", &adamw_step_32bit_multi_cuda);
  m.impl("adamw_step_8bit_blockwise", &adamw_step_8bit_blockwise_cuda);
}

}  // namespace qlora_ext::cuda
