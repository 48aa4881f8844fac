// SPDX-License-Identifier: Apache-2.0
// The misuse table of issue 13, one test case per row: each call gets a dms::error that names the
// bad value and its valid range (for non-finite inputs: the tensor, the index and the sequence),
// and the cache is unchanged (its image is identical) and still usable. Row 1 (threads) lives in
// test_thread_safety.cpp. These tests use only API that existed before the fixes, so each one
// can be (and was) run against the old headers, where it fails.

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "dms/dms.hpp"
#include "support/image_compare.hpp"

using Catch::Contains;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

dms::cache_config small_config() {
  dms::cache_config c;
  c.num_kv_heads = 2;
  c.group_size = 2;
  c.head_dim = 4;
  c.page_size = 4;
  c.max_pages = 64;
  c.max_sequences = 3;
  c.max_row_slots = 64;
  return c;
}

std::vector<float> ramp(std::size_t n, float base) {
  std::vector<float> x(n);
  for (std::size_t i = 0; i < n; ++i) x[i] = base + 0.01f * float(i % 17) - 0.05f * float(i % 5);
  return x;
}

template <class T, class P>
void append_token(dms::paged_cache<T, P>& cache, int seq, float base, float logit = 1.0f) {
  const auto& c = cache.config();
  const auto kv = ramp(std::size_t(c.num_kv_heads) * c.head_dim, base);
  const std::vector<float> logits(P::uses_decision_logits ? c.num_kv_heads : 0, logit);
  cache.append(seq, std::span<const float>(kv), std::span<const float>(kv), logits);
}

template <class T, class P>
void decode_token(dms::paged_cache<T, P>& cache, int seq, float base) {
  const auto& c = cache.config();
  const auto q = ramp(std::size_t(c.num_query_heads()) * c.head_dim, base);
  const auto kv = ramp(std::size_t(c.num_kv_heads) * c.head_dim, base + 0.5f);
  const std::vector<float> logits(P::uses_decision_logits ? c.num_kv_heads : 0, 1.0f);
  std::vector<float> out(q.size());
  dms::reference::decode_step(cache, seq, std::span<const float>(q), std::span<const float>(kv),
                              std::span<const float>(kv), std::span<const float>(logits),
                              std::span<float>(out));
}

// `call` throws E (dms::error unless a user hook throws its own) matching `message`, and the
// cache's image (and stats) are unchanged.
template <class E = dms::error, class T, class P, class Matcher>
void require_rejected(dms::paged_cache<T, P>& cache, const std::function<void()>& call,
                      const Matcher& message) {
  const auto before = cache.to_image();
  const auto stats = cache.stats();
  REQUIRE_THROWS_AS(call(), E);
  REQUIRE_THROWS_WITH(call(), message);
  REQUIRE(dms_test::first_difference(cache.to_image(), before) == "");
  REQUIRE(cache.stats().kv_token_reads == stats.kv_token_reads);
  REQUIRE(cache.stats().peak_live_slots == stats.peak_live_slots);
}

}  // namespace

TEST_CASE("hardening #2: a moved-from cache throws a clear error from every call", "[hardening]") {
  dms::paged_cache<float, dms::dms_policy> a(small_config(), dms::dms_policy{{.window = 3}});
  const int seq = a.add_sequence();
  for (int t = 0; t < 5; ++t) append_token(a, seq, float(t));
  const auto image = a.to_image();

  dms::paged_cache<float, dms::dms_policy> b(std::move(a));
  append_token(b, seq, 9.0f);  // the moved-to cache carries on
  REQUIRE(b.stats().tokens_seen == 2 * 6);

  const auto moved = Contains("moved from");
  const std::vector<float> kv(8, 1.0f), q(16, 1.0f), logits(2, 1.0f);
  std::vector<float> out(16);
  REQUIRE_THROWS_WITH(a.add_sequence(), moved);
  REQUIRE_THROWS_WITH(a.remove_sequence(seq), moved);
  REQUIRE_THROWS_WITH(a.contains(seq), moved);
  REQUIRE_THROWS_WITH(a.sequences(), moved);
  REQUIRE_THROWS_WITH(append_token(a, seq, 1.0f), moved);
  REQUIRE_THROWS_WITH(a.finish_step(seq), moved);
  REQUIRE_THROWS_WITH(a.finish_prompt(seq), moved);
  REQUIRE_THROWS_WITH(a.row(seq, 0), moved);
  REQUIRE_THROWS_WITH(a.sequence(seq), moved);
  REQUIRE_THROWS_WITH(a.row_length(0), moved);
  REQUIRE_THROWS_WITH(a.row_live(0), moved);
  REQUIRE_THROWS_WITH(a.row_peak(0), moved);
  REQUIRE_THROWS_WITH(a.tokens_seen(0), moved);
  REQUIRE_THROWS_WITH(a.state(0), moved);
  REQUIRE_THROWS_WITH(a.positions(0), moved);
  REQUIRE_THROWS_WITH(a.record_reads(1), moved);
  REQUIRE_THROWS_WITH(a.to_image(), moved);
  REQUIRE_THROWS_WITH(a.load_image(image), moved);
  REQUIRE_THROWS_WITH(a.view(), moved);
  REQUIRE_THROWS_WITH(a.stats(), moved);
  REQUIRE_THROWS_WITH(dms::reference::decode_attention(a, seq, q, out), moved);
  REQUIRE_THROWS_WITH(dms::reference::decode_step(a, seq, q, kv, kv, logits, out), moved);

  // Moving a cache into it makes it a cache again.
  a = std::move(b);
  append_token(a, seq, 2.0f);
  REQUIRE(a.stats().tokens_seen == 2 * 7);
  REQUIRE_THROWS_WITH(b.stats(), moved);
}

TEST_CASE("hardening #3: raw row indices are checked", "[hardening]") {
  dms::paged_cache<float, dms::dms_policy> cache(small_config(), dms::dms_policy{{.window = 3}});
  const int seq = cache.add_sequence();
  append_token(cache, seq, 0.0f);
  const auto range = Contains("is outside the valid range [0, 5]");  // 3 sequences x 2 heads
  REQUIRE_THROWS_WITH(cache.row_length(100000), Contains("row = 100000") && range);
  REQUIRE_THROWS_WITH(cache.positions(-7), Contains("row = -7") && range);
  REQUIRE_THROWS_WITH(cache.row_live(6), Contains("row = 6") && range);
  REQUIRE_THROWS_WITH(cache.row_peak(-1), Contains("row = -1") && range);
  REQUIRE_THROWS_WITH(cache.tokens_seen(1 << 30), Contains("row = 1073741824") && range);
  REQUIRE_THROWS_WITH(cache.state(-2), Contains("row = -2") && range);
  // In range but not in use: empty.
  REQUIRE(cache.row_length(5) == 0);
  REQUIRE(cache.positions(5).empty());
  REQUIRE(cache.positions(0) == std::vector<std::int32_t>{0});
}

TEST_CASE("hardening #4: non-finite keys are rejected at append, naming tensor, index, sequence",
          "[hardening]") {
  SECTION("DMS, NaN in k") {
    dms::paged_cache<float, dms::dms_policy> cache(small_config(), dms::dms_policy{{.window = 2}});
    const int a = cache.add_sequence(), s = cache.add_sequence();
    for (int t = 0; t < 3; ++t) append_token(cache, a, float(t)), append_token(cache, s, -1.0f);
    auto k = ramp(8, 0.0f);
    const auto v = ramp(8, 1.0f);
    k[6] = kNaN;  // kv head 1, channel 2
    const std::vector<float> logits(2, 1.0f);
    require_rejected(
        cache, [&] { cache.append(s, k, v, logits); },
        Contains("append: k[1][2] = nan is not finite (sequence 1)"));
    append_token(cache, s, 0.5f);  // still usable
  }
  SECTION("Quest, NaN in k would poison every later step's page bound") {
    dms::paged_cache<float, dms::quest_policy> cache(small_config(),
                                                     dms::quest_policy({.token_budget = 8}));
    const int s = cache.add_sequence();
    for (int t = 0; t < 9; ++t) decode_token(cache, s, float(t) * 0.1f);
    auto k = ramp(8, 0.0f);
    k[0] = kNaN;
    require_rejected(
        cache, [&] { cache.append(s, k, k); },
        Contains("append: k[0][0] = nan is not finite (sequence 0)"));
    std::vector<float> q = ramp(16, 0.3f), out(16);
    for (int t = 0; t < 4; ++t) {
      decode_token(cache, s, 0.2f * float(t));
      dms::reference::decode_attention(cache, s, q, out);
      for (const float x : out) REQUIRE(std::isfinite(x));
    }
  }
  SECTION("16-bit inputs, the whole decode step") {
    dms::paged_cache<dms::bfloat16, dms::tova_policy> cache(small_config(),
                                                            dms::tova_policy({.budget = 4}));
    const int s = cache.add_sequence();
    for (int t = 0; t < 6; ++t) decode_token(cache, s, float(t));
    std::vector<dms::half> k(8, dms::from_float<dms::half>(0.5f));
    k[5] = dms::half::from_bits(0x7e00);  // NaN
    require_rejected(
        cache, [&] { cache.append(s, k, k); },
        Contains("append: k[1][1] = nan is not finite (sequence 0)"));
    auto kf = ramp(8, 0.0f);
    kf[3] = -kInf;
    const auto q = ramp(16, 0.0f);
    std::vector<float> out(16);
    require_rejected(
        cache, [&] { dms::reference::decode_step(cache, s, q, kf, kf, {}, out); },
        Contains("append: k[0][3] = -inf is not finite"));
  }
  SECTION("prefill rejects a non-finite key of any chunk before the first chunk runs") {
    dms::paged_cache<float, dms::dms_policy> cache(small_config(), dms::dms_policy{{.window = 2}});
    const int s = cache.add_sequence();
    const int n = 6;
    const auto q = ramp(std::size_t(n) * 16, 0.0f);
    auto k = ramp(std::size_t(n) * 8, 0.0f);
    const std::vector<float> logits(std::size_t(n) * 2, -1.0f);
    std::vector<float> out(q.size());
    k[5 * 8 + 1 * 4 + 3] = kNaN;  // token 5, kv head 1, channel 3
    require_rejected(
        cache,
        [&] {
          dms::reference::prefill(cache, s, {q, k, k, logits}, 2, {out});
        },
        Contains("prefill: k[5][1][3] = nan is not finite (sequence 0)"));
  }
}

TEST_CASE("hardening #5: NaN in q and Inf in v are rejected, naming tensor, index, sequence",
          "[hardening]") {
  dms::paged_cache<float, dms::h2o_policy> cache(small_config(),
                                                 dms::h2o_policy({.budget = 4, .recent = 2}));
  const int a = cache.add_sequence(), s = cache.add_sequence();
  for (int t = 0; t < 6; ++t) decode_token(cache, a, float(t)), decode_token(cache, s, -float(t));
  auto q = ramp(16, 0.0f);
  q[13] = kNaN;  // query head 3, channel 1
  const auto kv = ramp(8, 0.0f);
  std::vector<float> out(16, 0.0f);
  SECTION("q at decode attention: no score, no read recorded") {
    require_rejected(
        cache, [&] { dms::reference::decode_attention(cache, s, q, out); },
        Contains("decode_attention: q[3][1] = nan is not finite (sequence 1)"));
  }
  SECTION("q at decode_step: the token is not appended") {
    require_rejected(
        cache, [&] { dms::reference::decode_step(cache, s, q, kv, kv, {}, out); },
        Contains("q[3][1] = nan is not finite (sequence 1)"));
  }
  SECTION("inf in v at append") {
    auto v = kv;
    v[3] = kInf;
    require_rejected(
        cache, [&] { cache.append(s, kv, v); },
        Contains("append: v[0][3] = inf is not finite (sequence 1)"));
  }
  SECTION("q at prefill") {
    dms::paged_cache<float, dms::dms_policy> dms_cache(small_config(),
                                                       dms::dms_policy{{.window = 2}});
    const int p = dms_cache.add_sequence();
    auto pq = ramp(3 * 16, 0.0f);
    pq[2 * 16 + 1 * 4 + 0] = kNaN;  // token 2, query head 1, channel 0
    const auto pk = ramp(3 * 8, 0.0f);
    const std::vector<float> logits(6, 1.0f);
    std::vector<float> pout(pq.size());
    require_rejected(
        dms_cache,
        [&] {
          dms::reference::prefill(dms_cache, p, {pq, pk, pk, logits}, 1, {pout});
        },
        Contains("prefill: q[2][1][0] = nan is not finite (sequence 0)"));
  }
  decode_token(cache, s, 3.0f);  // still usable
}

TEST_CASE("hardening #6: a pool too large to allocate is a dms::error, before any allocation",
          "[hardening]") {
  dms::cache_config c = small_config();
  c.head_dim = 1024;
  c.page_size = 16;
  c.max_pages = 1 << 26;  // 2^30 slots x 1024 channels x 2 bytes x (K, V) + positions: 4 TiB
  c.max_sequences = 1;
  c.max_row_slots = 1024;
  REQUIRE_THROWS_AS((dms::paged_cache<dms::bfloat16>(c)), dms::error);
  REQUIRE_THROWS_WITH((dms::paged_cache<dms::bfloat16>(c)),
                      Contains("needs 4402341478400 bytes") && Contains("max_pool_bytes"));
}

TEST_CASE("hardening #7: 2^30 rows are rejected by a documented limit; unused rows cost little",
          "[hardening]") {
  dms::cache_config c = small_config();
  c.max_sequences = 1 << 20;
  c.num_kv_heads = 1024;
  c.page_size = 1;
  c.max_row_slots = 1;
  c.max_pages = 16;
  REQUIRE_THROWS_WITH((dms::paged_cache<float>(c)),
                      Contains("max_sequences * num_kv_heads = 1048576 * 1024 = 1073741824 rows") &&
                          Contains("valid range [1, 16777216]"));
  // 2^22 rows of sequence slots, almost all unused: hole lists and row state are per added
  // sequence, so this stays a few flat int arrays.
  c.num_kv_heads = 4;
  dms::paged_cache<float, dms::dms_policy> cache(c, dms::dms_policy{{.window = 0}});
  const int s = cache.add_sequence();
  append_token(cache, s, 1.0f, 1.0f);
  append_token(cache, s, 2.0f, 1.0f);
  REQUIRE(cache.stats().live_slots == 4);
}

TEST_CASE("hardening #8: a DMS window that cannot fit in a row is rejected up front",
          "[hardening]") {
  dms::cache_config c = small_config();
  c.max_row_slots = 128;
  REQUIRE_THROWS_WITH(
      (dms::paged_cache<float, dms::dms_policy>(c, dms::dms_policy{{.window = 1000}})),
      Contains("dms_params.window = 1000") && Contains("max_row_slots = 128"));
  REQUIRE_NOTHROW((dms::paged_cache<float, dms::dms_policy>(c, dms::dms_policy{{.window = 127}})));
  REQUIRE_THROWS((dms::paged_cache<float, dms::dms_policy>(c, dms::dms_policy{{.window = 128}})));
}

TEST_CASE("hardening #9: a row's token counter stops at 2^31 - 1 with an error", "[hardening]") {
  dms::paged_cache<float, dms::dms_policy> cache(small_config(), dms::dms_policy{{.window = 2}});
  const int s = cache.add_sequence();
  for (int t = 0; t < 3; ++t) append_token(cache, s, float(t));
  auto img = cache.to_image();
  const std::int32_t top = std::numeric_limits<std::int32_t>::max();
  for (int h = 0; h < 2; ++h) img.seen[std::size_t(h)] = top - 1;
  cache.load_image(img);
  append_token(cache, s, 5.0f);  // position 2^31 - 2, the last one there is
  REQUIRE(cache.tokens_seen(0) == top);
  require_rejected(
      cache, [&] { append_token(cache, s, 6.0f); },
      Contains("has seen 2147483647 tokens") && Contains("2^31 - 2"));
  const auto q = ramp(16, 0.0f), kv = ramp(8, 0.0f);
  const std::vector<float> logits(2, 1.0f);
  std::vector<float> out(16);
  require_rejected(
      cache,
      [&] {
        dms::reference::prefill(cache, s, {q, kv, kv, logits}, 1, {out});
      },
      Contains("2^31 - 1"));
}

TEST_CASE("hardening #10: load_image rejects a corrupt image and changes nothing", "[hardening]") {
  using cache_t = dms::paged_cache<float, dms::dms_policy>;
  cache_t cache(small_config(), dms::dms_policy{{.window = 2}});
  const int a = cache.add_sequence(), b = cache.add_sequence();
  for (int t = 0; t < 9; ++t) append_token(cache, a, float(t), t % 2 ? 1.0f : -1.0f);
  for (int t = 0; t < 5; ++t) append_token(cache, b, -float(t), -1.0f);
  cache.row(b, 1).evict(2);  // a hole
  const auto good = cache.to_image();
  const std::size_t ppr = std::size_t(good.config.max_pages_per_row());
  const int rb = cache.row_index(b, 1);

  struct corruption {
    const char* name;
    std::function<void(dms::cache_image<float>&)> apply;
    const char* message;
  };
  const std::vector<corruption> cases{
      {"page id out of range", [&](auto& i) { i.page_table[1] = 9999; },
       "row 0 page_table[1] = 9999 is outside the valid range [0, 63]"},
      {"negative page id", [&](auto& i) { i.page_table[0] = -1; }, "page_table[0] = -1"},
      {"a page in two rows", [&](auto& i) { i.page_table[ppr] = i.page_table[0]; },
       "is held by rows 0 and 1"},
      {"a page in a row and on the free list",
       [&](auto& i) { i.page_table[0] = i.free_pages[std::size_t(i.free_top - 1)]; },
       "and on the free list"},
      {"a leaked page", [&](auto& i) { --i.free_top; }, "is neither free nor held by a row"},
      {"free list twice", [&](auto& i) { i.free_pages[0] = i.free_pages[1]; },
       "on the free list twice"},
      {"row longer than max_row_slots", [&](auto& i) { i.row_length[0] = 65; },
       "length = 65 is outside the valid range [0, 64]"},
      {"live disagrees", [&](auto& i) { i.live[0] += 1; }, "live = "},
      {"hole list loops",
       [&](auto& i) {
         const auto st = i.state();
         i.position[std::size_t(st.slot_index(rb, i.hole_head[std::size_t(rb)]))] =
             -2 - i.hole_head[std::size_t(rb)];
       },
       "visits slot 2 twice"},
      {"hole list leaves the row", [&](auto& i) { i.hole_head[std::size_t(rb)] = 40; },
       "names slot 40"},
      {"position past seen", [&](auto& i) { i.seen[0] = 2; }, "counters disagree"},
      {"duplicate position",
       [&](auto& i) {
         const auto st = i.state();
         i.position[std::size_t(st.slot_index(0, 1))] =
             i.position[std::size_t(st.slot_index(0, 0))];
       },
       "twice"},
      {"inactive sequence with tokens", [&](auto& i) { i.active[std::size_t(a)] = 0; },
       "of inactive sequence 0 is not empty"},
      {"ring slot past the row", [&](auto& i) { i.ring_slot[0] = 50; }, "ring_slot[0] = 50"},
      {"short k", [&](auto& i) { i.k.pop_back(); }, "image.k has"},
      {"free_top", [&](auto& i) { i.free_top = 65; }, "free_top = 65"},
  };
  for (const auto& c : cases) {
    DYNAMIC_SECTION(c.name) {
      auto bad = good;
      c.apply(bad);
      require_rejected(
          cache, [&] { cache.load_image(bad); }, Contains("load_image") && Contains(c.message));
      append_token(cache, a, 3.0f);  // the next append works
      append_token(cache, b, 3.0f);
    }
  }
  cache.load_image(good);  // a good image still loads
  REQUIRE(dms_test::first_difference(cache.to_image(), good) == "");
}

namespace {

// User policies whose hooks throw halfway through, after they changed the cache.
struct throw_after_evicting : dms::policy<throw_after_evicting> {
  struct row_state {
    int evictions = 0;
  };
  bool armed = false;
  bool only_state = false;  // change nothing but row 1's state through its handle, then throw
  const char* name() const { return "throws in after_attention"; }
  void init_row(row_state&) const {}
  template <class Row>
  int choose_victim(const Row&, const dms::token_info&) const {
    return -1;
  }
  template <class Seq>
  void after_attention(Seq& seq) const {
    if (!armed) return;
    if (only_state) {  // the handle must journal the row itself: no eviction did it first
      ++seq.row(1).state().evictions;
      throw std::runtime_error("user hook failed after_attention");
    }
    auto& row = seq.row(0);  // row 0 evicts its first two live slots, then row 1 fails
    int done = 0;
    for (int s = 0; s < row.length() && done < 2; ++s)
      if (row.position(s) >= 0) row.evict(s), ++done;
    ++row.state().evictions;
    throw std::runtime_error("user hook failed after_attention");
  }
  template <class Seq>
  void compress_prompt(Seq& seq) const {
    if (!armed) return;
    auto& row = seq.row(1);
    for (int s = 0; s < row.length(); s += 2)
      if (row.position(s) >= 0) row.evict(s);
    row.compact();  // moves slots and frees pages
    ++row.state().evictions;
    throw std::runtime_error("user hook failed compress_prompt");
  }
};

struct throw_in_on_append : dms::policy<throw_in_on_append> {
  struct row_state {
    int appends = 0;
  };
  int fail_at = -1;  // position at which row 1's on_append throws
  const char* name() const { return "throws in on_append"; }
  void init_row(row_state&) const {}
  template <class Row>
  int choose_victim(const Row& row, const dms::token_info& tok) const {
    // Keep 5 tokens: overwrite the oldest (so a failed append must restore a victim's K/V).
    if (row.live() < 5) return -1;
    for (int s = 0; s < row.length(); ++s)
      if (row.position(s) == tok.position - 5) return s;
    return -1;
  }
  template <class Row>
  void on_append(Row& row, const dms::token_info& tok, int) const {
    ++row.state().appends;
    if (tok.position == fail_at && row.kv_head() == 1)
      throw std::runtime_error("user hook failed on_append");
  }
  template <class Seq>
  void after_attention(Seq&) const {}
};

template <class P>
std::vector<int> state_counts(const dms::paged_cache<float, P>& cache) {
  std::vector<int> out;
  for (int r = 0; r < cache.config().max_rows(); ++r) {
    if constexpr (std::is_same_v<P, throw_in_on_append>)
      out.push_back(cache.state(r).appends);
    else
      out.push_back(cache.state(r).evictions);
  }
  return out;
}

}  // namespace

TEST_CASE("hardening #11: a throwing user hook leaves the cache as it was", "[hardening]") {
  SECTION("after_attention throws after row 0 evicted") {
    dms::paged_cache<float, throw_after_evicting> cache(small_config());
    const int s = cache.add_sequence();
    for (int t = 0; t < 10; ++t) decode_token(cache, s, float(t));
    cache.policy().armed = true;
    const auto states = state_counts(cache);
    require_rejected<std::runtime_error>(
        cache, [&] { cache.finish_step(s); }, Contains("user hook failed after_attention"));
    REQUIRE(state_counts(cache) == states);
    REQUIRE(cache.row_live(0) == 10);
  }
  SECTION("after_attention throws after changing only a row's state") {
    dms::paged_cache<float, throw_after_evicting> cache(small_config());
    const int s = cache.add_sequence();
    for (int t = 0; t < 10; ++t) decode_token(cache, s, float(t));
    cache.policy().armed = cache.policy().only_state = true;
    const auto states = state_counts(cache);
    require_rejected<std::runtime_error>(
        cache, [&] { cache.finish_step(s); }, Contains("user hook failed after_attention"));
    REQUIRE(state_counts(cache) == states);
  }
  SECTION("compress_prompt throws after evicting and compacting row 1") {
    dms::paged_cache<float, throw_after_evicting> cache(small_config());
    const int s = cache.add_sequence();
    for (int t = 0; t < 13; ++t) append_token(cache, s, float(t));
    cache.row(s, 1).evict(7);  // a hole, so compaction has work before the new holes too
    cache.policy().armed = true;
    const auto states = state_counts(cache);
    const auto pages = cache.stats().pages_in_use;
    require_rejected<std::runtime_error>(
        cache, [&] { cache.finish_prompt(s); }, Contains("user hook failed compress_prompt"));
    REQUIRE(state_counts(cache) == states);
    REQUIRE(cache.stats().pages_in_use == pages);
    cache.policy().armed = false;
    for (int t = 0; t < 8; ++t) append_token(cache, s, float(t));  // pages still consistent
  }
  SECTION("on_append throws at row 1 after row 0 overwrote its victim") {
    dms::paged_cache<float, throw_in_on_append> cache(small_config());
    const int s = cache.add_sequence();
    for (int t = 0; t < 7; ++t) append_token(cache, s, float(t));
    cache.policy().fail_at = 7;
    const auto states = state_counts(cache);
    require_rejected<std::runtime_error>(
        cache, [&] { append_token(cache, s, 7.0f); }, Contains("user hook failed on_append"));
    REQUIRE(state_counts(cache) == states);
    cache.policy().fail_at = -1;
    append_token(cache, s, 7.0f);
    REQUIRE(cache.positions(0).size() == 5);
  }
  SECTION("on_append throws when the token needed a fresh page") {
    dms::paged_cache<float, throw_in_on_append> cache(small_config());
    const int s = cache.add_sequence();
    for (int t = 0; t < 4; ++t) append_token(cache, s, float(t));  // rows hold one full page
    cache.policy().fail_at = 4;
    const auto pages = cache.stats().pages_in_use;
    require_rejected<std::runtime_error>(
        cache, [&] { append_token(cache, s, 4.0f); }, Contains("user hook failed on_append"));
    REQUIRE(cache.stats().pages_in_use == pages);
  }
}

TEST_CASE("hardening #12: a user eviction under DMS or StreamingLLM does not brick the row",
          "[hardening]") {
  SECTION("DMS") {
    dms::paged_cache<float, dms::dms_policy> cache(small_config(), dms::dms_policy{{.window = 3}});
    const int s = cache.add_sequence();
    for (int t = 0; t < 6; ++t) append_token(cache, s, float(t), 1.0f);  // every token flagged
    // Evict the token whose slot the ring would hand to the next append (position 2) and one in
    // the middle of the window.
    auto row = cache.row(s, 0);
    for (int slot = 0; slot < row.length(); ++slot)
      if (row.position(slot) == 2 || row.position(slot) == 4) row.evict(slot);
    for (int t = 6; t < 40; ++t) {
      append_token(cache, s, float(t), t % 3 ? 1.0f : -1.0f);
      const auto pos = cache.positions(cache.row_index(s, 0));
      for (const auto p : pos) REQUIRE((p != 2 && p != 4));
      REQUIRE(cache.row_length(cache.row_index(s, 0)) <= 40);
    }
    // Row 1 (untouched) follows the DMS rule exactly: the unflagged tokens and the last w + 1.
    std::vector<std::int32_t> kept;
    for (const auto p : cache.positions(cache.row_index(s, 1)))
      if (p >= 0) kept.push_back(p);
    std::sort(kept.begin(), kept.end());
    std::vector<std::int32_t> want;
    for (int p = 0; p < 40; ++p)
      if (p >= 36 || (p + 1 >= 6 && (p + 1) % 3 == 0))  // token p+1's logit flags p
        want.push_back(p);
    REQUIRE(kept == want);
  }
  SECTION("StreamingLLM") {
    dms::paged_cache<float, dms::streaming_llm_policy> cache(
        small_config(), dms::streaming_llm_policy({.sinks = 1, .recent = 4}));
    const int s = cache.add_sequence();
    for (int t = 0; t < 8; ++t) append_token(cache, s, float(t));
    auto row = cache.row(s, 0);
    for (int slot = 0; slot < row.length(); ++slot)
      if (row.position(slot) == 5) row.evict(slot);
    for (int t = 8; t < 30; ++t) {
      append_token(cache, s, float(t));
      std::vector<std::int32_t> kept;
      for (const auto p : cache.positions(cache.row_index(s, 0)))
        if (p >= 0) kept.push_back(p);
      std::sort(kept.begin(), kept.end());
      std::vector<std::int32_t> want{0};  // the sink and the 4 newest, minus the evicted one
      for (int p = t - 3; p <= t; ++p)
        if (p != 5) want.push_back(p);
      REQUIRE(kept == want);
    }
  }
}

TEST_CASE("hardening #13: record_reads rejects a negative count", "[hardening]") {
  dms::paged_cache<float> cache(small_config());
  const int s = cache.add_sequence();
  decode_token(cache, s, 1.0f);
  require_rejected(
      cache, [&] { cache.record_reads(-100); },
      Contains("record_reads: slots = -100 is outside the valid range [0, "));
  cache.record_reads(3);
  REQUIRE(cache.stats().kv_token_reads == 2 + 3);
}

TEST_CASE("hardening #14: Quest's defaults save reads", "[hardening]") {
  dms::cache_config c = small_config();
  c.page_size = 16;
  c.max_pages = 256;
  c.max_row_slots = 2048;
  dms::paged_cache<float, dms::quest_policy> cache(c, dms::quest_policy({.token_budget = 64}));
  const int s = cache.add_sequence();
  for (int t = 0; t < 1024; ++t) append_token(cache, s, 0.001f * float(t));
  const auto before = cache.stats().kv_token_reads;
  const auto q = ramp(16, 0.1f);
  std::vector<float> out(16);
  dms::reference::decode_attention(cache, s, q, out);
  const auto read = cache.stats().kv_token_reads - before;
  REQUIRE(read == 2 * 64);  // 4 pages of 16 per row, not all 1024 tokens
}

TEST_CASE("hardening #15: budgets that cannot bind and a negative softmax scale are rejected",
          "[hardening]") {
  const dms::cache_config c = small_config();  // max_row_slots 64, page_size 4
  REQUIRE_THROWS_WITH(
      (dms::paged_cache<float, dms::tova_policy>(c, dms::tova_policy({.budget = 100000}))),
      Contains("tova_params.budget = 100000") && Contains("max_row_slots - 1 = 63"));
  REQUIRE_THROWS_WITH(
      (dms::paged_cache<float, dms::h2o_policy>(c, dms::h2o_policy({.budget = 64, .recent = 8}))),
      Contains("h2o_params.budget = 64"));
  REQUIRE_THROWS_WITH((dms::paged_cache<float, dms::streaming_llm_policy>(
                          c, dms::streaming_llm_policy({.sinks = 4, .recent = 61}))),
                      Contains("sinks + recent = 4 + 61"));
  REQUIRE_THROWS_WITH(
      (dms::paged_cache<float, dms::snapkv_policy>(c, dms::snapkv_policy({.capacity = 65}))),
      Contains("snapkv_params.capacity = 65"));
  REQUIRE_THROWS_WITH(
      (dms::paged_cache<float, dms::quest_policy>(c, dms::quest_policy({.token_budget = 1}))),
      Contains("quest_params.token_budget = 1") && Contains("page_size = 4"));

  dms::paged_cache<float, dms::tova_policy> cache(c, dms::tova_policy({.budget = 4}));
  const int s = cache.add_sequence();
  for (int t = 0; t < 6; ++t) decode_token(cache, s, float(t));
  const auto q = ramp(16, 0.0f), kv = ramp(8, 0.0f);
  std::vector<float> out(16);
  for (const float scale : {-3.0f, kNaN, kInf}) {
    dms::reference::decode_extras ex;
    ex.softmax_scale = scale;
    // (A Catch matcher combined with && holds references: keep it one matcher.)
    const auto message = Contains("is outside the valid range: 0 (meaning 1 / sqrt(head_dim))");
    require_rejected(
        cache, [&] { dms::reference::decode_attention(cache, s, q, out, ex); }, message);
    require_rejected(
        cache, [&] { dms::reference::decode_step(cache, s, q, kv, kv, {}, out, ex); }, message);
    require_rejected(
        cache,
        [&] {
          dms::reference::prefill(cache, s, {q, kv, kv}, 1, {out, {}, scale});
        },
        message);
  }
}
