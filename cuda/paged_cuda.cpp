// CUDA half of the paged-memory helpers: cudaMallocManaged allocations handed to torch through
// from_blob, and cudaMemPrefetchAsync with CUDA 13's cudaMemLocation. No kernels.
#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <mutex>
#include <unordered_map>

#include "paged.h"

namespace qlora_ext::paged {
namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

// Queried once per device: prefetching on a device without concurrent managed access (e.g.
// Windows, some virtualised GPUs) is an error, and pages then migrate on demand instead.
bool concurrent_managed_access(int device) {
  static std::mutex mu;
  static std::unordered_map<int, bool> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  int value = 0;
  check_cuda(cudaDeviceGetAttribute(&value, cudaDevAttrConcurrentManagedAccess, device),
             "cudaDeviceGetAttribute(cudaDevAttrConcurrentManagedAccess)");
  cache[device] = value != 0;
  return value != 0;
}

}  // namespace

at::Tensor managed_empty_cuda(at::IntArrayRef shape, const at::Tensor& like, int64_t margin_bytes) {
  const c10::cuda::CUDAGuard guard(like.device());
  int64_t numel = 1;
  for (int64_t d : shape) {
    TORCH_CHECK(d >= 0, "shape must not have negative sizes, got ", shape);
    numel *= d;
  }
  const size_t bytes = size_t(numel) * like.element_size();
  size_t free_b = 0, total_b = 0;
  check_cuda(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
  // Managed memory can oversubscribe the GPU, but the optimizer states are meant to live there
  // between page-ins; asking for more than what is free (less the caller's margin for
  // activations) would only thrash, so it is refused with the numbers.
  // PyTorch's caching allocator may hold much of the card in blocks it is not using (the
  // states are created in step(), right after backward): driver-free memory leaves them out, so
  // before refusing, the cache is handed back and free memory read again.
  const size_t margin = size_t(margin_bytes);
  size_t allowed = free_b > margin ? free_b - margin : 0;
  if (bytes > allowed) {
    c10::cuda::CUDACachingAllocator::emptyCache();
    check_cuda(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    allowed = free_b > margin ? free_b - margin : 0;
  }
  TORCH_CHECK(bytes <= allowed, "paged allocation of ", bytes, " bytes (shape ", shape,
              ") exceeds the free GPU memory of device ", like.device().index(), " (", free_b,
              " bytes) minus margin_bytes (", margin_bytes,
              "); lower margin_bytes or free GPU memory");
  void* ptr = nullptr;
  if (bytes > 0) {
    check_cuda(cudaMallocManaged(&ptr, bytes, cudaMemAttachGlobal), "cudaMallocManaged");
  }
  return at::from_blob(
      ptr, shape,
      [](void* p) {
        if (p) cudaFree(p);
      },
      like.options());
}

bool is_managed_cuda(const at::Tensor& t) {
  if (t.numel() == 0) return false;
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, t.data_ptr()) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error state of a failed query
    return false;
  }
  return attr.type == cudaMemoryTypeManaged;
}

void prefetch_cuda(const at::Tensor& t, bool to_device) {
  if (t.numel() == 0 || !is_managed_cuda(t)) return;
  const int device = t.device().index();
  if (!concurrent_managed_access(device)) {
    TORCH_WARN_ONCE("qlora_ext: device ", device,
                    " has no concurrent managed access (cudaDevAttrConcurrentManagedAccess = 0); "
                    "paged optimizer states are not prefetched and migrate on demand");
    return;
  }
  const c10::cuda::CUDAGuard guard(t.device());
  cudaMemLocation loc{};
  if (to_device) {
    loc.type = cudaMemLocationTypeDevice;
    loc.id = device;
  } else {
    loc.type = cudaMemLocationTypeHost;
    loc.id = 0;
  }
  check_cuda(cudaMemPrefetchAsync(t.data_ptr(), t.nbytes(), loc, 0,
                                  c10::cuda::getCurrentCUDAStream(device).stream()),
             "cudaMemPrefetchAsync");
}

}  // namespace qlora_ext::paged
