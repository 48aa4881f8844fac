// SPDX-License-Identifier: Apache-2.0
// The CRTP policy interface (dms/policy/policy.hpp) from a user's side: small policies written
// here, run through paged_cache and the reference decode, and the compile-time contract.

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "dms/dms.hpp"

namespace {

// Evicts every odd position once it is 2 tokens old, and compacts the row. Its row state counts
// appends and follows the newest token's slot through compaction (init_row, on_append,
// on_slot_moved).
struct odd_evictor : dms::policy<odd_evictor> {
  struct row_state {
    int appends = -1;  // -1 until init_row ran
    int last_slot = -1;
  };
  const char* name() const { return "odd evictor"; }
  void init_row(row_state& s) const { s.appends = 0; }
  template <class Row>
  void on_append(Row& row, const dms::token_info& tok, int slot) const {
    ++row.state().appends;
    row.state().last_slot = slot;
    (void)tok;
  }
  template <class Row>
  void on_slot_moved(Row& row, int from, int to) const {
    if (row.state().last_slot == from) row.state().last_slot = to;
  }
  template <class Row>
  int choose_victim(const Row&, const dms::token_info&) const {
    return -1;
  }
  template <class Seq>
  void after_attention(Seq& seq) const {
    for (int h = 0; h < seq.num_rows(); ++h) {
      auto& row = seq.row(h);
      const std::int32_t newest = row.tokens_seen() - 1;
      for (int s = 0; s < row.length(); ++s) {
        const std::int32_t p = row.position(s);
        if (p >= 0 && p % 2 == 1 && newest - p >= 2) row.evict(s);
      }
      row.compact();
    }
  }
};

// FIFO: keep the last N tokens by overwriting the oldest one's slot (decided before the append).
struct keep_last_n : dms::policy<keep_last_n> {
  int n = 3;
  const char* name() const { return "keep last n"; }
  template <class Row>
  int choose_victim(const Row& row, const dms::token_info& tok) const {
    if (row.live() < n) return -1;
    for (int s = 0; s < row.length(); ++s)
      if (row.position(s) == tok.position - n) return s;
    return -1;
  }
  template <class Seq>
  void after_attention(Seq&) const {}
};

// Keeps scores (the current query's probability, summed over the group) and evicts nothing.
struct score_probe : dms::policy<score_probe> {
  static constexpr bool keeps_scores = true;
  const char* name() const { return "score probe"; }
  constexpr dms::score_update score_for_query(int, int) const { return dms::score_update::assign; }
  template <class Row>
  int choose_victim(const Row&, const dms::token_info&) const {
    return -1;
  }
  template <class Seq>
  void after_attention(Seq&) const {}
};

// Names a slot that does not exist.
struct bad_victim : dms::policy<bad_victim> {
  const char* name() const { return "bad victim"; }
  template <class Row>
  int choose_victim(const Row& row, const dms::token_info&) const {
    return row.length() >= 2 ? row.length() + 5 : -1;
  }
  template <class Seq>
  void after_attention(Seq&) const {}
};

// Each missing (or malformed) one required hook.
struct no_choose_victim : dms::policy<no_choose_victim> {
  const char* name() const { return "x"; }
  template <class Seq>
  void after_attention(Seq&) const {}
};
struct no_name : dms::policy<no_name> {
  template <class Row>
  int choose_victim(const Row&, const dms::token_info&) const {
    return -1;
  }
  template <class Seq>
  void after_attention(Seq&) const {}
};
struct no_after_attention : dms::policy<no_after_attention> {
  const char* name() const { return "x"; }
  template <class Row>
  int choose_victim(const Row&, const dms::token_info&) const {
    return -1;
  }
};
struct mutable_choose_victim : dms::policy<mutable_choose_victim> {  // must be const
  const char* name() const { return "x"; }
  template <class Row>
  int choose_victim(const Row&, const dms::token_info&) {
    return -1;
  }
  template <class Seq>
  void after_attention(Seq&) const {}
};
struct name_not_a_string : dms::policy<name_not_a_string> {
  int name() const { return 0; }
  template <class Row>
  int choose_victim(const Row&, const dms::token_info&) const {
    return -1;
  }
  template <class Seq>
  void after_attention(Seq&) const {}
};

static_assert(dms::eviction_policy<dms::dense_policy>);
static_assert(dms::eviction_policy<dms::dms_policy>);
static_assert(dms::eviction_policy<dms::tova_policy>);
static_assert(dms::eviction_policy<dms::h2o_policy>);
static_assert(dms::eviction_policy<dms::streaming_llm_policy>);
static_assert(dms::eviction_policy<dms::snapkv_policy>);
static_assert(dms::eviction_policy<dms::quest_policy>);
static_assert(dms::eviction_policy<odd_evictor>);
static_assert(dms::eviction_policy<keep_last_n>);
static_assert(dms::eviction_policy<score_probe>);
static_assert(!dms::eviction_policy<no_choose_victim>);
static_assert(!dms::eviction_policy<no_name>);
static_assert(!dms::eviction_policy<no_after_attention>);
static_assert(!dms::eviction_policy<mutable_choose_victim>);
static_assert(!dms::eviction_policy<name_not_a_string>);

// Defaults supplied by the base for the optional hooks.
static_assert(!keep_last_n::keeps_scores && !keep_last_n::needs_page_bounds &&
              !keep_last_n::uses_decision_logits);
static_assert(!keep_last_n::selects_pages);
static_assert(std::is_same_v<keep_last_n::row_state, dms::no_row_state>);
static_assert(keep_last_n{}.score_for_query(3, 7) == dms::score_update::none);
static_assert(score_probe::keeps_scores &&
              score_probe{}.score_for_query(0, -1) == dms::score_update::assign);

dms::cache_config small_config() {
  dms::cache_config c;
  c.num_kv_heads = 2;
  c.group_size = 2;
  c.head_dim = 4;
  c.page_size = 2;
  c.max_pages = 256;
  c.max_sequences = 2;
  c.max_row_slots = 256;
  return c;
}

// Random decode steps for sequence `seq`; `check(t)` runs after each.
template <class C, class Check>
void run_steps(C& cache, int seq, int steps, unsigned seed, Check check,
               std::vector<float>* probs = nullptr) {
  const auto& cfg = cache.config();
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  const auto random = [&](std::size_t n) {
    std::vector<float> x(n);
    for (auto& e : x) e = normal(rng);
    return x;
  };
  for (int t = 0; t < steps; ++t) {
    const auto q = random(std::size_t(cfg.num_query_heads()) * cfg.head_dim);
    const auto k = random(std::size_t(cfg.num_kv_heads) * cfg.head_dim), v = random(k.size());
    std::vector<float> out(q.size());
    dms::reference::decode_extras extras;
    extras.probs = probs;
    dms::reference::decode_step(cache, seq, q, k, v, {}, out, extras);
    check(t);
  }
}

std::vector<std::int32_t> held(const std::vector<std::int32_t>& slots) {
  auto p = slots;
  p.erase(std::remove(p.begin(), p.end(), -1), p.end());
  std::sort(p.begin(), p.end());
  return p;
}

}  // namespace

TEST_CASE("a user policy: evict odd positions once they are 2 tokens old", "[policy]") {
  dms::paged_cache<float, odd_evictor> cache(small_config());
  REQUIRE(std::string(cache.policy().name()) == "odd evictor");
  const int seq = cache.add_sequence();
  for (int h = 0; h < 2; ++h)
    REQUIRE(cache.state(cache.row_index(seq, h)).appends == 0);  // init_row ran
  run_steps(cache, seq, 20, 1, [&](int t) {
    std::vector<std::int32_t> expected;
    for (int p = 0; p <= t; ++p)
      if (p % 2 == 0 || t - p < 2) expected.push_back(p);
    for (int h = 0; h < 2; ++h) {
      const int r = cache.row_index(seq, h);
      CAPTURE(t, h);
      REQUIRE(held(cache.positions(r)) == expected);
      REQUIRE(cache.row_length(r) == int(expected.size()));  // compacted
      REQUIRE(cache.state(r).appends == t + 1);              // on_append ran once per token
      REQUIRE(cache.positions(r).at(cache.state(r).last_slot) == t);  // on_slot_moved kept up
    }
  });
  REQUIRE(cache.stats().live_slots == 2 * (10 + 1));  // 10 even positions in 0..19, plus 19
  REQUIRE(cache.stats().pages_in_use == 2 * 6);       // 11 slots in pages of 2

  // A re-added sequence gets fresh row state.
  cache.remove_sequence(seq);
  const int again = cache.add_sequence();
  REQUIRE(cache.state(cache.row_index(again, 0)).appends == 0);
}

TEST_CASE("a user policy: FIFO keep-last-N through choose_victim", "[policy]") {
  const int n = GENERATE(1, 3, 5);
  keep_last_n policy;
  policy.n = n;
  dms::paged_cache<float, keep_last_n> cache(small_config(), policy);
  const int seq = cache.add_sequence();
  run_steps(cache, seq, 17, 2, [&](int t) {
    std::vector<std::int32_t> expected;
    for (int p = std::max(0, t + 1 - n); p <= t; ++p) expected.push_back(p);
    for (int h = 0; h < 2; ++h) {
      const int r = cache.row_index(seq, h);
      REQUIRE(held(cache.positions(r)) == expected);
      REQUIRE(cache.row_length(r) == std::min(t + 1, n));  // overwritten in place
    }
    REQUIRE(cache.stats().kv_token_reads == 2 * [&] {
      int sum = 0;
      for (int s = 0; s <= t; ++s) sum += std::min(s + 1, n);
      return sum;
    }());
  });
  REQUIRE(cache.row_peak(cache.row_index(seq, 0)) == n);
  REQUIRE(cache.stats().peak_live_slots == 2 * n);
}

TEST_CASE("a user policy that keeps scores gets the current query's probabilities", "[policy]") {
  dms::paged_cache<float, score_probe> cache(small_config());
  const int seq = cache.add_sequence();
  std::vector<float> probs;
  run_steps(
      cache, seq, 9, 3,
      [&](int t) {
        const int stride = int(probs.size()) / 4;
        REQUIRE(stride == t + 1);
        for (int h = 0; h < 2; ++h) {
          auto row = cache.row(seq, h);
          float total = 0.0f;
          for (int s = 0; s <= t; ++s) {
            const float expected =
                probs[std::size_t(h * 2) * stride + s] + probs[std::size_t(h * 2 + 1) * stride + s];
            REQUIRE(row.score(s) == expected);
            total += row.score(s);
          }
          REQUIRE(total == Approx(2.0f));  // two query heads, each a distribution
        }
      },
      &probs);
}

TEST_CASE("a policy naming a slot that is not live is an error, and nothing changes", "[policy]") {
  dms::paged_cache<float, bad_victim> cache(small_config());
  const int seq = cache.add_sequence();
  const std::vector<float> kv(8, 1.0f);
  cache.append(seq, kv, kv);
  cache.append(seq, kv, kv);
  const auto before = cache.stats();
  REQUIRE_THROWS_WITH(cache.append(seq, kv, kv),
                      Catch::Contains("bad victim") && Catch::Contains("victim slot 7"));
  REQUIRE(cache.stats().tokens_seen == before.tokens_seen);
  REQUIRE(cache.stats().live_slots == before.live_slots);
  REQUIRE(cache.positions(cache.row_index(seq, 0)) == std::vector<std::int32_t>{0, 1});
}
