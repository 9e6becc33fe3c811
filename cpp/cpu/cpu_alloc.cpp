#include "cpu_alloc.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <cstdlib>
#include <cstring>

namespace qlora_ext::cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
// Below this, 4 KB pages: with the kernel's defrag=madvise policy a huge-page fault may compact
// memory synchronously, and for the 8 MB packed output of a 4096x4096 quantize in a fresh
// process that measured slower (about 24 ms against 9 ms) than plain 4 KB faults.
constexpr size_t kHugeMin = size_t(32) << 20;

void free_huge(void* p) { std::free(p); }

class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kHugeMin) return c10::GetCPUAllocator()->allocate(nbytes);
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, kHugePage, nbytes) == 0 && p != nullptr,
                "qlora_ext: out of CPU memory allocating ", nbytes, " bytes");
#ifdef MADV_HUGEPAGE
    madvise(p, nbytes, MADV_HUGEPAGE);  // advisory: failure just means 4 KB pages
#endif
    return {p, p, &free_huge, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};

HugePageAllocator g_allocator;

}  // namespace

at::Tensor empty_large(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, &g_allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, std::nullopt);
}

}  // namespace qlora_ext::cpu
