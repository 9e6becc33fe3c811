// CUDA half of the paged-memory helpers: cudaMallocManaged allocations handed to torch through
// from_blob, and cudaMemPrefetchAsync (CUDA 12's and 13's forms), charged against the
// managed-memory budget (cpp/managed_budget.h). No kernels.
#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <climits>
#include <mutex>
#include <sstream>
#include <unordered_map>

#include "managed_budget.h"
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
    TORCH_CHECK(d == 0 || numel <= INT64_MAX / d, "shape ", shape, " has too many elements");
    numel *= d;
  }
  // Nothing to page: an ordinary (pointer-free) CUDA tensor, since from_blob refuses a null
  // pointer on CUDA. It is not managed, and prefetching it is a no-op.
  if (numel == 0) return at::empty(shape, like.options());
  TORCH_CHECK(numel <= INT64_MAX / int64_t(like.element_size()), "shape ", shape, " is too large");
  const size_t bytes = size_t(numel) * like.element_size();
  const int device = like.device().index();
  // Note [Managed-memory budget]: charge the running total before asking the driver.
  auto free_bytes = [](int, bool after_emptying_cache) {
    if (after_emptying_cache) c10::cuda::CUDACachingAllocator::emptyCache();
    size_t free_b = 0, total_b = 0;
    check_cuda(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    return free_b;
  };
  std::ostringstream what;
  what << "paged allocation of shape " << shape;
  managed_budget().reserve(device, bytes, size_t(margin_bytes), free_bytes, what.str());
  void* ptr = nullptr;
  const cudaError_t err = cudaMallocManaged(&ptr, bytes, cudaMemAttachGlobal);
  if (err != cudaSuccess) {
    managed_budget().release(device, bytes);
    (void)cudaGetLastError();
    check_cuda(err, "cudaMallocManaged");
  }
  return at::from_blob(
      ptr, shape,
      [device, bytes](void* p) {
        cudaFree(p);
        try {  // a deleter must not throw; release() only throws on a double free
          managed_budget().release(device, bytes);
        } catch (const c10::Error&) {
        }
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
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
#if CUDART_VERSION >= 13000
  // CUDA 13 removed the device-ordinal form in favour of cudaMemLocation.
  cudaMemLocation loc{};
  if (to_device) {
    loc.type = cudaMemLocationTypeDevice;
    loc.id = device;
  } else {
    loc.type = cudaMemLocationTypeHost;
    loc.id = 0;
  }
  check_cuda(cudaMemPrefetchAsync(t.data_ptr(), t.nbytes(), loc, 0, stream),
             "cudaMemPrefetchAsync");
#else
  check_cuda(
      cudaMemPrefetchAsync(t.data_ptr(), t.nbytes(), to_device ? device : cudaCpuDeviceId, stream),
      "cudaMemPrefetchAsync");
#endif
}

}  // namespace qlora_ext::paged
