#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace qlora_ext::cpu {

Isa detected_isa() {
#if QX_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Isa::Avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return Isa::Avx2;
  }
#endif
  return Isa::Scalar;
}

static std::atomic<int> g_isa{-1};

Isa current_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = static_cast<int>(detected_isa());
    g_isa.store(v, std::memory_order_relaxed);
  }
  return static_cast<Isa>(v);
}

void set_isa(const std::string& s) {
  Isa want;
  if (s == "auto") {
    want = detected_isa();
  } else if (s == "avx512") {
    want = Isa::Avx512;
  } else if (s == "avx2") {
    want = Isa::Avx2;
  } else if (s == "scalar") {
    want = Isa::Scalar;
  } else {
    TORCH_CHECK(false, "isa must be 'auto', 'avx512', 'avx2' or 'scalar', got '", s, "'");
  }
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(detected_isa()), "isa '", s,
              "' is not supported by this CPU (best: ", isa_name(detected_isa()), ")");
  g_isa.store(static_cast<int>(want), std::memory_order_relaxed);
}

std::string set_isa_from_env() {
  const char* v = std::getenv("QLORA_EXT_CPU_ISA");
  if (v == nullptr || *v == '\0') return "";
  try {
    set_isa(v);
  } catch (const c10::Error& e) {
    return std::string("QLORA_EXT_CPU_ISA is ignored: ") + e.what_without_backtrace() + "; using " +
           isa_name(detected_isa());
  }
  return "";
}

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512:
      return "avx512";
    case Isa::Avx2:
      return "avx2";
    default:
      return "scalar";
  }
}

}  // namespace qlora_ext::cpu
