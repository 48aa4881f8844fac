// SPDX-License-Identifier: Apache-2.0
#pragma once

// Host-side 16-bit storage types for K/V. The conversions are integer-only so that the CPU
// reference path and the kernels round identically (IEEE round-to-nearest-even), with no dependency
// on cuda_fp16.h or on the host compiler's _Float16 support.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dms/config.hpp"

DMS_NAMESPACE_BEGIN

namespace detail {

// memcpy is the portable bit cast on the host; device code cannot call it cheaply, so it uses the
// intrinsic, which compiles to a register move.
DMS_HOST_DEVICE std::uint32_t bits_of_float(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

DMS_HOST_DEVICE float float_of_bits(std::uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// Rounds `v` right by `shift` bits (1 <= shift <= 31) to nearest, ties to even.
DMS_HOST_DEVICE std::uint32_t shift_right_rne(std::uint32_t v, unsigned shift) {
  const std::uint32_t kept = v >> shift;
  const std::uint32_t rest = v & ((std::uint32_t{1} << shift) - 1);
  const std::uint32_t halfway = std::uint32_t{1} << (shift - 1);
  return kept + ((rest > halfway || (rest == halfway && (kept & 1))) ? 1 : 0);
}

DMS_HOST_DEVICE std::uint16_t float_to_half_bits(float f) {
  const std::uint32_t u = bits_of_float(f);
  const auto sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7fffffffu;
  std::uint32_t h;
  if (a > 0x7f800000u) {
    // Keep the top payload bits but force the quiet bit: the payload alone may truncate to zero,
    // which would turn the NaN into an infinity.
    h = 0x7e00u | ((a >> 13) & 0x03ffu);
  } else if (a >= 0x477ff000u) {
    // 65520 is the midpoint between 65504 (odd mantissa) and 2^16, so ties already go to inf.
    h = 0x7c00u;
  } else if (a >= 0x38800000u) {
    // Rebias the exponent in place; a mantissa carry correctly bumps the exponent.
    h = shift_right_rne(a - 0x38000000u, 13);
  } else if (a > 0x33000000u) {
    // Half subnormals have a fixed 2^-24 quantum, so the shift depends on the float's exponent.
    // Float subnormals never reach here: they are far below 2^-25 and round to zero.
    const std::uint32_t mant = (a & 0x007fffffu) | 0x00800000u;
    h = shift_right_rne(mant, 126u - (a >> 23));
  } else {
    h = 0;  // up to and including 2^-25, which ties to the even zero
  }
  return static_cast<std::uint16_t>(sign | h);
}

DMS_HOST_DEVICE float half_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = (std::uint32_t{h} & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t mant = h & 0x03ffu;
  std::uint32_t u;
  if (exp == 0x1fu) {
    u = 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    u = ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    u = 0;
  } else {
    // Every half subnormal is a normal float: shift the leading one up to the implicit position.
    std::uint32_t e = 113;
    while ((mant & 0x0400u) == 0) {
      mant <<= 1;
      --e;
    }
    u = (e << 23) | ((mant & 0x03ffu) << 13);
  }
  return float_of_bits(sign | u);
}

DMS_HOST_DEVICE std::uint16_t float_to_bfloat16_bits(float f) {
  const std::uint32_t u = bits_of_float(f);
  // Rounding a NaN could carry into the exponent and produce inf (or truncate the payload to inf).
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x0040u);
  // Adding 0x7fff plus the kept LSB is RNE; the carry into the exponent yields inf on overflow.
  // No uint32 wrap: the largest non-NaN input is 0xff800000.
  return static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

DMS_HOST_DEVICE float bfloat16_bits_to_float(std::uint16_t b) {
  return float_of_bits(std::uint32_t{b} << 16);
}

}  // namespace detail

/// IEEE binary16. Trivial so that arrays of it can be memcpy'd and cudaMemcpy'd as raw storage;
/// `half{}` is +0, a plain `half h;` is uninitialized like a float.
struct half {
  std::uint16_t bits;

  half() = default;
  DMS_HOST_DEVICE explicit half(float f) : bits(detail::float_to_half_bits(f)) {}
  DMS_HOST_DEVICE explicit operator float() const { return detail::half_bits_to_float(bits); }

  DMS_HOST_DEVICE static constexpr half from_bits(std::uint16_t b) {
    half h{};
    h.bits = b;
    return h;
  }

  // Bitwise, not numeric: storage round-trips must distinguish -0 from +0 and compare NaNs equal.
  DMS_HOST_DEVICE friend constexpr bool operator==(half a, half b) { return a.bits == b.bits; }
};

/// bfloat16: the top half of an IEEE binary32.
struct bfloat16 {
  std::uint16_t bits;

  bfloat16() = default;
  DMS_HOST_DEVICE explicit bfloat16(float f) : bits(detail::float_to_bfloat16_bits(f)) {}
  DMS_HOST_DEVICE explicit operator float() const { return detail::bfloat16_bits_to_float(bits); }

  DMS_HOST_DEVICE static constexpr bfloat16 from_bits(std::uint16_t b) {
    bfloat16 h{};
    h.bits = b;
    return h;
  }

  DMS_HOST_DEVICE friend constexpr bool operator==(bfloat16 a, bfloat16 b) {
    return a.bits == b.bits;
  }
};

static_assert(std::is_trivially_copyable_v<half> && std::is_standard_layout_v<half>);
static_assert(std::is_trivially_default_constructible_v<half>);
static_assert(sizeof(half) == 2 && alignof(half) == 2);
static_assert(std::is_trivially_copyable_v<bfloat16> && std::is_standard_layout_v<bfloat16>);
static_assert(std::is_trivially_default_constructible_v<bfloat16>);
static_assert(sizeof(bfloat16) == 2 && alignof(bfloat16) == 2);

/// The element types K/V may be stored in.
template <class T>
concept storage_type = std::same_as<T, float> || std::same_as<T, half> || std::same_as<T, bfloat16>;

template <storage_type T>
DMS_HOST_DEVICE float to_float(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    return static_cast<float>(x);
  }
}

template <storage_type T>
DMS_HOST_DEVICE T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    return T(x);
  }
}

enum class dtype { f32, f16, bf16 };

namespace detail {

template <class>
inline constexpr bool always_false = false;

template <class T>
constexpr dtype dtype_of_impl() {
  if constexpr (std::is_same_v<T, float>) {
    return dtype::f32;
  } else if constexpr (std::is_same_v<T, half>) {
    return dtype::f16;
  } else if constexpr (std::is_same_v<T, bfloat16>) {
    return dtype::bf16;
  } else {
    static_assert(always_false<T>,
                  "dms::dtype_of<T>: T must satisfy dms::storage_type "
                  "(float, dms::half or dms::bfloat16)");
    return dtype::f32;
  }
}

}  // namespace detail

template <class T>
inline constexpr dtype dtype_of = detail::dtype_of_impl<T>();

DMS_HOST_DEVICE constexpr const char* dtype_name(dtype t) {
  switch (t) {
    case dtype::f32:
      return "f32";
    case dtype::f16:
      return "f16";
    case dtype::bf16:
      return "bf16";
  }
  return "unknown";  // only reachable through a cast from an out-of-range integer
}

DMS_HOST_DEVICE constexpr std::size_t dtype_size(dtype t) {
  switch (t) {
    case dtype::f32:
      return 4;
    case dtype::f16:
    case dtype::bf16:
      return 2;
  }
  return 0;
}

DMS_NAMESPACE_END
