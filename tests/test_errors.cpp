// SPDX-License-Identifier: Apache-2.0
// Bad input: every host API throws dms::error whose message names the offending field and value,
// and a call that throws leaves the cache exactly as it was (stats, positions, keys), so a valid
// call afterwards works as if nothing had happened.

#include <catch2/catch.hpp>
#include <cstdint>
#include <functional>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "dms/dms.hpp"

using Catch::Contains;

namespace {

dms::cache_config base_config() {
  dms::cache_config c;
  c.num_kv_heads = 2;
  c.group_size = 2;
  c.head_dim = 4;
  c.page_size = 2;
  c.max_pages = 64;
  c.max_sequences = 3;
  c.max_row_slots = 64;
  return c;
}

// Everything observable about a cache: stats, and per live row its positions, counters and keys.
struct snapshot {
  std::vector<std::int64_t> stats;
  double compression_ratio = 0;
  std::vector<int> sequences;
  std::vector<std::vector<std::int32_t>> positions;
  std::vector<std::int64_t> counters;
  std::vector<float> keys;
  bool operator==(const snapshot&) const = default;
};

template <class T, class P>
snapshot snapshot_of(const dms::paged_cache<T, P>& cache) {
  snapshot s;
  const auto st = cache.stats();
  s.stats = {st.tokens_seen, st.live_slots, st.peak_live_slots, st.kv_token_reads, st.pages_in_use};
  s.compression_ratio = st.compression_ratio;
  s.sequences = cache.sequences();
  const auto view = cache.view();
  for (int seq : s.sequences)
    for (int h = 0; h < cache.config().num_kv_heads; ++h) {
      const int r = cache.row_index(seq, h);
      s.positions.push_back(cache.positions(r));
      s.counters.insert(s.counters.end(), {cache.row_length(r), cache.row_live(r),
                                           cache.row_peak(r), cache.tokens_seen(r)});
      for (int slot = 0; slot < cache.row_length(r); ++slot)
        for (int c = 0; c < cache.config().head_dim; ++c)
          s.keys.push_back(dms::to_float(view.key(r, slot)[c]));
    }
  return s;
}

// Appends one token (with decision logits if the policy takes them) to `seq`.
template <class T, class P>
void append_valid(dms::paged_cache<T, P>& cache, int seq, float value = 1.0f) {
  const auto& cfg = cache.config();
  const std::vector<float> kv(std::size_t(cfg.num_kv_heads) * cfg.head_dim, value);
  const std::vector<float> logits(P::uses_decision_logits ? cfg.num_kv_heads : 0, 1.0f);
  cache.append(seq, std::span<const float>(kv), std::span<const float>(kv), logits);
}

// `call` throws dms::error matching `message`, and the cache is unchanged.
template <class Cache, class Matcher>
void require_rejected(Cache& cache, const std::function<void()>& call, const Matcher& message) {
  const snapshot before = snapshot_of(cache);
  REQUIRE_THROWS_AS(call(), dms::error);
  REQUIRE_THROWS_WITH(call(), message);
  REQUIRE(snapshot_of(cache) == before);
}

// A cache with some history: two sequences, one token evicted, a decode step or two.
// DMS with a window that fits base_config's rows (the default 512 would be rejected).
template <class P>
P small_policy() {
  if constexpr (std::is_same_v<P, dms::dms_policy>)
    return P{{.window = 8}};
  else
    return P{};
}

template <class P = dms::dms_policy>
dms::paged_cache<float, P> used_cache(P policy = small_policy<P>()) {
  dms::paged_cache<float, P> cache(base_config(), std::move(policy));
  const int a = cache.add_sequence(), b = cache.add_sequence();
  for (int t = 0; t < 5; ++t) append_valid(cache, a, float(t));
  for (int t = 0; t < 3; ++t) append_valid(cache, b, float(-t));
  cache.row(a, 1).evict(2);
  return cache;
}

}  // namespace

TEST_CASE("errors: every invalid cache_config field is named with its value", "[errors]") {
  struct bad_field {
    const char* name;
    int dms::cache_config::*field;
    int value;
  };
  const dms::cache_config ok = base_config();
  const std::vector<bad_field> cases{
      {"num_kv_heads", &dms::cache_config::num_kv_heads, 0},
      {"num_kv_heads", &dms::cache_config::num_kv_heads, -1},
      {"num_kv_heads", &dms::cache_config::num_kv_heads, 1025},
      {"group_size", &dms::cache_config::group_size, 0},
      {"group_size", &dms::cache_config::group_size, -4},
      {"group_size", &dms::cache_config::group_size, dms::cache_config::max_group_size + 1},
      {"head_dim", &dms::cache_config::head_dim, 0},
      {"head_dim", &dms::cache_config::head_dim, -128},
      {"head_dim", &dms::cache_config::head_dim, dms::cache_config::max_head_dim + 1},
      {"page_size", &dms::cache_config::page_size, 0},
      {"page_size", &dms::cache_config::page_size, -16},
      {"page_size", &dms::cache_config::page_size, dms::cache_config::max_page_size + 1},
      {"max_pages", &dms::cache_config::max_pages, 0},
      {"max_pages", &dms::cache_config::max_pages, -1},
      {"max_pages", &dms::cache_config::max_pages, (1 << 30) / ok.page_size + 1},
      {"max_sequences", &dms::cache_config::max_sequences, 0},
      {"max_sequences", &dms::cache_config::max_sequences, -2},
      {"max_sequences", &dms::cache_config::max_sequences, (1 << 20) + 1},
      {"max_row_slots", &dms::cache_config::max_row_slots, 0},
      {"max_row_slots", &dms::cache_config::max_row_slots, -5},
      {"max_row_slots", &dms::cache_config::max_row_slots, (1 << 30) + 1},
  };
  for (const auto& c : cases) {
    DYNAMIC_SECTION(c.name << " = " << c.value) {
      dms::cache_config cfg = ok;
      cfg.*c.field = c.value;
      const auto message =
          Contains(std::string("cache_config.") + c.name + " = " + std::to_string(c.value));
      REQUIRE_THROWS_AS(cfg.validate(), dms::error);
      REQUIRE_THROWS_WITH(cfg.validate(), message);
      REQUIRE_THROWS_WITH((dms::paged_cache<float>(cfg)), message);
      REQUIRE_THROWS_WITH((dms::paged_cache<dms::half, dms::quest_policy>(cfg)), message);
    }
  }
  SECTION("a page table too large to address") {
    dms::cache_config cfg = ok;
    cfg.num_kv_heads = 64;
    cfg.max_sequences = 1 << 16;
    cfg.max_row_slots = 1 << 16;
    cfg.page_size = 16;  // 2^22 rows * 2^12 pages per row = 2^34 entries
    REQUIRE_THROWS_WITH(cfg.validate(), Contains("page-table entries") && Contains("17179869184"));
  }
  SECTION("the message is prefixed and gives the valid range") {
    dms::cache_config cfg = ok;
    cfg.head_dim = 0;
    REQUIRE_THROWS_WITH(cfg.validate(),
                        "dms: cache_config.head_dim = 0 is outside the valid range [1, 1024]");
  }
}

TEST_CASE("errors: invalid policy parameters are named with their value", "[errors]") {
  REQUIRE_THROWS_WITH(dms::dms_policy(dms::dms_params{-1}), Contains("dms_params.window = -1"));
  REQUIRE_NOTHROW(dms::dms_policy(dms::dms_params{0}));

  REQUIRE_THROWS_WITH(dms::tova_policy(dms::tova_params{0, dms::tova_ranking::per_kv_head}),
                      Contains("tova_params.budget = 0"));
  REQUIRE_THROWS_WITH(dms::tova_policy(dms::tova_params{-3, dms::tova_ranking::layer_average}),
                      Contains("tova_params.budget = -3"));

  REQUIRE_THROWS_WITH(dms::h2o_policy(dms::h2o_params{3, 4}),
                      Contains("h2o_params.budget = 3") && Contains("recent = 4"));
  REQUIRE_THROWS_WITH(dms::h2o_policy(dms::h2o_params{0, 0}), Contains("h2o_params.budget = 0"));
  REQUIRE_THROWS_WITH(dms::h2o_policy(dms::h2o_params{8, -1}), Contains("h2o_params.recent = -1"));
  REQUIRE_NOTHROW(dms::h2o_policy(dms::h2o_params{4, 4}));

  REQUIRE_THROWS_WITH(dms::streaming_llm_policy(dms::streaming_params{4, 0}),
                      Contains("streaming_params.recent = 0"));
  REQUIRE_THROWS_WITH(dms::streaming_llm_policy(dms::streaming_params{-1, 8}),
                      Contains("streaming_params.sinks = -1"));

  REQUIRE_THROWS_WITH(dms::snapkv_policy(dms::snapkv_params{4, 8, 7, dms::snapkv_pooling::max}),
                      Contains("snapkv_params.capacity = 4") && Contains("window = 8"));
  REQUIRE_THROWS_WITH(dms::snapkv_policy(dms::snapkv_params{64, 8, 6, dms::snapkv_pooling::avg}),
                      Contains("snapkv_params.kernel = 6"));
  REQUIRE_THROWS_WITH(dms::snapkv_policy(dms::snapkv_params{64, 0, 7, dms::snapkv_pooling::max}),
                      Contains("snapkv_params.window = 0"));

  REQUIRE_THROWS_WITH(dms::quest_policy(dms::quest_params{0, 0, 2}),
                      Contains("quest_params.token_budget = 0"));
  REQUIRE_THROWS_WITH(dms::quest_policy(dms::quest_params{64, -1, 2}),
                      Contains("quest_params.layer = -1"));
  REQUIRE_THROWS_WITH(dms::quest_policy(dms::quest_params{64, 0, -2}),
                      Contains("quest_params.dense_layers = -2"));
}

TEST_CASE("errors: unknown sequence ids", "[errors]") {
  auto cache = used_cache();
  const int removed = cache.add_sequence();  // id 2
  append_valid(cache, removed);
  cache.remove_sequence(removed);
  const auto& cfg = cache.config();
  const std::size_t qn = std::size_t(cfg.num_query_heads()) * cfg.head_dim,
                    kn = std::size_t(cfg.num_kv_heads) * cfg.head_dim;
  const std::vector<float> q(qn, 0.5f), k(kn, 0.5f), logits(cfg.num_kv_heads, -1.0f);
  std::vector<float> out(qn);

  for (const int id : {removed, -1, cfg.max_sequences, 1000}) {
    DYNAMIC_SECTION("id " << id) {
      const auto message = Contains("unknown sequence id " + std::to_string(id));
      require_rejected(
          cache, [&] { cache.append(id, k, k, logits); }, message);
      require_rejected(
          cache, [&] { cache.finish_step(id); }, message);
      require_rejected(
          cache, [&] { cache.finish_prompt(id); }, message);
      require_rejected(
          cache, [&] { cache.remove_sequence(id); }, message);
      require_rejected(
          cache, [&] { (void)cache.row(id, 0); }, message);
      require_rejected(
          cache, [&] { (void)cache.sequence(id); }, message);
      require_rejected(
          cache, [&] { dms::reference::decode_step(cache, id, q, k, k, logits, out); }, message);
      require_rejected(
          cache, [&] { dms::reference::decode_attention(cache, id, q, out); }, message);
      require_rejected(
          cache,
          [&] {
            dms::reference::prefill(cache, id, {q, k, k, logits}, 4, {out, {}});
          },
          message);
      REQUIRE_FALSE(cache.contains(id));
    }
  }
  SECTION("a kv head out of range") {
    require_rejected(
        cache, [&] { (void)cache.row(0, 2); }, Contains("kv_head = 2"));
    require_rejected(
        cache, [&] { (void)cache.row(0, -1); }, Contains("kv_head = -1"));
  }
  append_valid(cache, 0);
  REQUIRE(cache.tokens_seen(cache.row_index(0, 0)) == 6);
}

TEST_CASE("errors: wrong sizes of k, v, logits, q, out and lse", "[errors]") {
  auto cache = used_cache();
  const auto& cfg = cache.config();
  const std::size_t qn = std::size_t(cfg.num_query_heads()) * cfg.head_dim,
                    kn = std::size_t(cfg.num_kv_heads) * cfg.head_dim;
  const std::size_t Hq = std::size_t(cfg.num_query_heads()), Hk = std::size_t(cfg.num_kv_heads);
  const std::vector<float> q(qn, 0.5f), k(kn, 0.5f), logits(Hk, -1.0f);
  std::vector<float> out(qn), lse(Hq);
  const auto sized = [](std::size_t n) { return std::vector<float>(n, 0.25f); };

  for (const std::size_t bad : {kn - 1, kn + 1, std::size_t(0)}) {
    DYNAMIC_SECTION("k/v with " << bad << " elements") {
      const auto wrong = sized(bad);
      const auto n = " has " + std::to_string(bad) + " elements; expected " + std::to_string(kn);
      require_rejected(
          cache, [&] { cache.append(0, wrong, k, logits); }, Contains("append: k" + n));
      require_rejected(
          cache, [&] { cache.append(0, k, wrong, logits); }, Contains("append: v" + n));
      require_rejected(
          cache, [&] { dms::reference::decode_step(cache, 0, q, wrong, k, logits, out); },
          Contains("append: k" + n));
    }
  }
  for (const std::size_t bad : {Hk - 1, Hk + 1, std::size_t(0)}) {
    DYNAMIC_SECTION("logits with " << bad << " elements") {
      const auto wrong = sized(bad);
      require_rejected(
          cache, [&] { cache.append(0, k, k, wrong); },
          Contains("append: decision_logits has " + std::to_string(bad) + " elements"));
    }
  }
  for (const std::size_t bad : {qn - 1, qn + 1, std::size_t(0)}) {
    DYNAMIC_SECTION("q/out with " << bad << " elements") {
      auto wrong = sized(bad);
      const auto n = " has " + std::to_string(bad) + " elements";
      require_rejected(
          cache, [&] { dms::reference::decode_step(cache, 0, wrong, k, k, logits, out); },
          Contains("decode_step: q" + n));
      require_rejected(
          cache, [&] { dms::reference::decode_step(cache, 0, q, k, k, logits, wrong); },
          Contains("decode_step: out" + n));
      require_rejected(
          cache, [&] { dms::reference::decode_attention(cache, 0, wrong, out); },
          Contains("decode_attention: q" + n));
      require_rejected(
          cache, [&] { dms::reference::decode_attention(cache, 0, q, wrong); },
          Contains("decode_attention: out" + n));
    }
  }
  SECTION("lse") {
    std::vector<float> wrong(Hq + 1);
    dms::reference::decode_extras extras;
    extras.lse = wrong;
    require_rejected(
        cache, [&] { dms::reference::decode_step(cache, 0, q, k, k, logits, out, extras); },
        Contains("decode_step: lse has " + std::to_string(Hq + 1) + " elements"));
    require_rejected(
        cache, [&] { dms::reference::decode_attention(cache, 0, q, out, extras); },
        Contains("decode_attention: lse has " + std::to_string(Hq + 1) + " elements"));
  }
  SECTION("prefill_chunk") {
    const int T = 3;
    const auto tq = sized(T * qn), tk = sized(T * kn), tl = sized(T * Hk);
    auto tout = sized(T * qn), tlse = sized(T * Hq);
    const int seq = cache.add_sequence();
    const auto chunk = [&](const std::vector<float>& cq, const std::vector<float>& ck,
                           const std::vector<float>& cv, const std::vector<float>& cl,
                           std::vector<float>& co, std::vector<float>& cs) {
      dms::reference::prefill_chunk(cache, seq, {cq, ck, cv, cl}, T, {co, cs});
    };
    const auto bad = [&](std::size_t n) { return " has " + std::to_string(n) + " elements"; };
    require_rejected(
        cache, [&] { chunk(sized(T * qn - 1), tk, tk, tl, tout, tlse); },
        Contains("prefill: q" + bad(T * qn - 1) + ", not a multiple"));
    for (const std::size_t n : {T * kn - 1, T * kn + 1, std::size_t(0)}) {
      require_rejected(
          cache, [&] { chunk(tq, sized(n), tk, tl, tout, tlse); }, Contains("prefill: k" + bad(n)));
      require_rejected(
          cache, [&] { chunk(tq, tk, sized(n), tl, tout, tlse); }, Contains("prefill: v" + bad(n)));
    }
    for (const std::size_t n : {T * Hk - 1, T * Hk + 1, std::size_t(0)})
      require_rejected(
          cache, [&] { chunk(tq, tk, tk, sized(n), tout, tlse); },
          Contains("prefill: decision_logits" + bad(n)));
    for (const std::size_t n : {T * qn - 2, T * qn + 1}) {
      auto wrong = sized(n);
      require_rejected(
          cache, [&] { chunk(tq, tk, tk, tl, wrong, tlse); }, Contains("prefill: out" + bad(n)));
    }
    for (const std::size_t n : {T * Hq - 1, T * Hq + 1}) {
      auto wrong = sized(n);
      require_rejected(
          cache, [&] { chunk(tq, tk, tk, tl, tout, wrong); }, Contains("prefill: lse" + bad(n)));
    }
    require_rejected(
        cache,
        [&] {
          dms::reference::prefill(cache, seq, {tq, tk, tk, tl}, 0, {tout, tlse});
        },
        Contains("chunk_size = 0"));
    require_rejected(
        cache,
        [&] {
          dms::reference::prefill(cache, seq, {sized(T * qn + 2), tk, tk, tl}, 2, {tout, tlse});
        },
        Contains("prefill: q" + bad(T * qn + 2) + ", not a multiple"));
    dms::reference::prefill(cache, seq, {tq, tk, tk, tl}, 2, {tout, tlse});
    REQUIRE(cache.tokens_seen(cache.row_index(seq, 0)) == T);
  }
  append_valid(cache, 0);
  REQUIRE(cache.tokens_seen(cache.row_index(0, 0)) == 6);
}

TEST_CASE("errors: decision logits given to a policy that takes none", "[errors]") {
  // Policies without decision logits accept none, or ignore [num_kv_heads] of them (so one driver
  // can feed every policy); any other size is an error.
  auto cache = used_cache<dms::dense_policy>();
  const auto& cfg = cache.config();
  const std::size_t qn = std::size_t(cfg.num_query_heads()) * cfg.head_dim,
                    kn = std::size_t(cfg.num_kv_heads) * cfg.head_dim;
  const std::vector<float> q(qn, 0.5f), k(kn, 0.5f), wrong(3, -1.0f),
      ignored(2, std::numeric_limits<float>::quiet_NaN());
  std::vector<float> out(qn);
  const auto message = Contains("decision_logits has 3 elements; expected 2");
  require_rejected(
      cache, [&] { cache.append(0, k, k, wrong); }, message);
  require_rejected(
      cache, [&] { dms::reference::decode_step(cache, 0, q, k, k, wrong, out); }, message);
  const int seq = cache.add_sequence();
  require_rejected(
      cache,
      [&] {
        dms::reference::prefill_chunk(cache, seq, {q, k, k, wrong}, 1, {out, {}});
      },
      Contains("prefill: decision_logits has 3 elements; expected 2"));

  // Ignored, even when not finite: the result is that of no logits at all.
  auto reference = used_cache<dms::dense_policy>();
  (void)reference.add_sequence();
  cache.append(0, k, k, ignored);
  reference.append(0, k, k);
  dms::reference::prefill_chunk(cache, seq, {q, k, k, ignored}, 1, {out, {}});
  dms::reference::prefill_chunk(reference, seq, {q, k, k}, 1, {out, {}});
  REQUIRE(snapshot_of(cache) == snapshot_of(reference));

  auto tova = used_cache(dms::tova_policy(dms::tova_params{4, dms::tova_ranking::per_kv_head}));
  require_rejected(
      tova, [&] { tova.append(0, k, k, wrong); }, message);
  append_valid(tova, 0);
}

TEST_CASE("errors: non-finite decision logits are rejected by DMS", "[errors]") {
  auto cache = used_cache();
  const auto& cfg = cache.config();
  const std::size_t qn = std::size_t(cfg.num_query_heads()) * cfg.head_dim,
                    kn = std::size_t(cfg.num_kv_heads) * cfg.head_dim;
  const std::vector<float> q(qn, 0.5f), k(kn, 0.5f);
  std::vector<float> out(qn);
  const float nan = std::numeric_limits<float>::quiet_NaN(),
              inf = std::numeric_limits<float>::infinity();

  for (const float bad : {nan, inf, -inf}) {
    const std::string text = bad != bad ? "nan" : bad > 0 ? "= inf" : "-inf";
    DYNAMIC_SECTION("append with " << text) {
      const std::vector<float> logits{-1.0f, bad};
      require_rejected(
          cache, [&] { cache.append(0, k, k, logits); },
          Contains("decision_logits[1]") && Contains(text));
      require_rejected(
          cache, [&] { dms::reference::decode_step(cache, 0, q, k, k, logits, out); },
          Contains("decision_logits[1]") && Contains(text));
    }
    DYNAMIC_SECTION("prefill with " << text) {
      const int T = 4;
      std::vector<float> tq(T * qn, 0.5f), tk(T * kn, 0.5f), tl(T * 2, -1.0f), tout(T * qn);
      tl[2 * 2 + 1] = bad;  // token 2, head 1
      const int seq = cache.add_sequence();
      require_rejected(
          cache,
          [&] {
            dms::reference::prefill(cache, seq, {tq, tk, tk, tl}, T, {tout, {}});
          },
          Contains("decision_logits[2][1]") && Contains(text));
    }
  }
  append_valid(cache, 0);
  REQUIRE(cache.tokens_seen(cache.row_index(0, 0)) == 6);
}

TEST_CASE("errors: a non-finite logit in a later prefill chunk leaves the cache unchanged",
          "[errors]") {
  // prefill() validates a chunk only when it gets to it; earlier chunks are already in the cache.
  auto cache = used_cache();
  const auto& cfg = cache.config();
  const std::size_t qn = std::size_t(cfg.num_query_heads()) * cfg.head_dim,
                    kn = std::size_t(cfg.num_kv_heads) * cfg.head_dim;
  const int T = 6;
  std::vector<float> tq(T * qn, 0.5f), tk(T * kn, 0.5f), tl(T * 2, -1.0f), tout(T * qn);
  tl[5 * 2] = std::numeric_limits<float>::quiet_NaN();  // token 5, in the third chunk of 2
  const int seq = cache.add_sequence();
  require_rejected(
      cache,
      [&] {
        dms::reference::prefill(cache, seq, {tq, tk, tk, tl}, 2, {tout, {}});
      },
      Contains("decision_logits") && Contains("nan"));
}

TEST_CASE("errors: capacity", "[errors]") {
  SECTION("the page pool runs out") {
    auto cfg = base_config();  // 2 rows per sequence, 2 slots per page
    cfg.max_pages = 5;
    dms::paged_cache<float> cache(cfg);
    const int a = cache.add_sequence(), b = cache.add_sequence();
    append_valid(cache, a);
    append_valid(cache, a);  // a: 1 page per row, full
    append_valid(cache, b);  // b: 1 page per row; 1 page left
    // (Catch's combined matchers refer to their parts: build them in the call, never store them.)
    // Row 0 alone would fit: nothing may be written unless both fit.
    require_rejected(
        cache, [&] { append_valid(cache, a); },
        Contains("page pool exhausted") && Contains("needs 2 new pages") &&
            Contains("max_pages = 5"));
    append_valid(cache, b);  // b's second token needs no page
    require_rejected(
        cache, [&] { append_valid(cache, b); },
        Contains("page pool exhausted") && Contains("needs 2 new pages") &&
            Contains("max_pages = 5"));
    cache.remove_sequence(b);
    append_valid(cache, a);
    REQUIRE(cache.positions(cache.row_index(a, 1)) == std::vector<std::int32_t>{0, 1, 2});
  }
  SECTION("a row is full") {
    auto cfg = base_config();
    cfg.max_row_slots = 3;
    dms::paged_cache<float> cache(cfg);
    const int a = cache.add_sequence();
    for (int t = 0; t < 3; ++t) append_valid(cache, a);
    require_rejected(
        cache, [&] { append_valid(cache, a); },
        Contains("is full") && Contains("max_row_slots = 3"));
    cache.row(a, 0).evict(1);  // row 0 has a hole now, row 1 is still full
    require_rejected(
        cache, [&] { append_valid(cache, a); }, Contains("kv head 1 is full"));
    cache.row(a, 1).evict(0);
    append_valid(cache, a);
    REQUIRE(cache.positions(cache.row_index(a, 0)) == std::vector<std::int32_t>{0, 3, 2});
    REQUIRE(cache.positions(cache.row_index(a, 1)) == std::vector<std::int32_t>{3, 1, 2});
  }
  SECTION("all sequence slots are in use") {
    auto cfg = base_config();
    cfg.max_sequences = 2;
    dms::paged_cache<float> cache(cfg);
    const int a = cache.add_sequence();
    (void)cache.add_sequence();
    append_valid(cache, a);
    require_rejected(
        cache, [&] { (void)cache.add_sequence(); },
        Contains("all 2 sequence slots") && Contains("max_sequences"));
    cache.remove_sequence(a);
    REQUIRE(cache.add_sequence() == a);
  }
}

TEST_CASE("errors: the page pool running out during a prefill chunk leaves the cache unchanged",
          "[errors]") {
  // prefill_chunk appends its tokens one by one without checking capacity for the whole chunk
  // first, so the tokens before the one that does not fit stay in the cache.
  auto cfg = base_config();
  cfg.max_pages = 4;
  dms::paged_cache<float> cache(cfg);
  const int a = cache.add_sequence();
  append_valid(cache, a);  // 1 page per row, 2 pages free
  const std::size_t qn = std::size_t(cfg.num_query_heads()) * cfg.head_dim,
                    kn = std::size_t(cfg.num_kv_heads) * cfg.head_dim;
  const int T = 4;  // 1 + 4 tokens need 3 pages per row
  std::vector<float> tq(T * qn, 0.5f), tk(T * kn, 0.5f), tout(T * qn);
  require_rejected(
      cache,
      [&] {
        dms::reference::prefill(cache, a, {tq, tk, tk, {}}, T, {tout, {}});
      },
      Contains("page pool exhausted"));
}

TEST_CASE("errors: prefill() rejects k, v, logits, out and lse longer than the prompt",
          "[errors]") {
  // prefill() slices every array by the token count taken from q and hands the slices to
  // prefill_chunk, so extra elements are silently ignored (and too few would be read past the end).
  auto cache = used_cache();
  const auto& cfg = cache.config();
  const std::size_t qn = std::size_t(cfg.num_query_heads()) * cfg.head_dim,
                    kn = std::size_t(cfg.num_kv_heads) * cfg.head_dim;
  const int T = 3;
  const std::vector<float> tq(T * qn, 0.5f), tk(T * kn, 0.5f), tl(T * 2, -1.0f),
      long_k(T * kn + 1, 0.5f), long_l(T * 2 + 1, -1.0f);
  std::vector<float> tout(T * qn), long_out(T * qn + 1), long_lse(T * cfg.num_query_heads() + 1);
  const int seq = cache.add_sequence();
  require_rejected(
      cache,
      [&] {
        dms::reference::prefill(cache, seq, {tq, long_k, tk, tl}, T, {tout, {}});
      },
      Contains("prefill: k has " + std::to_string(T * kn + 1) + " elements"));
  require_rejected(
      cache,
      [&] {
        dms::reference::prefill(cache, seq, {tq, tk, long_k, tl}, T, {tout, {}});
      },
      Contains("prefill: v has " + std::to_string(T * kn + 1) + " elements"));
  require_rejected(
      cache,
      [&] {
        dms::reference::prefill(cache, seq, {tq, tk, tk, long_l}, T, {tout, {}});
      },
      Contains("prefill: decision_logits has " + std::to_string(T * 2 + 1) + " elements"));
  require_rejected(
      cache,
      [&] {
        dms::reference::prefill(cache, seq, {tq, tk, tk, tl}, T, {long_out, {}});
      },
      Contains("prefill: out has " + std::to_string(T * qn + 1) + " elements"));
  require_rejected(
      cache,
      [&] {
        dms::reference::prefill(cache, seq, {tq, tk, tk, tl}, T, {tout, long_lse});
      },
      Contains("prefill: lse has " + std::to_string(T * cfg.num_query_heads() + 1) + " elements"));
}

TEST_CASE("errors: prefill padding and prompt length", "[errors]") {
  auto cache = used_cache();
  const auto& cfg = cache.config();
  const std::size_t qn = std::size_t(cfg.num_query_heads()) * cfg.head_dim,
                    kn = std::size_t(cfg.num_kv_heads) * cfg.head_dim;
  const auto tokens = [&](int n) {
    return std::vector<std::vector<float>>{
        std::vector<float>(n * qn, 0.5f), std::vector<float>(n * kn, 0.5f),
        std::vector<float>(n * 2, -1.0f), std::vector<float>(n * qn)};
  };
  const int seq = cache.add_sequence();
  auto c2 = tokens(2);
  dms::reference::prefill_chunk(cache, seq, {c2[0], c2[1], c2[1], c2[2]}, 6,
                                {c2[3], {}});  // 2 of 6

  SECTION("padding after real tokens") {
    auto c = tokens(3);
    require_rejected(
        cache,
        [&] {
          dms::reference::prefill_chunk(cache, seq, {c[0], c[1], c[1], c[2], 1}, 6, {c[3], {}});
        },
        Contains("padding = 1") && Contains("already holds 2 tokens"));
    require_rejected(
        cache,
        [&] {
          dms::reference::prefill(cache, seq, {c[0], c[1], c[1], c[2], 2}, 3, {c[3], {}});
        },
        Contains("padding = 2"));
  }
  SECTION("more padding than tokens") {
    auto c = tokens(3);
    require_rejected(
        cache,
        [&] {
          dms::reference::prefill_chunk(cache, seq, {c[0], c[1], c[1], c[2], 4}, 6, {c[3], {}});
        },
        Contains("padding = 4") && Contains("[0, 3]"));
    require_rejected(
        cache,
        [&] {
          dms::reference::prefill(cache, seq, {c[0], c[1], c[1], c[2], -1}, 3, {c[3], {}});
        },
        Contains("padding = -1"));
  }
  SECTION("a chunk past the prompt length") {
    auto c = tokens(5);
    require_rejected(
        cache,
        [&] {
          dms::reference::prefill_chunk(cache, seq, {c[0], c[1], c[1], c[2]}, 6, {c[3], {}});
        },
        Contains("chunk ends at token 7") && Contains("prompt_length = 6"));
  }
  SECTION("another chunk after the prompt is complete") {
    auto c = tokens(4);
    dms::reference::prefill_chunk(cache, seq, {c[0], c[1], c[1], c[2]}, 6, {c[3], {}});
    auto one = tokens(1);
    require_rejected(
        cache,
        [&] {
          dms::reference::prefill_chunk(cache, seq, {one[0], one[1], one[1], one[2]}, 6,
                                        {one[3], {}});
        },
        Contains("past prompt_length = 6"));
  }
  // The prompt can still be completed, and decode continues.
  const int have = cache.tokens_seen(cache.row_index(seq, 0));
  if (have < 6) {
    auto c = tokens(6 - have);
    dms::reference::prefill_chunk(cache, seq, {c[0], c[1], c[1], c[2]}, 6, {c[3], {}});
  }
  append_valid(cache, seq);
  REQUIRE(cache.tokens_seen(cache.row_index(seq, 0)) == 7);
}

TEST_CASE("errors: evicting a slot that holds nothing", "[errors]") {
  auto cache = used_cache<dms::dense_policy>();
  auto row = cache.row(0, 1);  // slot 2 was evicted by used_cache
  require_rejected(
      cache, [&] { row.evict(2); }, Contains("evict: slot 2"));
  require_rejected(
      cache, [&] { row.evict(5); }, Contains("evict: slot 5"));
  require_rejected(
      cache, [&] { row.evict(-1); }, Contains("evict: slot -1"));
  append_valid(cache, 0);
}
