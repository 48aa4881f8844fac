// SPDX-License-Identifier: Apache-2.0
// The SIMD layer of the CPU fast path, at every level this CPU runs (scalar always): level
// detection and selection, every bf16/fp16 bit pattern widened exactly as dms::numeric does it,
// the vector exp against std::exp.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "dms/cpu/simd/functions.hpp"
#include "dms/cpu/simd/level.hpp"
#include "dms/numeric.hpp"

namespace {

using dms::cpu::simd_level;

std::uint32_t bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Exact bits, except that a signaling NaN may come out quiet (F16C's vcvtph2ps sets the quiet
// bit; dms::numeric's integer conversion keeps it clear): same sign and payload otherwise.
bool same_widening(float got, float want) {
  const std::uint32_t g = bits(got), w = bits(want);
  if (g == w) return true;
  return std::isnan(want) && (g | 0x00400000u) == (w | 0x00400000u);
}

template <class T>
void check_widen_exhaustive(simd_level level) {
  const auto fns = dms::cpu::detail::simd_functions_for<T>(level);
  std::vector<T> src(65536);
  for (std::uint32_t i = 0; i < 65536; ++i) src[i] = T::from_bits(std::uint16_t(i));
  // Every length from 0 to 70 (tails of every width), then all patterns at once, at an odd
  // offset so no load is aligned.
  for (int n = 0; n <= 70; ++n) {
    std::vector<float> dst(std::size_t(n) + 1, 123.0f);
    fns.widen(src.data() + 1001, n, dst.data());
    for (int i = 0; i < n; ++i) REQUIRE(same_widening(dst[i], float(src[std::size_t(1001 + i)])));
    REQUIRE(dst[std::size_t(n)] == 123.0f);  // nothing written past n
  }
  std::vector<float> dst(65535);
  fns.widen(src.data() + 1, 65535, dst.data());
  for (std::uint32_t i = 1; i < 65536; ++i) {
    INFO("bits 0x" << std::hex << i);
    REQUIRE(same_widening(dst[i - 1], float(src[i])));
  }
}

}  // namespace

TEST_CASE("cpu simd: levels are detected, listed and selectable", "[cpu][simd]") {
  const auto levels = dms::cpu::supported_simd_levels();
  REQUIRE(!levels.empty());
  CHECK(levels.front() == simd_level::scalar);
  CHECK(levels.back() == dms::cpu::max_simd_level());
  const simd_level before = dms::cpu::active_simd_level();
  for (const simd_level l : levels) {
    dms::cpu::set_simd_level(l);
    CHECK(dms::cpu::active_simd_level() == l);
  }
  for (const simd_level l : dms::cpu::all_simd_levels)
    if (!dms::cpu::simd_level_supported(l)) {
      CHECK_THROWS_WITH(dms::cpu::set_simd_level(l), Catch::Contains("levels this CPU supports"));
    }
  dms::cpu::set_simd_level(before);
  CHECK(dms::cpu::active_simd_level() == before);
  CHECK(dms::cpu::simd_width(simd_level::avx512) == 16);
  CHECK(std::string(dms::cpu::simd_level_name(simd_level::vec128)) == "vec128");
}

TEST_CASE("cpu simd: widen is exact for every bf16, fp16 and f32 input", "[cpu][simd]") {
  for (const simd_level level : dms::cpu::supported_simd_levels()) {
    INFO("level " << dms::cpu::simd_level_name(level));
    check_widen_exhaustive<dms::bfloat16>(level);
    check_widen_exhaustive<dms::half>(level);
    const auto fns = dms::cpu::detail::simd_functions_for<float>(level);
    std::vector<float> src(77), dst(77);
    for (std::size_t i = 0; i < src.size(); ++i) src[i] = float(i) * -1.25f + 0.5f;
    src[3] = std::numeric_limits<float>::infinity();
    src[4] = -0.0f;
    src[5] = std::numeric_limits<float>::denorm_min();
    fns.widen(src.data(), 77, dst.data());
    for (std::size_t i = 0; i < src.size(); ++i) REQUIRE(bits(dst[i]) == bits(src[i]));
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
TEST_CASE("cpu simd: fp16 subnormals widen exactly under denormals-are-zero", "[cpu][simd]") {
  // A caller built with -ffast-math runs with MXCSR's DAZ and FTZ bits set; the widening of the
  // emulated levels must not lose fp16 subnormals (they become normal floats).
  std::vector<dms::half> src;
  for (std::uint16_t m = 1; m < 0x400; ++m) {
    src.push_back(dms::half::from_bits(m));
    src.push_back(dms::half::from_bits(std::uint16_t(0x8000 | m)));
  }
  std::vector<float> dst(src.size());
  unsigned csr = 0;
  __asm__ volatile("stmxcsr %0" : "=m"(csr));
  const unsigned daz_ftz = csr | 0x8040u;
  for (const simd_level level : dms::cpu::supported_simd_levels()) {
    INFO("level " << dms::cpu::simd_level_name(level));
    const auto fns = dms::cpu::detail::simd_functions_for<dms::half>(level);
    __asm__ volatile("ldmxcsr %0" : : "m"(daz_ftz));
    fns.widen(src.data(), int(src.size()), dst.data());
    __asm__ volatile("ldmxcsr %0" : : "m"(csr));
    for (std::size_t i = 0; i < src.size(); ++i) REQUIRE(bits(dst[i]) == bits(float(src[i])));
  }
}
#endif

TEST_CASE("cpu simd: the vector exp is within 3 ulp of std::exp and 0 below -87.33",
          "[cpu][simd]") {
  std::vector<float> x;
  for (float v = -87.3f; v <= 0.5f; v += 0.0137f) x.push_back(v);
  for (float v : {0.0f, -0.0f, 1e-30f, -1e-30f, 1.0f, -1.0f, 10.0f, 80.0f, 88.0f, -87.33f})
    x.push_back(v);
  const std::size_t n_finite = x.size();
  for (float v : {-87.34f, -100.0f, -1e30f, -std::numeric_limits<float>::infinity()})
    x.push_back(v);
  for (const simd_level level : dms::cpu::supported_simd_levels()) {
    INFO("level " << dms::cpu::simd_level_name(level));
    const auto fns = dms::cpu::detail::simd_functions_for<float>(level);
    std::vector<float> y(x.size());
    fns.exp_array(x.data(), int(x.size()), y.data());
    double worst = 0;
    for (std::size_t i = 0; i < n_finite; ++i) {
      const double want = std::exp(double(x[i]));
      const double ulp =
          std::nextafter(float(want), std::numeric_limits<float>::infinity()) - float(want);
      worst = std::max(worst, std::abs(double(y[i]) - want) / ulp);
    }
    CHECK(worst <= 3.0);
    for (std::size_t i = n_finite; i < x.size(); ++i) CHECK(y[i] == 0.0f);
    CHECK(y[n_finite - 10] == 1.0f);  // exp(0)
  }
}
