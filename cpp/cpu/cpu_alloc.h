// Note [Huge-page outputs]: a dequantized 4096x4096 fp32 weight is 64 MB of freshly mapped
// memory, and on Linux the first write to each 4 KB page faults. Those faults cost as much as
// the kernel itself (16 ms of 18 ms measured here). Large CPU outputs are therefore allocated
// 2 MB-aligned and madvise(MADV_HUGEPAGE)d, so the kernel takes one fault per 2 MB instead of
// per 4 KB (torch does the same for all tensors under THP_MEM_ALLOC_ENABLE=1). Where
// transparent huge pages are off, madvise is a no-op and nothing changes.
#pragma once

#include <ATen/ATen.h>

namespace qlora_ext::cpu {

// at::empty on the CPU, backed by huge pages when the tensor is at least 32 MB.
at::Tensor empty_large(at::IntArrayRef sizes, at::ScalarType dtype);

}  // namespace qlora_ext::cpu
