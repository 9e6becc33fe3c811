// Plain C++ entry points to the CUDA AdamW kernels (no ATen; cuda/optim_ops.cpp is the glue).
//
// Skipping without a host sync: launch_count_nonfinite adds the number of non-finite gradient
// elements to a zeroed device counter, and the update kernels read that counter first and
// return at once if it is not 0. The counter is the op's result.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "optim_math.h"
#include "quant_launchers.h"

namespace qlora_ext::cuda {

cudaError_t launch_count_nonfinite(const void* g, DType dt, int64_t n, unsigned long long* count,
                                   cudaStream_t stream);

cudaError_t launch_adamw_32bit(void* p, const void* g, DType dt, float* m, float* v, int64_t n,
                               const AdamWScalars& s, const unsigned long long* skip,
                               cudaStream_t stream);

// qm/qv: n codes; am/av: ceil(n / kOptimBlock) absmax; cs/cu: the signed/unsigned 256-code maps.
cudaError_t launch_adamw_8bit(void* p, const void* g, DType dt, uint8_t* qm, float* am, uint8_t* qv,
                              float* av, const float* cs, const float* cu, int64_t n,
                              const AdamWScalars& s, const unsigned long long* skip,
                              cudaStream_t stream);

}  // namespace qlora_ext::cuda
