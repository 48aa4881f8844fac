// SPDX-License-Identifier: Apache-2.0
#pragma once

// SIMD levels of the CPU fast path and the one place that decides which one runs.
//
//   scalar   1 float lane, plain C++: any compiler, any CPU (the portable fallback)
//   vec128   4 lanes, GCC/Clang vector extensions: SSE2 on x86-64, NEON on AArch64 (baseline)
//   avx2     8 lanes, x86-64 with AVX2 + FMA + F16C
//   avx512   16 lanes, x86-64 with AVX-512 F/BW/VL/DQ (+ FMA, F16C)
//
// The kernels for every level are compiled into every translation unit that includes them, each
// under its own target (see target.hpp), so no -march flag is needed; the CPU is asked once, at
// first use, which levels it runs. `DMS_CPU_SIMD=scalar|vec128|avx2|avx512` in the environment
// caps the level (a level the CPU lacks falls back to the best one below it); set_simd_level()
// does the same from code, for tests and benchmarks that compare levels.

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "dms/config.hpp"
#include "dms/error.hpp"

#if defined(__GNUC__)
#define DMS_CPU_HAS_VECTOR_EXTENSIONS 1
#else
#define DMS_CPU_HAS_VECTOR_EXTENSIONS 0
#endif

#if defined(__GNUC__) && defined(__x86_64__)
#include <cpuid.h>
#define DMS_CPU_HAS_X86_TARGETS 1
#else
#define DMS_CPU_HAS_X86_TARGETS 0
#endif

DMS_NAMESPACE_BEGIN
namespace cpu {

enum class simd_level : int { scalar = 0, vec128 = 1, avx2 = 2, avx512 = 3 };

inline constexpr simd_level all_simd_levels[] = {simd_level::scalar, simd_level::vec128,
                                                 simd_level::avx2, simd_level::avx512};

[[nodiscard]] constexpr const char* simd_level_name(simd_level l) {
  switch (l) {
    case simd_level::scalar:
      return "scalar";
    case simd_level::vec128:
      return "vec128";
    case simd_level::avx2:
      return "avx2";
    case simd_level::avx512:
      return "avx512";
  }
  return "unknown";
}

/// Float lanes of a level's vectors.
[[nodiscard]] constexpr int simd_width(simd_level l) {
  switch (l) {
    case simd_level::scalar:
      return 1;
    case simd_level::vec128:
      return 4;
    case simd_level::avx2:
      return 8;
    case simd_level::avx512:
      return 16;
  }
  return 1;
}

namespace detail {

// What this CPU and OS run, asked once through CPUID (the compilers' __builtin_cpu_supports
// differ in which feature names they know). A level also needs the OS to save its registers
// (XGETBV: SSE + AVX state for avx2, plus the opmask and ZMM state for avx512).
inline simd_level detect_simd_level() {
#if DMS_CPU_HAS_X86_TARGETS
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d) || a < 7) return simd_level::vec128;
  __get_cpuid(1, &a, &b, &c, &d);
  const bool fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1,
             f16c = (c >> 29) & 1;
  if (!(fma && osxsave && avx && f16c)) return simd_level::vec128;
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const unsigned long long xcr0 = (static_cast<unsigned long long>(xcr0_hi) << 32) | xcr0_lo;
  if ((xcr0 & 0x6u) != 0x6u) return simd_level::vec128;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = (b >> 5) & 1;
  const bool avx512 = ((b >> 16) & 1) && ((b >> 17) & 1) && ((b >> 30) & 1) && ((b >> 31) & 1);
  if (avx512 && (xcr0 & 0xe6u) == 0xe6u) return simd_level::avx512;
  return avx2 ? simd_level::avx2 : simd_level::vec128;
#elif DMS_CPU_HAS_VECTOR_EXTENSIONS
  return simd_level::vec128;
#else
  return simd_level::scalar;
#endif
}

inline bool parse_simd_level(const char* s, simd_level& out) {
  for (const simd_level l : all_simd_levels)
    if (std::strcmp(s, simd_level_name(l)) == 0) {
      out = l;
      return true;
    }
  return false;
}

// The level in use: -1 until first asked, then the detected level capped by DMS_CPU_SIMD.
inline std::atomic<int>& simd_level_state() {
  static std::atomic<int> state{-1};
  return state;
}

}  // namespace detail

/// The best level this CPU runs (independent of DMS_CPU_SIMD and set_simd_level).
[[nodiscard]] inline simd_level max_simd_level() {
  static const simd_level best = detail::detect_simd_level();
  return best;
}

[[nodiscard]] inline bool simd_level_supported(simd_level l) {
  return static_cast<int>(l) <= static_cast<int>(max_simd_level());
}

/// Every level this CPU runs, lowest first (scalar is always there).
[[nodiscard]] inline std::vector<simd_level> supported_simd_levels() {
  std::vector<simd_level> out;
  for (const simd_level l : all_simd_levels)
    if (simd_level_supported(l)) out.push_back(l);
  return out;
}

/// The level the fast path runs now.
[[nodiscard]] inline simd_level active_simd_level() {
  auto& state = detail::simd_level_state();
  int v = state.load(std::memory_order_relaxed);
  if (v < 0) {
    simd_level l = max_simd_level();
    if (const char* env = std::getenv("DMS_CPU_SIMD")) {
      simd_level want{};
      if (!detail::parse_simd_level(env, want))
        ::dms::detail::fail("DMS_CPU_SIMD = \"", env,
                            "\" is not a SIMD level (valid: scalar, vec128, avx2, avx512)");
      if (static_cast<int>(want) < static_cast<int>(l)) l = want;
    }
    int expected = -1;
    state.compare_exchange_strong(expected, static_cast<int>(l), std::memory_order_relaxed);
    v = state.load(std::memory_order_relaxed);
  }
  return static_cast<simd_level>(v);
}

/// Makes the fast path run `l` from now on, process-wide (calls already running keep theirs).
/// Throws dms::error, changing nothing, if this CPU cannot run `l`. Returns the previous level.
inline simd_level set_simd_level(simd_level l) {
  if (!simd_level_supported(l))
    ::dms::detail::fail("set_simd_level: level ", simd_level_name(l), " = ", static_cast<int>(l),
                        " is outside the valid range [0, ", static_cast<int>(max_simd_level()),
                        "] of levels this CPU supports (best: ", simd_level_name(max_simd_level()),
                        ")");
  const simd_level before = active_simd_level();
  detail::simd_level_state().store(static_cast<int>(l), std::memory_order_relaxed);
  return before;
}

}  // namespace cpu
DMS_NAMESPACE_END
