// LoRA dropout as a pure function of (seed, element index), shared by the CPU and CUDA kernels.
//
// Note [Dropout by seed]: lora_4bit_forward keeps no mask. Element i of x is kept when a
// counter-based hash of (seed, i) clears a threshold, so the backward regenerates the same mask
// from the seed alone: one int64 instead of an M x K byte mask per layer, and x is saved
// anyway. Gradient checkpointing replays the same seed because torch.utils.checkpoint restores
// the RNG state the seed was drawn from.
#pragma once

#include <cstdint>

#include "codes.h"

namespace qlora_ext {

// splitmix64's finaliser: a bijection on 64 bits whose outputs pass BigCrush for a counter.
QX_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Keep threshold for drop probability p in [0, 1): an element is dropped when its 32-bit hash
// is below p * 2^32.
inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

QX_HD bool dropout_keep(uint64_t seed, uint64_t i, uint32_t threshold) {
  return static_cast<uint32_t>(mix64(seed + 0x9E3779B97F4A7C15ull * (i + 1)) >> 32) >= threshold;
}

}  // namespace qlora_ext
