// LoRA dropout on the GPU: the mask of Note [Dropout by seed] (cpp/lora_dropout.h), applied in
// place to an fp32 buffer. Memory-bound and trivial; one grid-stride loop.
#include "lora_dropout.h"
#include "lora_launchers.h"

namespace qlora_ext::cuda {
namespace {

// @kernel-budget lora_dropout_kernel: regs<=32 stack<=0 (elementwise hash and scale)
__global__ void lora_dropout_kernel(float* __restrict__ x, int64_t n, uint64_t seed,
                                    uint32_t threshold, float inv_keep) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    x[i] = dropout_keep(seed, uint64_t(i), threshold) ? x[i] * inv_keep : 0.f;
  }
}

}  // namespace

cudaError_t launch_lora_dropout_f32(float* x, int64_t n, uint64_t seed, uint32_t threshold,
                                    float inv_keep, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  // Enough blocks to fill any current GPU several times over; the loop covers the rest.
  const int64_t want = (n + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(want < 65536 ? want : 65536);
  lora_dropout_kernel<<<blocks, kThreads, 0, stream>>>(x, n, seed, threshold, inv_keep);
  return cudaGetLastError();
}

}  // namespace qlora_ext::cuda
