// Runtime choice of the CPU instruction set used by the vectorised kernels.
//
// One source file holds the AVX-512, AVX2 and portable variants of each kernel (through
// per-function target attributes), so a single binary runs on any x86-64 CPU and uses the widest
// vectors the CPU has. Tests force each path in turn (set_cpu_isa) to prove they agree bit for bit.
#pragma once

#include <string>

namespace qlora_ext::cpu {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

Isa detected_isa();                  // best the CPU supports
Isa current_isa();                   // what the kernels use now
void set_isa(const std::string& s);  // "auto", "avx512", "avx2" or "scalar"
std::string isa_name(Isa isa);

// Applies the environment variable QLORA_EXT_CPU_ISA (set_isa's names) if it is set. Returns ""
// or, for a name that is unknown or beyond this CPU, a warning (the best ISA stays in use).
std::string set_isa_from_env();

}  // namespace qlora_ext::cpu

#if defined(__x86_64__) || defined(_M_X64)
#define QX_X86 1
#define QX_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define QX_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define QX_X86 0
#endif

// 1 in AddressSanitizer builds (Note [Sanitizer build] in CMakeLists.txt).
#if defined(__SANITIZE_ADDRESS__)
#define QX_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define QX_ASAN 1
#endif
#endif
#ifndef QX_ASAN
#define QX_ASAN 0
#endif
