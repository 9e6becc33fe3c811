// Paged (CUDA managed) memory for optimizer states. Not tensor ops: plain helpers exposed through
// the pybind11 module (bindings.cpp). The CUDA part is cuda/paged_cuda.cpp; without CUDA a paged
// tensor is ordinary host memory.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace pybind11 {
class module_;
}

namespace qlora_ext::paged {

// Uninitialised, like at::empty. A CUDA `like` gets cudaMallocManaged memory, refused when the
// managed bytes already live on that device plus this request exceed its free memory minus
// margin_bytes (Note [Managed-memory budget]); zero elements give an ordinary empty CUDA tensor.
// A CPU `like` gets at::empty.
at::Tensor paged_empty(at::IntArrayRef shape, const at::Tensor& like, int64_t margin_bytes);

// cudaMemPrefetchAsync of t's bytes to its GPU (to_device) or to the host, on the current
// stream. A no-op for CPU tensors and for CUDA memory that is not managed.
void prefetch(const at::Tensor& t, bool to_device);

bool is_managed(const at::Tensor& t);

#ifdef QLORA_EXT_WITH_CUDA
// cuda/paged_cuda.cpp
at::Tensor managed_empty_cuda(at::IntArrayRef shape, const at::Tensor& like, int64_t margin_bytes);
void prefetch_cuda(const at::Tensor& t, bool to_device);
bool is_managed_cuda(const at::Tensor& t);
#endif

void register_bindings(pybind11::module_& m);

}  // namespace qlora_ext::paged
