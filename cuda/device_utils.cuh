// Element conversions shared by the CUDA kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "codes.h"
#include "quant_launchers.h"

namespace qlora_ext::cuda {

// The one switch from a run-time dtype to the three element types the kernels are compiled
// for: f receives a value of that type as a tag. Returns the status of what f launched.
template <typename F>
cudaError_t dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::F32:
      f(float{});
      break;
    case DType::F16:
      f(__half{});
      break;
    case DType::BF16:
      f(__nv_bfloat16{});
      break;
  }
  return cudaGetLastError();
}

// Copy a kernel's CodeTable parameter into shared memory with compile-time indices only: a
// run-time index into a by-value kernel parameter makes the compiler copy the whole struct to
// local memory (a stack frame) in every thread.
__device__ __forceinline__ void load_code_table(const CodeTable& c, float* value,
                                                uint8_t* sorted_code) {
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      value[i] = c.value[i];
      sorted_code[i] = c.sorted_code[i];
    }
  }
}

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

}  // namespace qlora_ext::cuda
