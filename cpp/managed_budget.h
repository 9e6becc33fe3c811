// The managed-memory budget: a per-device running total of live cudaMallocManaged bytes, and the
// rule that refuses an allocation which would take it past the device's free memory. Device
// independent (no CUDA headers), so the CPU tests drive it with an injected free-memory source.
//
// Note [Managed-memory budget]
// Asking the driver for more managed memory than the GPU has free can hang the whole GPU, not
// just the process, so every paged allocation is checked here first. A check against
// cudaMemGetInfo alone is not enough: managed pages are committed only when first touched (the
// optimizer's asynchronous zero_()), so states created one after another in one step() all see
// nearly the same free value, and together they could exceed it. The rule therefore counts what
// this process has already asked for:
//
//     live[device] + bytes  <=  free(device) - margin
//
// where free is read after PyTorch's cache is handed back (the free value is read once more
// only if the first read refuses, since emptying the cache synchronizes). Pages already resident
// are counted twice (in live and as used memory), so the rule errs on the side of refusing: the
// states it guards are the optimizer's, created once, and a refusal names the figures.
#pragma once

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>

namespace qlora_ext::paged {

class ManagedBudget {
 public:
  // free_bytes(device, after_emptying_cache): the device's free memory, after handing
  // PyTorch's cached blocks back when the flag is set.
  using FreeBytes = std::function<size_t(int device, bool after_emptying_cache)>;

  // Adds `bytes` to the device's live total, or throws (c10::Error) with the figures. `what`
  // describes the request for the message ("paged allocation of shape [..]").
  void reserve(int device, size_t bytes, size_t margin, const FreeBytes& free_bytes,
               const std::string& what) {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t live = live_[device];
    size_t free_b = free_bytes(device, false);
    if (!fits(live, bytes, free_b, margin)) {
      free_b = free_bytes(device, true);
    }
    TORCH_CHECK(fits(live, bytes, free_b, margin), what, " of ", bytes,
                " bytes refused on cuda:", device, ": the ", live,
                " bytes of managed memory already live plus this request would exceed the ", free_b,
                " bytes free on the device minus margin_bytes (", margin,
                "). Asking for more managed memory than the GPU has free can hang it; free GPU "
                "memory, lower margin_bytes, or page fewer states (min_paged_numel)");
    live_[device] = live + bytes;
  }

  // Called when a reserved allocation is freed (or its cudaMallocManaged failed).
  void release(int device, size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    size_t& live = live_[device];
    TORCH_CHECK(bytes <= live, "managed-memory budget: releasing ", bytes,
                " bytes on cuda:", device, " but only ", live,
                " are live (an allocation freed twice?)");
    live -= bytes;
  }

  size_t live(int device) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(device);
    return it == live_.end() ? 0 : it->second;
  }

 private:
  static bool fits(size_t live, size_t bytes, size_t free_b, size_t margin) {
    const size_t allowed = free_b > margin ? free_b - margin : 0;
    return live <= allowed && bytes <= allowed - live;  // no overflow in live + bytes
  }

  mutable std::mutex mu_;
  std::map<int, size_t> live_;
};

// The process-wide budget that cuda/paged_cuda.cpp charges (defined in cpp/paged.cpp).
ManagedBudget& managed_budget();

}  // namespace qlora_ext::paged
