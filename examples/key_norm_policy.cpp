// SPDX-License-Identifier: Apache-2.0
// Key-norm eviction written as a score-only policy (dms::score_policy), the way a kvpress press
// is: the scorer reads each slot's key through the row handle and returns a score, the adapter
// keeps the `budget` highest per row. The rule is KnormPress's (Devoto et al., 2024: keys with a
// large L2 norm draw little attention), so the score is minus the norm: large norms go first.
//
// Build: any preset with examples (e.g. `cmake --workflow --preset release`), then run
// build/release/examples/dms_key_norm_policy. It decodes a synthetic sequence and checks, after
// every step, that each row holds exactly the `budget` tokens with the smallest key norms.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <span>
#include <vector>

#include "dms/dms.hpp"

struct key_norm {
  const char* name() const { return "key norm"; }
  template <class Row>
  float operator()(const Row& row, int slot) const {
    float sum = 0.0f;
    for (const auto x : row.key(slot)) sum += dms::to_float(x) * dms::to_float(x);
    return -std::sqrt(sum);  // higher = keep: the smallest norms stay
  }
};

int main() {
  const dms::cache_config cfg{.num_kv_heads = 2,
                              .group_size = 4,
                              .head_dim = 64,
                              .page_size = 16,
                              .max_pages = 64,
                              .max_sequences = 1,
                              .max_row_slots = 512};
  constexpr int budget = 32, steps = 200;
  dms::paged_cache<dms::bfloat16, dms::score_policy<key_norm>> cache(
      cfg, dms::score_policy<key_norm>(budget));
  const int seq = cache.add_sequence();

  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  const std::size_t qn = std::size_t(cfg.num_query_heads()) * cfg.head_dim;
  const std::size_t kn = std::size_t(cfg.num_kv_heads) * cfg.head_dim;
  std::vector<float> q(qn), k(kn), v(kn), out(qn);
  // Every token's key norm, per KV head, as the cache stores the key (bf16).
  std::vector<std::vector<float>> norms(cfg.num_kv_heads);

  for (int t = 0; t < steps; ++t) {
    const float spread = 0.5f + float(t % 7) * 0.25f;  // norms vary from token to token
    for (auto& x : q) x = normal(rng);
    for (auto& x : k) x = spread * normal(rng);
    for (auto& x : v) x = normal(rng);
    dms::reference::decode_step(cache, seq, std::span<const float>(q), std::span<const float>(k),
                                std::span<const float>(v), {}, std::span<float>(out));
    for (int h = 0; h < cfg.num_kv_heads; ++h) {
      float sum = 0.0f;
      for (int c = 0; c < cfg.head_dim; ++c) {
        const float x =
            dms::to_float(dms::from_float<dms::bfloat16>(k[std::size_t(h) * cfg.head_dim + c]));
        sum += x * x;
      }
      norms[std::size_t(h)].push_back(std::sqrt(sum));
    }
    // Check: every row holds the min(t + 1, budget) tokens with the smallest norms (ties to the
    // newer token, since the oldest goes first).
    for (int h = 0; h < cfg.num_kv_heads; ++h) {
      std::vector<std::pair<float, int>> by_norm;
      for (int p = 0; p <= t; ++p) by_norm.emplace_back(norms[std::size_t(h)][std::size_t(p)], -p);
      std::sort(by_norm.begin(), by_norm.end());
      std::vector<std::int32_t> want;
      for (int i = 0; i < std::min(t + 1, budget); ++i)
        want.push_back(-by_norm[std::size_t(i)].second);
      std::sort(want.begin(), want.end());
      if (cache.live_positions(seq, h) != want) {
        std::printf("step %d, kv head %d: the row does not hold the smallest key norms\n", t, h);
        return 1;
      }
    }
  }
  const auto st = cache.stats();
  std::printf("dms %d.%d.%d: key-norm eviction (score_policy), budget %d per row\n",
              DMS_VERSION_MAJOR, DMS_VERSION_MINOR, DMS_VERSION_PATCH, budget);
  std::printf("%d steps: %lld tokens seen, %lld held, compression %.2fx, %lld KV reads\n", steps,
              static_cast<long long>(st.tokens_seen), static_cast<long long>(st.live_slots),
              st.compression_ratio, static_cast<long long>(st.kv_token_reads));
  std::printf("every row held exactly the %d smallest-norm keys after every step\n", budget);
  return 0;
}
