// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>

namespace dms_bench {

/// Uniform in [-1, 1) from a counter (splitmix64): fills a long cache quickly and identically on
/// every run.
inline float hash_uniform(std::uint64_t i) {
  i += 0x9E3779B97F4A7C15ull;
  i = (i ^ (i >> 30)) * 0xBF58476D1CE4E5B9ull;
  i = (i ^ (i >> 27)) * 0x94D049BB133111EBull;
  i ^= i >> 31;
  return float(i >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

}  // namespace dms_bench
