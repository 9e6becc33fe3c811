// Which 4-bit GEMM path the ops take. "auto" is the dispatch heuristic (see cuda/gemm_ops.cpp
// and cpp/cpu/gemm_cpu.cpp); the others force a path where it applies, so tests cover every
// path and the GPU check can time them against each other.
#pragma once

#include <string>

namespace qlora_ext {

enum class GemmPath : int { Auto = 0, Small = 1, TensorCore = 2, Panel = 3 };

GemmPath gemm_path();
void set_gemm_path(const std::string& name);  // "auto", "small", "tc" or "panel"

}  // namespace qlora_ext
