// SPDX-License-Identifier: Apache-2.0
// libFuzzer target. Each input is a scenario (fuzz_input.cpp): add and remove sequences, prefill
// in random chunks with left padding, decode steps with finish_step, further prompt turns, on
// every policy; a quarter of the events are bad calls (non-finite K/V/Q, wrong sizes, unknown
// ids, a negative read count, evicting a hole, a negative softmax scale, corrupt images, raw row
// indices, prompts past a row). After every event the library must agree with the independent
// brute-force model, and every bad call must throw dms::error and leave the cache's image
// unchanged; a disagreement aborts with what differed (libFuzzer saves the input as crash-*).
// Token data comes from an rng seeded by four input bytes, so the bytes are spent on decisions.

#include <cstdio>
#include <cstdlib>

#include "fuzz_scenario.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto o = dms_fuzz::run_input(data, size);
  if (!o.error.empty()) {
    std::fprintf(stderr, "dms fuzz: %s: %s\n", o.what.c_str(), o.error.c_str());
    std::abort();
  }
  return 0;
}
