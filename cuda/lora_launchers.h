// Plain C++ entry point to the CUDA LoRA dropout kernel (no ATen; cuda/lora_ops.cpp calls it).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qlora_ext::cuda {

// In place on n fp32 values: x[i] *= dropout_keep(seed, i, threshold) ? inv_keep : 0.
cudaError_t launch_lora_dropout_f32(float* x, int64_t n, uint64_t seed, uint32_t threshold,
                                    float inv_keep, cudaStream_t stream);

}  // namespace qlora_ext::cuda
