#include "gemm_path.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace qlora_ext {

static std::atomic<int> g_path{0};

GemmPath gemm_path() { return static_cast<GemmPath>(g_path.load(std::memory_order_relaxed)); }

void set_gemm_path(const std::string& name) {
  GemmPath p;
  if (name == "auto") {
    p = GemmPath::Auto;
  } else if (name == "small") {
    p = GemmPath::Small;
  } else if (name == "tc") {
    p = GemmPath::TensorCore;
  } else if (name == "panel") {
    p = GemmPath::Panel;
  } else {
    TORCH_CHECK(false, "path must be 'auto', 'small', 'tc' or 'panel', got '", name, "'");
  }
  g_path.store(static_cast<int>(p), std::memory_order_relaxed);
}

}  // namespace qlora_ext
