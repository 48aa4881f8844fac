// SPDX-License-Identifier: Apache-2.0
// What a policy author gets from the row handle and the adapters: a slot's key and value, the
// score-only adapter (score_policy), live_positions, page reservations, on_evict and
// check_config.

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "dms/dms.hpp"

using Catch::Contains;

namespace {

dms::cache_config config(int max_row_slots = 128) {
  dms::cache_config c;
  c.num_kv_heads = 2;
  c.group_size = 2;
  c.head_dim = 8;
  c.page_size = 4;
  c.max_pages = 256;
  c.max_sequences = 2;
  c.max_row_slots = max_row_slots;
  return c;
}

std::vector<float> random(std::mt19937& rng, std::size_t n, float scale = 1.0f) {
  std::normal_distribution<float> normal;
  std::vector<float> x(n);
  for (auto& e : x) e = scale * normal(rng);
  return x;
}

// The squared L2 norm of a slot's key, read through the row handle.
struct key_norm2 {
  template <class Row>
  float operator()(const Row& row, int slot) const {
    float s = 0.0f;
    for (const auto x : row.key(slot)) s += dms::to_float(x) * dms::to_float(x);
    return s;
  }
};

// Scores every token alike: the tie rule decides alone.
struct constant_score {
  const char* name() const { return "constant"; }
  template <class Row>
  float operator()(const Row&, int) const {
    return 1.0f;
  }
};

// Records every eviction it hears of.
struct eviction_log : dms::policy<eviction_log> {
  struct row_state {
    std::vector<std::int32_t> evicted;
  };
  int keep = 3;
  const char* name() const { return "eviction log"; }
  void init_row(row_state&) const {}
  template <class Row>
  int choose_victim(const Row& row, const dms::token_info& tok) const {
    if (row.live() < keep) return -1;
    for (int s = 0; s < row.length(); ++s)
      if (row.position(s) == tok.position - keep) return s;
    return -1;
  }
  template <class Row>
  void on_evict(Row& row, int slot) const {
    row.state().evicted.push_back(row.position(slot));
  }
  template <class Seq>
  void after_attention(Seq&) const {}
  void check_config(const dms::cache_config& cfg) const {
    if (keep > cfg.max_row_slots) dms::detail::fail("eviction_log: keep = ", keep, " too large");
  }
};

}  // namespace

TEMPLATE_TEST_CASE("row handles give a slot's key and value in the storage type", "[policy][hooks]",
                   float, dms::half, dms::bfloat16) {
  dms::paged_cache<TestType> cache(config());
  const int s = cache.add_sequence();
  std::mt19937 rng(1);
  std::vector<std::vector<float>> ks, vs;
  for (int t = 0; t < 9; ++t) {
    ks.push_back(random(rng, 16));
    vs.push_back(random(rng, 16));
    cache.append(s, ks.back(), vs.back());
  }
  cache.row(s, 1).evict(4);
  for (int h = 0; h < 2; ++h) {
    const auto row = cache.row(s, h);
    REQUIRE(row.head_dim() == 8);
    for (int slot = 0; slot < row.length(); ++slot) {
      const auto p = row.position(slot);
      if (p < 0) continue;
      const auto k = row.key(slot), v = row.value(slot);
      REQUIRE(k.size() == 8);
      for (int c = 0; c < 8; ++c) {
        const auto i = std::size_t(h) * 8 + std::size_t(c);
        REQUIRE(dms::to_float(k[std::size_t(c)]) ==
                dms::to_float(dms::from_float<TestType>(ks[std::size_t(p)][i])));
        REQUIRE(dms::to_float(v[std::size_t(c)]) ==
                dms::to_float(dms::from_float<TestType>(vs[std::size_t(p)][i])));
      }
    }
    REQUIRE_THROWS_WITH(row.key(row.length()),
                        Contains("key: slot = 9 is outside the valid range [0, 8]"));
    REQUIRE_THROWS_WITH(row.value(-1), Contains("value: slot = -1"));
    REQUIRE_THROWS_WITH(row.position(99), Contains("position: slot = 99"));
  }
}

TEST_CASE("score_policy: key-norm eviction keeps the budget smallest norms", "[policy][hooks]") {
  const int budget = GENERATE(1, 5, 12);
  using policy_t = dms::score_policy<key_norm2>;
  dms::paged_cache<float, policy_t> cache(config(), policy_t(budget));
  REQUIRE(std::string(cache.policy().name()) == "score policy");
  const int s = cache.add_sequence();
  std::mt19937 rng{unsigned(budget)};
  std::vector<std::vector<float>> norm(2);
  for (int t = 0; t < 40; ++t) {
    const auto q = random(rng, 32), k = random(rng, 16, 0.5f + float(t % 5)), v = random(rng, 16);
    std::vector<float> out(32);
    dms::reference::decode_step(cache, s, std::span<const float>(q), std::span<const float>(k),
                                std::span<const float>(v), {}, std::span<float>(out));
    for (int h = 0; h < 2; ++h) {
      float n = 0.0f;
      for (int c = 0; c < 8; ++c) n += k[std::size_t(h) * 8 + c] * k[std::size_t(h) * 8 + c];
      norm[std::size_t(h)].push_back(n);
      // Brute force: the budget largest scores of all tokens so far (the newer wins a tie).
      std::vector<std::pair<float, int>> all;
      for (int p = 0; p <= t; ++p) all.emplace_back(norm[std::size_t(h)][std::size_t(p)], p);
      std::sort(all.begin(), all.end(), [](auto a, auto b) {
        return a.first > b.first || (a.first == b.first && a.second > b.second);
      });
      std::vector<std::int32_t> want;
      for (int i = 0; i < std::min(t + 1, budget); ++i) want.push_back(all[std::size_t(i)].second);
      std::sort(want.begin(), want.end());
      REQUIRE(cache.live_positions(s, h) == want);
    }
  }
}

TEST_CASE("score_policy: equal scores evict the oldest first, prompts are compacted",
          "[policy][hooks]") {
  using policy_t = dms::score_policy<constant_score>;
  dms::paged_cache<float, policy_t> cache(config(), policy_t(6));
  REQUIRE(std::string(cache.policy().name()) == "constant");
  const int s = cache.add_sequence();
  std::mt19937 rng(3);
  const auto q = random(rng, 20 * 32), k = random(rng, 20 * 16);
  std::vector<float> out(q.size());
  dms::reference::prefill(cache, s, {q, k, k}, 7, {out});
  for (int h = 0; h < 2; ++h) {
    REQUIRE(cache.live_positions(s, h) == std::vector<std::int32_t>{14, 15, 16, 17, 18, 19});
    REQUIRE(cache.row_length(cache.row_index(s, h)) == 6);  // compacted
  }
  REQUIRE(cache.stats().pages_in_use == 2 * 2);
  REQUIRE_THROWS_WITH((dms::paged_cache<float, policy_t>(config(64), policy_t(64))),
                      Contains("score_policy: budget = 64"));
}

TEST_CASE("live_positions: ascending, holes left out, checked arguments", "[hooks]") {
  dms::paged_cache<float, dms::dms_policy> cache(config(), dms::dms_policy{{.window = 2}});
  const int s = cache.add_sequence();
  const std::vector<float> kv(16, 0.5f);
  for (int t = 0; t < 10; ++t) {
    const std::vector<float> logits{t % 2 ? 1.0f : -1.0f, -1.0f};  // row 0: odd tokens flag
    cache.append(s, kv, kv, logits);
  }
  // Row 0 reuses slots, so slot order is not position order; live_positions sorts.
  REQUIRE(cache.live_positions(s, 0) == std::vector<std::int32_t>{1, 3, 5, 7, 8, 9});
  REQUIRE(cache.live_positions(s, 1) == std::vector<std::int32_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9});
  REQUIRE_THROWS_WITH(cache.live_positions(1, 0), Contains("unknown sequence id 1"));
  REQUIRE_THROWS_WITH(cache.live_positions(s, 2), Contains("kv_head = 2"));
}

TEST_CASE("on_evict hears every eviction; check_config runs at construction", "[policy][hooks]") {
  dms::paged_cache<float, eviction_log> cache(config());
  const int s = cache.add_sequence();
  const std::vector<float> kv(16, 1.0f);
  for (int t = 0; t < 6; ++t) cache.append(s, kv, kv);  // tokens 0, 1, 2 overwritten by 3, 4, 5
  cache.row(s, 1).evict(0);                             // a user eviction (token 3 lives in 0)
  REQUIRE(cache.state(cache.row_index(s, 0)).evicted == std::vector<std::int32_t>{0, 1, 2});
  REQUIRE(cache.state(cache.row_index(s, 1)).evicted == std::vector<std::int32_t>{0, 1, 2, 3});
  eviction_log big;
  big.keep = 1000;
  REQUIRE_THROWS_WITH((dms::paged_cache<float, eviction_log>(config(), big)),
                      Contains("eviction_log: keep = 1000"));
}

TEST_CASE("page reservations hold pages for one sequence", "[hooks]") {
  dms::cache_config c = config();
  c.max_pages = 6;
  dms::paged_cache<float> cache(c);
  const int a = cache.add_sequence(), b = cache.add_sequence();
  cache.reserve_pages(a, 4);
  REQUIRE(cache.reserved_pages(a) == 4);
  REQUIRE(cache.available_pages() == 2);
  const std::vector<float> kv(16, 1.0f);
  for (int t = 0; t < 4; ++t) cache.append(b, kv, kv);  // b's first page per row: 2 pages
  REQUIRE_THROWS_WITH(cache.append(b, kv, kv), Contains("page pool exhausted"));
  REQUIRE_THROWS_WITH(cache.reserve_pages(b, 1), Contains("asks to reserve 1 pages, 0 of"));
  for (int t = 0; t < 8; ++t) cache.append(a, kv, kv);  // a's appends use its reservation
  REQUIRE(cache.reserved_pages(a) == 0);
  cache.reserve_pages(a, 0);
  REQUIRE_THROWS_WITH(
      cache.release_reserved_pages(a, 1),
      Contains("release_reserved_pages: pages = 1 is outside the valid range [0, 0]"));
  cache.remove_sequence(a);  // pages (and any reservation) back to the pool
  REQUIRE(cache.available_pages() == 4);
  cache.reserve_pages(b, 3);
  cache.remove_sequence(b);
  REQUIRE(cache.available_pages() == 6);
}
