// SPDX-License-Identifier: Apache-2.0
// Conversions are checked against independent references rather than hand-picked values alone:
// the compiler's own half type (_Float16, or __fp16 on AArch64; round-to-nearest-even) for half,
// and a double-based nearest-neighbour search for bfloat16. Mismatches are counted and the first
// one reported, so a broken rounding rule fails with a concrete bit pattern instead of millions of
// assertions.

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iomanip>
#include <random>
#include <sstream>
#include <string>
#include <string_view>

#include "dms/numeric.hpp"

namespace {

std::uint32_t bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

float from_bits32(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

bool half_is_nan(std::uint16_t h) {
  return (h & 0x7c00u) == 0x7c00u && (h & 0x03ffu) != 0;
}
bool bf16_is_nan(std::uint16_t b) {
  return (b & 0x7f80u) == 0x7f80u && (b & 0x007fu) != 0;
}

// The compiler's own IEEE half as the oracle: on AArch64, GCC 12's C++ has __fp16 (ACLE, IEEE
// format, conversions round to nearest even) but not _Float16.
#if defined(__ARM_FP16_FORMAT_IEEE)
using compiler_half = __fp16;
#else
using compiler_half = _Float16;
#endif

std::uint16_t ref_half(float f) {
  const compiler_half h = static_cast<compiler_half>(f);
  std::uint16_t u;
  std::memcpy(&u, &h, sizeof u);
  return u;
}

// Picks the nearer of the two bf16 values that bracket |f| (truncation and truncation + 1 ulp),
// ties to the even mantissa. Past the largest finite bf16 the upper neighbour is 2^128, which is
// what an unbounded exponent would give, so overflow rounds to inf exactly as RNE prescribes.
std::uint16_t ref_bf16(float f) {
  const std::uint32_t u = bits(f);
  const auto sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const auto lo = static_cast<std::uint16_t>((u >> 16) & 0x7fffu);
  if (lo >= 0x7f80u) return static_cast<std::uint16_t>(sign | lo);  // inf (NaN handled by caller)
  const auto hi = static_cast<std::uint16_t>(lo + 1);
  const double d = std::fabs(static_cast<double>(f));
  const double dlo = static_cast<double>(from_bits32(std::uint32_t{lo} << 16));
  const double dhi = hi == 0x7f80u ? std::ldexp(1.0, 128)
                                   : static_cast<double>(from_bits32(std::uint32_t{hi} << 16));
  std::uint16_t r;
  if (d - dlo < dhi - d) {
    r = lo;
  } else if (d - dlo > dhi - d) {
    r = hi;
  } else {
    r = (lo & 1u) ? hi : lo;
  }
  return static_cast<std::uint16_t>(sign | r);
}

std::string hex(std::uint32_t v) {
  std::ostringstream os;
  os << "0x" << std::hex << std::setw(8) << std::setfill('0') << v;
  return os.str();
}

// Counts disagreements between dms and a reference over a set of float bit patterns.
struct mismatch_log {
  std::size_t count = 0;
  std::string first;

  void check(std::uint32_t input, std::uint32_t got, std::uint32_t want, bool nan_ok) {
    if (got == want || nan_ok) return;
    if (count++ == 0) first = "input " + hex(input) + ": got " + hex(got) + ", want " + hex(want);
  }
};

void check_half(mismatch_log& log, std::uint32_t u) {
  const float f = from_bits32(u);
  const std::uint16_t got = dms::half(f).bits;
  const std::uint16_t want = ref_half(f);
  log.check(u, got, want, std::isnan(f) && half_is_nan(got) && half_is_nan(want));
}

void check_bf16(mismatch_log& log, std::uint32_t u) {
  const float f = from_bits32(u);
  const std::uint16_t got = dms::bfloat16(f).bits;
  if (std::isnan(f)) {
    log.check(u, got, 0x7fc0u, bf16_is_nan(got) && (got & 0x8000u) == ((u >> 16) & 0x8000u));
  } else {
    log.check(u, got, ref_bf16(f), false);
  }
}

std::uint16_t h16(float f) {
  return dms::half(f).bits;
}
std::uint16_t b16(float f) {
  return dms::bfloat16(f).bits;
}

}  // namespace

TEST_CASE("every half bit pattern round-trips through float", "[numeric]") {
  mismatch_log to_float_log;
  mismatch_log round_trip_log;
  for (std::uint32_t b = 0; b <= 0xffffu; ++b) {
    const auto h = dms::half::from_bits(static_cast<std::uint16_t>(b));
    const float f = dms::to_float(h);
    compiler_half ref;
    std::memcpy(&ref, &h.bits, sizeof ref);
    const float want = static_cast<float>(ref);
    // Widening is exact, so the float bits must match the compiler's exactly (NaN payloads aside).
    to_float_log.check(b, bits(f), bits(want), std::isnan(f) && std::isnan(want));
    const std::uint16_t back = dms::from_float<dms::half>(f).bits;
    const bool nan_ok =
        half_is_nan(h.bits) && half_is_nan(back) && (back & 0x8000u) == (b & 0x8000u);
    round_trip_log.check(b, back, h.bits, nan_ok);
  }
  INFO(to_float_log.first);
  CHECK(to_float_log.count == 0);
  INFO(round_trip_log.first);
  CHECK(round_trip_log.count == 0);
}

TEST_CASE("every bfloat16 bit pattern round-trips through float", "[numeric]") {
  mismatch_log log;
  for (std::uint32_t b = 0; b <= 0xffffu; ++b) {
    const auto x = dms::bfloat16::from_bits(static_cast<std::uint16_t>(b));
    const float f = dms::to_float(x);
    REQUIRE(bits(f) == b << 16);
    const std::uint16_t back = dms::from_float<dms::bfloat16>(f).bits;
    const bool nan_ok =
        bf16_is_nan(x.bits) && bf16_is_nan(back) && (back & 0x8000u) == (b & 0x8000u);
    log.check(b, back, x.bits, nan_ok);
  }
  INFO(log.first);
  CHECK(log.count == 0);
}

TEST_CASE("float to half matches _Float16 on random patterns", "[numeric]") {
  std::mt19937 rng(20240611u);
  mismatch_log log;
  // Half of the samples are unrestricted; the other half keep the exponent near the half range,
  // where almost all the rounding decisions are made.
  for (int i = 0; i < 1'000'000; ++i) check_half(log, static_cast<std::uint32_t>(rng()));
  std::uniform_int_distribution<std::uint32_t> exp(95, 145);
  for (int i = 0; i < 1'000'000; ++i) {
    const auto u = static_cast<std::uint32_t>(rng());
    check_half(log, (u & 0x807fffffu) | (exp(rng) << 23));
  }
  INFO(log.first);
  CHECK(log.count == 0);
}

TEST_CASE("float to half matches _Float16 near ties, subnormals and overflow", "[numeric]") {
  mismatch_log log;
  // The exact midpoint between every pair of adjacent finite halves, and its float neighbours.
  for (std::uint32_t b = 0; b < 0x7c00u; ++b) {
    const double lo = static_cast<float>(dms::half::from_bits(static_cast<std::uint16_t>(b)));
    const double hi = b + 1 == 0x7c00u
                          ? 65536.0
                          : static_cast<double>(static_cast<float>(
                                dms::half::from_bits(static_cast<std::uint16_t>(b + 1))));
    const std::uint32_t mid = bits(static_cast<float>((lo + hi) / 2));
    REQUIRE(static_cast<double>(from_bits32(mid)) == (lo + hi) / 2);  // midpoints are floats
    for (std::uint32_t d = 0; d <= 2; ++d) {
      for (std::uint32_t sign : {0u, 0x80000000u}) {
        check_half(log, sign | (mid + d));
        check_half(log, sign | (mid - d));
      }
    }
  }
  // Exhaustive around 65504..65536 and around the 2^-25 flush-to-zero boundary.
  for (std::uint32_t u = 0x477f0000u; u <= 0x47810000u; ++u) check_half(log, u);
  for (std::uint32_t u = 0x32f00000u; u <= 0x33100000u; ++u) check_half(log, u);
  // A stride through the whole subnormal and lowest-normal range, including float subnormals.
  for (std::uint32_t u = 0; u <= 0x38900000u; u += 97) check_half(log, u | 0x80000000u);
  INFO(log.first);
  CHECK(log.count == 0);
}

TEST_CASE("float to bfloat16 matches a double-based nearest-even reference", "[numeric]") {
  std::mt19937 rng(7u);
  mismatch_log log;
  for (int i = 0; i < 2'000'000; ++i) check_bf16(log, static_cast<std::uint32_t>(rng()));
  // Exact ties and their neighbours for every bf16 value, which random sampling would rarely hit.
  for (std::uint32_t b = 0; b <= 0xffffu; ++b) {
    for (std::uint32_t low : {0x7fffu, 0x8000u, 0x8001u}) check_bf16(log, (b << 16) | low);
  }
  // Right up to the largest finite float, where rounding up must produce inf.
  for (std::uint32_t u = 0x7f7f0000u; u <= 0x7f800000u; ++u) check_bf16(log, u);
  INFO(log.first);
  CHECK(log.count == 0);
}

TEST_CASE("half rounding: spelled-out cases", "[numeric]") {
  CHECK(h16(1.0f) == 0x3c00u);
  CHECK(h16(1.0f + 0x1p-11f) == 0x3c00u);             // tie, 1.0 has the even mantissa
  CHECK(h16(1.0f + 0x1p-11f + 0x1p-23f) == 0x3c01u);  // just past the tie
  CHECK(h16(1.0f + 3 * 0x1p-11f) == 0x3c02u);         // tie between mantissas 1 and 2 -> 2
  CHECK(h16(65504.0f) == 0x7bffu);                    // largest finite half
  CHECK(h16(std::nextafter(65520.0f, 0.0f)) == 0x7bffu);
  CHECK(h16(65520.0f) == 0x7c00u);  // tie with odd 65504 -> inf
  CHECK(h16(-65520.0f) == 0xfc00u);
  CHECK(h16(1e10f) == 0x7c00u);
  CHECK(h16(0x1p-14f) == 0x0400u);  // smallest normal
  CHECK(h16(0x1p-24f) == 0x0001u);  // smallest subnormal
  CHECK(h16(0x1p-25f) == 0x0000u);  // tie with 0 -> 0
  CHECK(h16(std::nextafter(0x1p-25f, 1.0f)) == 0x0001u);
  CHECK(h16(3 * 0x1p-25f) == 0x0002u);     // tie between subnormals 1 and 2 -> 2
  CHECK(h16(2047 * 0x1p-25f) == 0x0400u);  // tie between 0x3ff and 0x400 -> 0x400
  CHECK(h16(0.0f) == 0x0000u);
  CHECK(h16(-0.0f) == 0x8000u);
  CHECK(h16(-0x1p-30f) == 0x8000u);  // underflow keeps the sign
  CHECK(h16(INFINITY) == 0x7c00u);
  CHECK(h16(-INFINITY) == 0xfc00u);
  CHECK(h16(NAN) == 0x7e00u);
  CHECK(half_is_nan(h16(from_bits32(0x7f800001u))));  // payload lost in truncation, still NaN
  CHECK(h16(from_bits32(0xffc00000u)) == 0xfe00u);    // sign kept, quiet
  CHECK(bits(static_cast<float>(dms::half::from_bits(0x0001u))) == bits(0x1p-24f));
  CHECK(bits(static_cast<float>(dms::half::from_bits(0x83ffu))) == bits(-1023 * 0x1p-24f));
}

TEST_CASE("bfloat16 rounding: spelled-out cases", "[numeric]") {
  CHECK(b16(1.0f) == 0x3f80u);
  CHECK(b16(1.0f + 0x1p-8f) == 0x3f80u);  // tie, even mantissa 0
  CHECK(b16(1.0f + 0x1p-8f + 0x1p-23f) == 0x3f81u);
  CHECK(b16(1.0f + 3 * 0x1p-8f) == 0x3f82u);        // tie between 1 and 2 -> 2
  CHECK(b16(from_bits32(0x7f7fffffu)) == 0x7f80u);  // FLT_MAX rounds to inf
  CHECK(b16(from_bits32(0x7f7f7fffu)) == 0x7f7fu);
  CHECK(b16(from_bits32(0x00008000u)) == 0x0000u);  // subnormal tie to even zero
  CHECK(b16(from_bits32(0x00018000u)) == 0x0002u);
  CHECK(b16(-0.0f) == 0x8000u);
  CHECK(b16(INFINITY) == 0x7f80u);
  CHECK(b16(-INFINITY) == 0xff80u);
  CHECK(bf16_is_nan(b16(from_bits32(0x7f800001u))));  // naive rounding would give inf
  CHECK(b16(from_bits32(0x7fffffffu)) == 0x7fffu);    // naive rounding would carry into -0
  CHECK(b16(from_bits32(0xff800001u)) == 0xffc0u);
}

TEST_CASE("to_float and from_float dispatch on the storage type", "[numeric]") {
  CHECK(dms::to_float(1.5f) == 1.5f);
  CHECK(bits(dms::from_float<float>(-0.0f)) == 0x80000000u);
  CHECK(dms::to_float(dms::from_float<dms::half>(-2.5f)) == -2.5f);
  CHECK(dms::to_float(dms::from_float<dms::bfloat16>(3.0f)) == 3.0f);
  CHECK(dms::from_float<dms::half>(0.1f) == dms::half::from_bits(0x2e66u));
  CHECK(dms::from_float<dms::bfloat16>(0.1f) == dms::bfloat16::from_bits(0x3dcdu));
  CHECK_FALSE(dms::half::from_bits(0x0000u) == dms::half::from_bits(0x8000u));  // bitwise equality
  CHECK(dms::half{}.bits == 0);
  CHECK(dms::bfloat16{}.bits == 0);
}

TEST_CASE("dtype traits", "[numeric]") {
  static_assert(dms::dtype_of<float> == dms::dtype::f32);
  static_assert(dms::dtype_of<dms::half> == dms::dtype::f16);
  static_assert(dms::dtype_of<dms::bfloat16> == dms::dtype::bf16);
  static_assert(std::string_view(dms::dtype_name(dms::dtype::f32)) == "f32");
  static_assert(std::string_view(dms::dtype_name(dms::dtype::f16)) == "f16");
  static_assert(std::string_view(dms::dtype_name(dms::dtype::bf16)) == "bf16");
  static_assert(dms::dtype_size(dms::dtype::f32) == sizeof(float));
  static_assert(dms::dtype_size(dms::dtype::f16) == sizeof(dms::half));
  static_assert(dms::dtype_size(dms::dtype::bf16) == sizeof(dms::bfloat16));
  static_assert(dms::storage_type<float>);
  static_assert(dms::storage_type<dms::half>);
  static_assert(dms::storage_type<dms::bfloat16>);
  static_assert(!dms::storage_type<double>);
  static_assert(!dms::storage_type<std::uint16_t>);
  static_assert(!dms::storage_type<const float>);
  static_assert(!dms::storage_type<float&>);
  static_assert(dms::half::from_bits(0x3c00u).bits == 0x3c00u);  // usable in constant expressions
  SUCCEED();
}
