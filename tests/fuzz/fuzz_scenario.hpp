// SPDX-License-Identifier: Apache-2.0
#pragma once

// One fuzz input -> one scenario (fuzz_input.cpp): the bytes choose a policy, its parameters, a
// shape and the storage type, then drive the brute-force driver (tests/support/bruteforce.hpp),
// a quarter of whose events are bad calls. Shared by the libFuzzer target (fuzz_cache.cpp) and
// by dms_fuzz_replay (replay_main.cpp: the committed corpus, and the stress run).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>

#include "support/bruteforce.hpp"

namespace dms_fuzz {

/// Decisions read from the input bytes (zeros once they run out): one byte for a small range, so
/// mutating a byte moves one decision.
struct byte_source {
  const std::uint8_t* p = nullptr;
  std::size_t n = 0;
  std::uint64_t take(int bytes) {
    std::uint64_t x = 0;
    for (int i = 0; i < bytes; ++i) {
      x = (x << 8) | (n > 0 ? *p : 0u);
      if (n > 0) ++p, --n;
    }
    return x;
  }
  std::uint64_t next() { return take(8); }
  double uniform() { return double(take(2)) / 65536.0; }
  int between(int lo, int hi) {
    const std::uint64_t span = std::uint64_t(std::int64_t(hi) - lo) + 1;
    const std::uint64_t x = span <= 256 ? take(1) : span <= 65536 ? take(2) : take(4);
    return lo + int(x % span);
  }
  float normal() {
    const double u1 = uniform(), u2 = uniform();
    return float(std::sqrt(-2.0 * std::log1p(-u1)) * std::cos(6.283185307179586 * u2));
  }
};

struct outcome {
  std::string error;  // "" if the library agreed with the model throughout
  long events = 0;    // operations run (good and bad calls)
  std::string what;   // the policy and shape, for a report
};

/// Runs the scenario an input describes.
outcome run_input(const std::uint8_t* data, std::size_t size);

/// One scenario of policy P (instantiated in fuzz_policies_*.cpp, two files so they compile in
/// parallel).
template <class P>
outcome run_policy(bool bf16, const dms_bf::shape& sh, const dms_bf::model& m,
                   const dms_bf::gen_opts& g, std::uint64_t seed, const byte_source& src);

}  // namespace dms_fuzz
