// SPDX-License-Identifier: Apache-2.0
// Every policy against an independent brute force written from the spec (policies.md): the model
// and the side-by-side driver are in tests/support/bruteforce.hpp (the fuzz target and the stress
// run in tests/fuzz/ use them too). Random shapes, seeds and schedules drive both sides step by
// step: prompts in random chunks (with left padding), decode steps interleaved across sequences of
// different lengths, sequences removed and added mid-way.
#include <catch2/catch.hpp>
#include <cstdint>
#include <string>

#include "support/bruteforce.hpp"

namespace {

using namespace dms_bf;

/// Case i: a shape that walks all (group size, head_dim) pairs over 16 cases, page sizes and KV
/// head counts interleaved; run with float storage (tight) and bf16 storage (brute force fed the
/// bf16-rounded K/V).
shape shape_for(int i) {
  static constexpr int gs[] = {1, 4, 8, 2}, ds[] = {4, 16, 33, 1}, ps[] = {1, 2, 4, 16};
  return {1 + i % 3, gs[i % 4], ds[(i / 4) % 4], ps[(i + i / 4) % 4]};
}

/// Parameter set of case i, decorrelated from its shape (every pair with each group size).
int pick(int i) {
  return (7 * i + i / 4) % 8;
}

gen_opts data_for(int i, double logit_bias = 0) {
  static constexpr double qzero[] = {0, 0, 0.3, 1.0}, qscale[] = {1, 3};
  return {logit_bias, (i + i / 4) % 2 ? 0.25 : 0.0, qzero[(i / 3) % 4],
          qscale[(i / 2 + i / 4) % 2]};
}

template <class P>
void run(const model& m, const gen_opts& g, int i) {
  const shape sh = shape_for(i);
  const std::uint64_t seed = 0x5eed0000ULL + std::uint64_t(m.k) * 1000 + std::uint64_t(i);
  INFO("case " << i << " seed " << seed << " " << m << " Hk=" << sh.Hk << " G=" << sh.G
               << " d=" << sh.d << " P=" << sh.P << " logit_bias=" << g.logit_bias
               << " dup=" << g.dup_prob << " qzero=" << g.qzero_prob << " qscale=" << g.qscale);
  {
    INFO("storage float");
    const std::string err = driver<float, P>(sh, m, g, seed).run();
    CHECK(err == "");
  }
  {
    INFO("storage bf16");
    const std::string err = driver<dms::bfloat16, P>(sh, m, g, seed).run();
    CHECK(err == "");
  }
}

constexpr int kCases = 16;

}  // namespace

TEST_CASE("brute force: dense", "[bruteforce]") {
  for (int i = 0; i < kCases; ++i) run<dms::dense_policy>(model{}, data_for(i), i);
}

TEST_CASE("brute force: DMS delayed eviction", "[bruteforce][dms]") {
  // w = 0 (immediate eviction), small windows, one longer than any sequence; logits random,
  // ~all flagged (+8), ~none flagged (-8), mostly flagged (+0.5).
  static constexpr int windows[] = {0, 1, 2, 3, 5, 8, 16, 200};
  static constexpr double bias[] = {0, 8, -8, 0.5, 0};
  for (int i = 0; i < 2 * kCases; ++i)
    run<dms::dms_policy>({.k = kind::dms, .window = windows[pick(i)]},
                         data_for(i, bias[(i + i / 8) % 5]), i);
}

TEST_CASE("brute force: TOVA", "[bruteforce][tova]") {
  static constexpr int budgets[] = {1, 2, 3, 5, 8, 13, 30, 200};
  for (const kind k : {kind::tova, kind::tova_layer})
    for (int i = 0; i < kCases; ++i)
      run<dms::tova_policy>({.k = k, .budget = budgets[pick(i)]}, data_for(i), i);
}

TEST_CASE("brute force: H2O", "[bruteforce][h2o]") {
  static constexpr int budget[] = {1, 1, 2, 2, 5, 8, 12, 200}, recent[] = {0, 1, 0, 1, 2, 8, 4, 10};
  for (int i = 0; i < kCases; ++i)
    run<dms::h2o_policy>({.k = kind::h2o, .budget = budget[pick(i)], .recent = recent[pick(i)]},
                         data_for(i), i);
}

TEST_CASE("brute force: StreamingLLM", "[bruteforce][streaming]") {
  static constexpr int sinks[] = {0, 0, 1, 2, 4, 4, 3, 1}, recent[] = {1, 4, 1, 3, 8, 1, 200, 16};
  for (int i = 0; i < kCases; ++i)
    run<dms::streaming_llm_policy>(
        {.k = kind::streaming, .recent = recent[pick(i)], .sinks = sinks[pick(i)]}, data_for(i), i);
}

TEST_CASE("brute force: Quest", "[bruteforce][quest]") {
  for (int i = 0; i < kCases; ++i) {
    const int P = shape_for(i).P;  // budgets at and around page multiples (>= one page)
    const int budgets[] = {P, P, 2 * P, 3 * P, 4 * P + 1, P + P / 2, 8 * P, 200};
    // layer 1 < dense_layers 2 reads densely; layer 2 selects pages
    run<dms::quest_policy>({.k = kind::quest,
                            .budget = budgets[pick(i)],
                            .layer = i % 5 == 4 ? 1 : 2,
                            .dense_layers = 2},
                           data_for(i), i);
  }
}

TEST_CASE("brute force: SnapKV", "[bruteforce][snapkv]") {
  static constexpr int cap[] = {1, 4, 10, 8, 16, 6, 20, 200}, win[] = {1, 2, 4, 8, 3, 1, 5, 5},
                       ker[] = {1, 3, 7, 5, 7, 9, 3, 5};
  for (int i = 0; i < kCases; ++i) {
    const int j = pick(i);
    run<dms::snapkv_policy>({.k = kind::snapkv,
                             .window = win[j],
                             .budget = cap[j],
                             .kernel = ker[j],
                             .max_pool = (i + i / 4) % 2 == 0},
                            data_for(i), i);
  }
}
