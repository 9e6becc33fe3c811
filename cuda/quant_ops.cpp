// ATen glue for the CUDA quantization kernels (TORCH_LIBRARY_IMPL CUDA): argument checks,
// allocation, device guard and the current stream. The kernels are in quant_kernels.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_glue.h"
#include "quant_checks.h"
#include "quant_launchers.h"

namespace qlora_ext::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& A, int64_t blocksize,
                                                      c10::string_view quant_type) {
  check_blocksize_4bit(blocksize);
  const QuantType qt = parse_quant_type(std::string(quant_type));
  check_float_input(A, "w");
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor x = A.contiguous();
  const int64_t n = x.numel();
  auto packed = at::empty({ceil_div(n, 2)}, x.options().dtype(at::kByte));
  auto absmax = at::empty({ceil_div(n, blocksize)}, x.options().dtype(at::kFloat));
  check_launch(launch_quantize_4bit(x.const_data_ptr(), to_dtype(x.scalar_type()), n, blocksize, qt,
                                    packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                    c10::cuda::getCurrentCUDAStream()),
               "quantize_4bit");
  // One small device-to-host read; quantization runs once per weight, never in a training step.
  TORCH_CHECK(n == 0 || at::isfinite(absmax).all().item<bool>(),
              "w contains NaN or Inf; 4-bit quantization needs finite values");
  return {packed, absmax};
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                                int64_t blocksize, c10::string_view quant_type,
                                at::IntArrayRef shape, at::ScalarType dtype,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code,
                                const std::optional<at::Tensor>& nested_offset,
                                int64_t nested_blocksize) {
  const QuantType qt = parse_quant_type(std::string(quant_type));
  check_dequantize_4bit_args(packed, absmax, blocksize, shape, dtype, nested_absmax, nested_code,
                             nested_offset, nested_blocksize);
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor p = packed.contiguous(), am = absmax.contiguous();
  std::optional<at::Tensor> na, nc, no;
  if (nested_absmax) na = nested_absmax->contiguous();
  if (nested_code) nc = nested_code->contiguous();
  if (nested_offset) no = nested_offset->contiguous();
  const NestedAbsmax nested = nested_view(am, na, nc, no, nested_blocksize);
  auto out = at::empty(shape, packed.options().dtype(dtype));
  const int64_t n = out.numel();
  check_launch(launch_dequantize_4bit(p.const_data_ptr<uint8_t>(),
                                      nested.codes ? nullptr : am.const_data_ptr<float>(), nested,
                                      Slice{0, 1, n, 0, n}, blocksize, qt, out.data_ptr(),
                                      to_dtype(dtype), c10::cuda::getCurrentCUDAStream()),
               "dequantize_4bit");
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_8bit_cuda(const at::Tensor& A,
                                                                const at::Tensor& code,
                                                                int64_t blocksize) {
  check_float_input(A, "A");
  check_blockwise_8bit_args(code, blocksize, A);
  check_code_sorted(code);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor x = A.contiguous(), cd = code.contiguous();
  const int64_t n = x.numel();
  auto q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  auto absmax = at::empty({ceil_div(n, blocksize)}, x.options().dtype(at::kFloat));
  check_launch(
      launch_quantize_blockwise_8bit(x.const_data_ptr(), to_dtype(x.scalar_type()), n, blocksize,
                                     cd.const_data_ptr<float>(), q.data_ptr<uint8_t>(),
                                     absmax.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
      "quantize_blockwise_8bit");
  TORCH_CHECK(n == 0 || at::isfinite(absmax).all().item<bool>(),
              "A contains NaN or Inf; blockwise quantization needs finite values");
  return {q, absmax};
}

at::Tensor dequantize_blockwise_8bit_cuda(const at::Tensor& A, const at::Tensor& absmax,
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
  TORCH_CHECK(absmax.device() == A.device(), "absmax is on ", absmax.device(), " but q is on ",
              A.device());
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor q = A.contiguous(), am = absmax.contiguous(), cd = code.contiguous();
  auto out = at::empty(q.sizes(), q.options().dtype(dtype));
  check_launch(
      launch_dequantize_blockwise_8bit(
          q.const_data_ptr<uint8_t>(), am.const_data_ptr<float>(), cd.const_data_ptr<float>(),
          q.numel(), blocksize, out.data_ptr(), to_dtype(dtype), c10::cuda::getCurrentCUDAStream()),
      "dequantize_blockwise_8bit");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) {
  m.impl("quantize_4bit", &quantize_4bit_cuda);
  m.impl("dequantize_4bit", &dequantize_4bit_cuda);
  m.impl("quantize_blockwise_8bit", &quantize_blockwise_8bit_cuda);
  m.impl("dequantize_blockwise_8bit", &dequantize_blockwise_8bit_cuda);
}

}  // namespace qlora_ext::cuda
