// Note [Large CPU outputs]: a dequantized 4096x4096 fp32 weight is 64 MB of freshly mapped
// memory, and on Linux the first write to each 4 KB page faults: 14 ms of faults against a
// 1.6 ms kernel, measured here. madvise(MADV_HUGEPAGE) cut the faults to one per 2 MB, but
// under the usual defrag=madvise policy such a fault may compact memory synchronously, and
// once memory was fragmented that happened on fresh mappings again and again (single 64 MB
// dequantizes of 60-190 ms in a long benchmark run). So large outputs use plain pages, and
// their blocks, once freed, are kept already faulted in and handed to the next output of the
// same size: repeated dequantizes of one shape (benchmarks, merging layer by layer) pay the
// faults once, and no call ever waits on compaction. The cache holds at most kCachedBlocks
// blocks and kCachedBytes bytes; qlora_ext._C.empty_cpu_cache() frees it.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

#include "cpu_isa.h"  // QX_ASAN

namespace qlora_ext::cpu {

// at::empty on the CPU, from the block cache when the tensor is >= 32 MB.
at::Tensor empty_large(at::IntArrayRef sizes, at::ScalarType dtype);

// Frees every cached block; returns the bytes released.
size_t empty_large_cache_clear();

#if QX_ASAN
// Sanitizer builds only: writes one byte at `offset` of a fresh nbytes (>= 32 MB) output, or of
// its block once freed into the cache (after_free), to show that ASan sees an access past the
// output or into a cached block (Note [Poisoned cache blocks]; tests/test_sanitizer.py).
void debug_touch_large_output(int64_t nbytes, int64_t offset, bool after_free);
#endif

}  // namespace qlora_ext::cpu
