#include "cpu_alloc.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#if QX_ASAN
#include <sanitizer/asan_interface.h>
#endif

namespace qlora_ext::cpu {
namespace {

// Note [Poisoned cache blocks]: AddressSanitizer knows a cached block only as one live
// allocation of `bytes`, so a kernel writing past its output into the 2 MB round-up, or
// touching a block after its tensor was freed (it stays allocated, in the cache), would go
// unseen. In sanitizer builds the slack past the requested size and every cached free block
// are poisoned, and a block handed out is unpoisoned for exactly the requested bytes: such an
// access is then reported as a use-after-poison. Elsewhere these are no-ops.
#if QX_ASAN
void poison(void* p, size_t n) { ASAN_POISON_MEMORY_REGION(p, n); }
void unpoison(void* p, size_t n) { ASAN_UNPOISON_MEMORY_REGION(p, n); }
#else
void poison(void*, size_t) {}
void unpoison(void*, size_t) {}
#endif

// Blocks are 2 MB-aligned multiples of 2 MB, so a system with transparent huge pages always
// on can back them with huge pages; below kCachedMin, torch's allocator.
constexpr size_t kAlign = size_t(2) << 20;
constexpr size_t kCachedMin = size_t(32) << 20;
constexpr size_t kCachedBlocks = 4;
constexpr size_t kCachedBytes = size_t(1) << 30;

struct Block {
  void* ptr;
  size_t bytes;  // a multiple of kAlign
};

// The free blocks (Note [Large CPU outputs]). Never destroyed: a tensor may be freed during
// static destruction, after a static cache would be gone.
class BlockCache {
 public:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < free_.size(); ++i) {
      if (free_[i].bytes == bytes) {
        void* p = free_[i].ptr;
        cached_ -= bytes;
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
        return p;
      }
    }
    return nullptr;
  }
  void give(Block b) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (free_.size() < kCachedBlocks && cached_ + b.bytes <= kCachedBytes) {
        poison(b.ptr, b.bytes);  // Note [Poisoned cache blocks]
        free_.push_back(b);
        cached_ += b.bytes;
        return;
      }
    }
    unpoison(b.ptr, b.bytes);
    std::free(b.ptr);
  }
  size_t clear() {
    std::vector<Block> blocks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      blocks.swap(free_);
      cached_ = 0;
    }
    size_t bytes = 0;
    for (const Block& b : blocks) {
      bytes += b.bytes;
      unpoison(b.ptr, b.bytes);
      std::free(b.ptr);
    }
    return bytes;
  }

 private:
  std::mutex mu_;
  std::vector<Block> free_;
  size_t cached_ = 0;
};

BlockCache& cache() {
  static BlockCache* c = new BlockCache();
  return *c;
}

void release(void* ctx) {
  Block* b = static_cast<Block*>(ctx);
  cache().give(*b);
  delete b;
}

class CachingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kCachedMin) return c10::GetCPUAllocator()->allocate(nbytes);
    const size_t bytes = (nbytes + kAlign - 1) / kAlign * kAlign;
    void* p = cache().take(bytes);
    if (p == nullptr) {
      TORCH_CHECK(posix_memalign(&p, kAlign, bytes) == 0 && p != nullptr,
                  "qlora_ext: out of CPU memory allocating ", bytes, " bytes");
    }
    unpoison(p, nbytes);  // Note [Poisoned cache blocks]
    poison(static_cast<char*>(p) + nbytes, bytes - nbytes);
    return {p, new Block{p, bytes}, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};

CachingAllocator g_allocator;

}  // namespace

at::Tensor empty_large(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, &g_allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, std::nullopt);
}

size_t empty_large_cache_clear() { return cache().clear(); }

#if QX_ASAN
void debug_touch_large_output(int64_t nbytes, int64_t offset, bool after_free) {
  TORCH_CHECK(nbytes >= int64_t(kCachedMin), "nbytes must be at least ", kCachedMin, ", got ",
              nbytes);
  at::Tensor t = empty_large({nbytes}, at::kByte);
  volatile uint8_t* p = t.data_ptr<uint8_t>();
  if (after_free) t.reset();  // the block goes back to the cache
  p[offset] = 1;
}
#endif

}  // namespace qlora_ext::cpu
