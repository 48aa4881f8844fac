// SPDX-License-Identifier: Apache-2.0
// DMS (spec "DMS"): the shift rule, delayed eviction and the memory it implies, checked against an
// oracle written straight from the spec:
//
//   flag[j] = (l[j+1] > 0)   (the logit of token j+1 flags token j; l[0] applies to nothing)
//   after token t, the row holds exactly { j <= t : flag[j] == 0  or  t - j <= w }
//
// which is also the set of keys query t may see (rule 4), so attention outputs are compared with a
// brute-force softmax over that set. Also: reading the logits out of the query (dms_decision.hpp).

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <vector>

#include "dms/dms.hpp"

namespace {

constexpr float kEvict = 2.5f;  // any logit > 0 flags the previous token
constexpr float kKeep = -2.5f;

dms::cache_config dms_config(int kv_heads, int group_size, int head_dim) {
  dms::cache_config c;
  c.num_kv_heads = kv_heads;
  c.group_size = group_size;
  c.head_dim = head_dim;
  c.page_size = 4;
  c.max_pages = 1024;
  c.max_sequences = 4;
  c.max_row_slots = 4096;
  return c;
}

using cache_t = dms::paged_cache<float, dms::dms_policy>;

cache_t make_cache(const dms::cache_config& cfg, int window) {
  return cache_t(cfg, dms::dms_policy(dms::dms_params{window}));
}

// Q/K/V and decision logits of one synthetic sequence, token-major, with logit(t, h) chosen by the
// test.
struct sequence_data {
  int T = 0, Hq = 0, Hk = 0, d = 0;
  std::vector<float> q, k, v, logits;  // [T][Hq][d], [T][Hk][d], [T][Hk][d], [T][Hk]

  template <class LogitFn>
  sequence_data(const dms::cache_config& cfg, int tokens, unsigned seed, LogitFn logit)
      : T(tokens), Hq(cfg.num_query_heads()), Hk(cfg.num_kv_heads), d(cfg.head_dim) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    for (int i = 0; i < T * Hq * d; ++i) q.push_back(normal(rng));
    for (int i = 0; i < T * Hk * d; ++i) k.push_back(normal(rng));
    for (int i = 0; i < T * Hk * d; ++i) v.push_back(normal(rng));
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < Hk; ++h) logits.push_back(logit(t, h));
  }

  std::span<const float> q_at(int t) const {
    return std::span(q).subspan(std::size_t(t) * Hq * d, std::size_t(Hq) * d);
  }
  std::span<const float> k_at(int t) const {
    return std::span(k).subspan(std::size_t(t) * Hk * d, std::size_t(Hk) * d);
  }
  std::span<const float> v_at(int t) const {
    return std::span(v).subspan(std::size_t(t) * Hk * d, std::size_t(Hk) * d);
  }
  std::span<const float> logits_at(int t) const {
    return std::span(logits).subspan(std::size_t(t) * Hk, std::size_t(Hk));
  }
  float logit(int t, int h) const { return logits[std::size_t(t) * Hk + h]; }
};

// The spec's answer: positions held by (and visible to) row h after token t.
std::vector<std::int32_t> expected_positions(const sequence_data& s, int h, int t, int w) {
  std::vector<std::int32_t> out;
  for (int j = 0; j <= t; ++j) {
    const bool flagged = j + 1 <= t && s.logit(j + 1, h) > 0.0f;
    if (!flagged || t - j <= w) out.push_back(j);
  }
  return out;
}

// Unflagged tokens older than the window after token t: what DMS may never drop.
int survivors(const sequence_data& s, int h, int t, int w) {
  int n = 0;
  for (int j = 0; j < t - w; ++j) n += s.logit(j + 1, h) > 0.0f ? 0 : 1;
  return n;
}

std::vector<std::int32_t> held_positions(const cache_t& cache, int row) {
  auto p = cache.positions(row);
  p.erase(std::remove(p.begin(), p.end(), -1), p.end());
  std::sort(p.begin(), p.end());
  return p;
}

void decode(cache_t& cache, int seq, const sequence_data& s, int t, std::vector<float>& out,
            std::vector<float>& lse) {
  out.assign(std::size_t(s.Hq) * s.d, 0.0f);
  lse.assign(std::size_t(s.Hq), 0.0f);
  dms::reference::decode_extras extras;
  extras.lse = lse;
  dms::reference::decode_step(cache, seq, s.q_at(t), s.k_at(t), s.v_at(t), s.logits_at(t), out,
                              extras);
}

void decode(cache_t& cache, int seq, const sequence_data& s, int t) {
  std::vector<float> out, lse;
  decode(cache, seq, s, t, out, lse);
}

// Brute-force attention of query head qh of token t over the given key positions (double).
void brute_attention(const sequence_data& s, int G, int t, int qh,
                     const std::vector<std::int32_t>& keys, std::vector<double>& out, double& lse) {
  const int h = qh / G, d = s.d;
  const double scale = 1.0 / std::sqrt(double(d));
  std::vector<double> logit;
  double m = -std::numeric_limits<double>::infinity();
  for (int j : keys) {
    double dot = 0;
    for (int c = 0; c < d; ++c)
      dot += double(s.q[(std::size_t(t) * s.Hq + qh) * d + c]) *
             s.k[(std::size_t(j) * s.Hk + h) * d + c];
    logit.push_back(dot * scale);
    m = std::max(m, logit.back());
  }
  double sum = 0;
  for (double& x : logit) sum += (x = std::exp(x - m));
  out.assign(d, 0.0);
  for (std::size_t i = 0; i < keys.size(); ++i)
    for (int c = 0; c < d; ++c)
      out[c] += logit[i] / sum * s.v[(std::size_t(keys[i]) * s.Hk + h) * d + c];
  lse = m + std::log(sum);
}

// The attention output of token t (all query heads) equals brute force over the visible keys.
void require_attention_matches(const sequence_data& s, int G, int w, int t, const float* out,
                               const float* lse) {
  std::vector<double> ref;
  double ref_lse = 0;
  for (int qh = 0; qh < s.Hq; ++qh) {
    brute_attention(s, G, t, qh, expected_positions(s, qh / G, t, w), ref, ref_lse);
    for (int c = 0; c < s.d; ++c)
      REQUIRE(out[std::size_t(qh) * s.d + c] == Approx(ref[c]).margin(1e-5));
    if (lse) REQUIRE(lse[qh] == Approx(ref_lse).margin(1e-5));
  }
}

}  // namespace

TEST_CASE("DMS shift rule: the logit of token t flags token t-1", "[dms]") {
  const int w = 2, T = 12;
  const auto cfg = dms_config(2, 1, 4);
  // Head 0: only token 5 carries an eviction logit, so only token 4 is flagged.
  // Head 1: only token 0 does, which flags nothing.
  const sequence_data s(cfg, T, 1,
                        [](int t, int h) { return (h == 0 ? t == 5 : t == 0) ? kEvict : kKeep; });
  auto cache = make_cache(cfg, w);
  const int seq = cache.add_sequence();
  const int r0 = cache.row_index(seq, 0), r1 = cache.row_index(seq, 1);
  for (int t = 0; t < T; ++t) {
    decode(cache, seq, s, t);
    CAPTURE(t);
    const auto held = held_positions(cache, r0);
    // Token 4 is readable by queries 4 .. 4 + w, then gone; token 5 (the carrier) stays.
    const bool holds4 = std::find(held.begin(), held.end(), 4) != held.end();
    REQUIRE(holds4 == (t >= 4 && t < 4 + w + 1));
    if (t >= 5) REQUIRE(std::find(held.begin(), held.end(), 5) != held.end());
    REQUIRE(int(held.size()) == (t < 4 + w + 1 ? t + 1 : t));
    REQUIRE(held == expected_positions(s, 0, t, w));
    REQUIRE(held_positions(cache, r1).size() == std::size_t(t + 1));  // l[0] > 0 evicts nothing
  }
  // Token 7 reused token 4's slot instead of growing the row.
  REQUIRE(cache.row_length(r0) == T - 1);
  REQUIRE(cache.row_length(r1) == T);
}

TEST_CASE("DMS: the first token's logit applies to nothing", "[dms]") {
  const int w = GENERATE(0, 1, 3);
  const auto cfg = dms_config(1, 1, 4);
  const sequence_data s(cfg, 9, 2, [](int t, int) { return t == 0 ? 100.0f : kKeep; });
  auto cache = make_cache(cfg, w);
  const int seq = cache.add_sequence();
  for (int t = 0; t < 9; ++t) {
    decode(cache, seq, s, t);
    REQUIRE(held_positions(cache, 0).size() == std::size_t(t + 1));
  }
  // Prefill: token 0 stays visible to every prompt query.
  auto prefilled = make_cache(cfg, w);
  const int p = prefilled.add_sequence();
  std::vector<float> out(s.q.size()), lse(9);
  dms::reference::prefill(prefilled, p, {s.q, s.k, s.v, s.logits}, 3, {out, lse});
  for (int t = 0; t < 9; ++t)
    require_attention_matches(s, 1, w, t, out.data() + t * 4, lse.data() + t);
  REQUIRE(held_positions(prefilled, 0).size() == 9u);
}

TEST_CASE("DMS with every token flagged holds exactly the last w + 1 tokens", "[dms]") {
  const int w = GENERATE(0, 1, 3, 8);
  const int T = 24;
  const auto cfg = dms_config(2, 2, 4);
  const sequence_data s(cfg, T, 3, [](int, int) { return kEvict; });
  auto cache = make_cache(cfg, w);
  const int seq = cache.add_sequence();
  for (int t = 0; t < T; ++t) {
    decode(cache, seq, s, t);
    CAPTURE(w, t);
    std::vector<std::int32_t> last;
    for (int j = std::max(0, t - w); j <= t; ++j) last.push_back(j);
    for (int h = 0; h < 2; ++h) {
      const int r = cache.row_index(seq, h);
      REQUIRE(held_positions(cache, r) == last);
      REQUIRE(cache.row_live(r) == std::min(t + 1, w + 1));
      REQUIRE(cache.row_length(r) == std::min(t + 1, w + 1));  // slots are reused, never holes
    }
  }
  REQUIRE(cache.stats().peak_live_slots == 2 * (w + 1));
  REQUIRE(cache.stats().pages_in_use == 2 * ((w + 1 + 3) / 4));
}

TEST_CASE("DMS with w = 0 evicts immediately: only the newest token stays", "[dms]") {
  const auto cfg = dms_config(1, 1, 4);
  const sequence_data s(cfg, 10, 4, [](int, int) { return kEvict; });
  auto cache = make_cache(cfg, 0);
  const int seq = cache.add_sequence();
  std::vector<float> out, lse;
  for (int t = 0; t < 10; ++t) {
    decode(cache, seq, s, t, out, lse);
    REQUIRE(held_positions(cache, 0) == std::vector<std::int32_t>{t});
    REQUIRE(cache.row_length(0) == 1);
    // The query sees its own token only: the output is that token's value.
    for (int c = 0; c < 4; ++c) REQUIRE(out[c] == Approx(s.v[std::size_t(t) * 4 + c]));
  }
}

TEST_CASE("DMS with no token flagged is dense", "[dms]") {
  const int w = GENERATE(0, 4);
  const auto cfg = dms_config(2, 1, 4);
  const sequence_data s(cfg, 15, 5, [](int, int) { return kKeep; });
  auto cache = make_cache(cfg, w);
  const int seq = cache.add_sequence();
  for (int t = 0; t < 15; ++t) decode(cache, seq, s, t);
  for (int h = 0; h < 2; ++h) REQUIRE(held_positions(cache, cache.row_index(seq, h)).size() == 15u);
  REQUIRE(cache.stats().compression_ratio == Approx(1.0));
}

TEST_CASE("DMS with a window longer than the sequence evicts nothing", "[dms]") {
  const auto cfg = dms_config(1, 1, 4);
  const sequence_data s(cfg, 30, 6, [](int, int) { return kEvict; });
  auto cache = make_cache(cfg, 100);
  const int seq = cache.add_sequence();
  for (int t = 0; t < 30; ++t) decode(cache, seq, s, t);
  REQUIRE(held_positions(cache, 0).size() == 30u);
  REQUIRE(cache.row_length(0) == 30);
}

TEST_CASE("DMS with random decisions: memory matches the spec at every step", "[dms]") {
  const int w = GENERATE(0, 1, 2, 5, 16);
  const unsigned seed = GENERATE(11u, 12u, 13u);
  const double p_evict = GENERATE(0.3, 0.8);
  const int T = 60, H = 3;
  const auto cfg = dms_config(H, 2, 4);
  std::mt19937 rng(seed);
  std::bernoulli_distribution evict(p_evict);
  std::vector<float> logit_table;
  for (int i = 0; i < T * H; ++i) logit_table.push_back(evict(rng) ? kEvict : kKeep);
  const sequence_data s(cfg, T, seed,
                        [&](int t, int h) { return logit_table[std::size_t(t) * H + h]; });
  auto cache = make_cache(cfg, w);
  const int seq = cache.add_sequence();
  for (int t = 0; t < T; ++t) {
    decode(cache, seq, s, t);
    CAPTURE(w, seed, p_evict, t);
    double ratio_sum = 0;
    for (int h = 0; h < H; ++h) {
      const int r = cache.row_index(seq, h);
      const auto expected = expected_positions(s, h, t, w);
      REQUIRE(held_positions(cache, r) == expected);
      REQUIRE(cache.row_live(r) == int(expected.size()));
      REQUIRE(cache.row_length(r) <= survivors(s, h, t, w) + w + 1);
      ratio_sum += double(expected.size()) / (t + 1);
    }
    REQUIRE(cache.stats().compression_ratio == Approx(H / ratio_sum));
  }
}

TEST_CASE("DMS compression ratio is 1 / mean(live / seen) over rows", "[dms]") {
  const int w = 1, T = 10;
  const auto cfg = dms_config(2, 1, 4);
  // Head 0 flags everything: holds tokens 8, 9. Head 1: even tokens >= 2 flag their odd
  // predecessors 1, 3, 5, 7, all out of the window by t = 9: holds 6 of 10.
  const sequence_data s(
      cfg, T, 7, [](int t, int h) { return h == 0 || (t % 2 == 0 && t >= 2) ? kEvict : kKeep; });
  auto cache = make_cache(cfg, w);
  const int seq = cache.add_sequence();
  for (int t = 0; t < T; ++t) decode(cache, seq, s, t);
  REQUIRE(held_positions(cache, 0) == std::vector<std::int32_t>{8, 9});
  REQUIRE(held_positions(cache, 1) == std::vector<std::int32_t>{0, 2, 4, 6, 8, 9});
  const auto st = cache.stats();
  REQUIRE(st.tokens_seen == 20);
  REQUIRE(st.live_slots == 8);
  REQUIRE(st.compression_ratio == Approx(1.0 / ((2.0 / 10 + 6.0 / 10) / 2)));
  REQUIRE(st.compression_ratio == Approx(2.5));

  // A second, shorter sequence (all flagged: 2 of 4 held per row). Now the mean over rows differs
  // from tokens_seen / live_slots = 28 / 12.
  const sequence_data s2(cfg, 4, 8, [](int, int) { return kEvict; });
  const int seq2 = cache.add_sequence();
  for (int t = 0; t < 4; ++t) decode(cache, seq2, s2, t);
  const auto st2 = cache.stats();
  REQUIRE(st2.tokens_seen == 28);
  REQUIRE(st2.live_slots == 12);
  REQUIRE(st2.compression_ratio == Approx(1.0 / ((0.2 + 0.6 + 0.5 + 0.5) / 4)));
  REQUIRE(st2.compression_ratio != Approx(28.0 / 12.0));
}

TEST_CASE("DMS over a batch of sequences of different lengths", "[dms]") {
  const int w = 3, H = 2;
  const auto cfg = dms_config(H, 2, 4);
  const std::vector<int> lengths{5, 23, 9};
  std::vector<sequence_data> data;
  for (std::size_t i = 0; i < lengths.size(); ++i)
    data.emplace_back(cfg, lengths[i], 100 + unsigned(i), [i](int t, int h) {
      return ((t * 7 + h * 3 + int(i)) % 5) < 3 ? kEvict : kKeep;
    });
  auto cache = make_cache(cfg, w);
  std::vector<int> ids;
  for (std::size_t i = 0; i < lengths.size(); ++i) ids.push_back(cache.add_sequence());
  std::vector<float> out, lse;
  for (int t = 0; t < 23; ++t)
    for (std::size_t i = 0; i < ids.size(); ++i)
      if (t < lengths[i]) {
        decode(cache, ids[i], data[i], t, out, lse);
        require_attention_matches(data[i], cfg.group_size, w, t, out.data(), lse.data());
      }
  double ratio_sum = 0;
  std::int64_t seen = 0, live = 0;
  for (std::size_t i = 0; i < ids.size(); ++i)
    for (int h = 0; h < H; ++h) {
      const auto expected = expected_positions(data[i], h, lengths[i] - 1, w);
      REQUIRE(held_positions(cache, cache.row_index(ids[i], h)) == expected);
      ratio_sum += double(expected.size()) / lengths[i];
      seen += lengths[i];
      live += std::int64_t(expected.size());
    }
  const auto st = cache.stats();
  REQUIRE(st.tokens_seen == seen);
  REQUIRE(st.live_slots == live);
  REQUIRE(st.compression_ratio == Approx(double(H * lengths.size()) / ratio_sum));
}

TEST_CASE("DMS decode attention under GQA reads exactly the visible keys", "[dms]") {
  const int G = GENERATE(1, 4, 8);
  const int w = 4, T = 30, H = 2;
  const auto cfg = dms_config(H, G, 8);
  const sequence_data s(cfg, T, 21 + unsigned(G),
                        [](int t, int h) { return (t * (h + 2)) % 3 ? kEvict : kKeep; });
  auto cache = make_cache(cfg, w);
  const int seq = cache.add_sequence();
  std::vector<float> out, lse;
  std::int64_t reads = 0;
  for (int t = 0; t < T; ++t) {
    decode(cache, seq, s, t, out, lse);
    CAPTURE(G, t);
    require_attention_matches(s, G, w, t, out.data(), lse.data());
    for (int h = 0; h < H; ++h) reads += std::int64_t(expected_positions(s, h, t, w).size());
    REQUIRE(cache.stats().kv_token_reads == reads);
  }
}

TEST_CASE("DMS prefill applies the same rule, in any chunking, and decode continues it",
          "[dms][prefill]") {
  const int w = 3, T = 23, H = 2, G = 2, extra = 10;
  const auto cfg = dms_config(H, G, 8);
  std::mt19937 rng(31);
  std::bernoulli_distribution evict(0.6);
  std::vector<float> table;
  for (int i = 0; i < (T + extra) * H; ++i) table.push_back(evict(rng) ? kEvict : kKeep);
  const sequence_data s(cfg, T + extra, 32,
                        [&](int t, int h) { return table[std::size_t(t) * H + h]; });
  const std::size_t qrow = std::size_t(H) * G * cfg.head_dim, krow = std::size_t(H) * cfg.head_dim;

  const int chunk = GENERATE(1, 4, 7, 23);
  auto cache = make_cache(cfg, w);
  const int seq = cache.add_sequence();
  std::vector<float> out(T * qrow), lse(std::size_t(T) * H * G);
  dms::reference::prefill_chunk_inputs in{
      std::span(s.q).first(T * qrow), std::span(s.k).first(T * krow),
      std::span(s.v).first(T * krow), std::span(s.logits).first(std::size_t(T) * H)};
  dms::reference::prefill(cache, seq, in, chunk, {out, lse});
  CAPTURE(chunk);
  for (int t = 0; t < T; ++t)
    require_attention_matches(s, G, w, t, out.data() + t * qrow,
                              lse.data() + std::size_t(t) * H * G);
  for (int h = 0; h < H; ++h) {
    const int r = cache.row_index(seq, h);
    REQUIRE(held_positions(cache, r) == expected_positions(s, h, T - 1, w));
    REQUIRE(cache.row_length(r) <= survivors(s, h, T - 1, w) + w + 1);
  }
  // The first decode token's logit decides the last prompt token's flag.
  std::vector<float> dout, dlse;
  for (int t = T; t < T + extra; ++t) {
    decode(cache, seq, s, t, dout, dlse);
    require_attention_matches(s, G, w, t, dout.data(), dlse.data());
    for (int h = 0; h < H; ++h)
      REQUIRE(held_positions(cache, cache.row_index(seq, h)) == expected_positions(s, h, t, w));
  }
}

TEST_CASE("DMS prefill: left padding is no token at all", "[dms][prefill]") {
  const int w = 2, T = 9, pad = 3, H = 1, G = 2;
  const auto cfg = dms_config(H, G, 4);
  const sequence_data s(cfg, T, 41, [](int t, int) { return t % 2 ? kEvict : kKeep; });
  const std::size_t qrow = std::size_t(H) * G * 4, krow = std::size_t(H) * 4;
  // Padded input: `pad` garbage tokens (with non-finite logits, which are ignored), then s.
  std::vector<float> q(pad * qrow, 7.0f), k(pad * krow, 7.0f), v(pad * krow, 7.0f);
  std::vector<float> logits(pad * H, std::numeric_limits<float>::quiet_NaN());
  q.insert(q.end(), s.q.begin(), s.q.end());
  k.insert(k.end(), s.k.begin(), s.k.end());
  v.insert(v.end(), s.v.begin(), s.v.end());
  logits.insert(logits.end(), s.logits.begin(), s.logits.end());
  auto cache = make_cache(cfg, w);
  const int seq = cache.add_sequence();
  std::vector<float> out((T + pad) * qrow, 1.0f), lse(std::size_t(T + pad) * H * G, 1.0f);
  dms::reference::prefill(cache, seq, {q, k, v, logits, pad}, 2, {out, lse});
  for (std::size_t i = 0; i < pad * qrow; ++i) REQUIRE(out[i] == 0.0f);
  for (std::size_t i = 0; i < std::size_t(pad) * H * G; ++i)
    REQUIRE(lse[i] == -std::numeric_limits<float>::infinity());
  for (int t = 0; t < T; ++t)
    require_attention_matches(s, G, w, t, out.data() + (pad + t) * qrow,
                              lse.data() + std::size_t(pad + t) * H * G);
  REQUIRE(held_positions(cache, 0) == expected_positions(s, 0, T - 1, w));
  REQUIRE(cache.tokens_seen(0) == T);
}

// ---- decision logits read out of the query -----------------------------------------------------

namespace {

// q[t][qh][c] for a cfg with 2 KV heads, G = 3, d = 6, two tokens; all values exact in bf16/fp16.
template <class T>
std::vector<T> make_q(const dms::cache_config& cfg, int tokens) {
  std::vector<T> q;
  for (int i = 0; i < tokens * cfg.num_query_heads() * cfg.head_dim; ++i)
    q.push_back(dms::from_float<T>(0.25f * float(i % 13) - 1.5f));
  return q;
}

template <class T>
T& q_at(std::vector<T>& q, const dms::cache_config& cfg, int t, int qh, int c) {
  return q[(std::size_t(t) * cfg.num_query_heads() + qh) * cfg.head_dim + c];
}

// Rotate-half RoPE (as in Llama/Qwen) at position `pos` on every query head, computed in fp32.
template <class T>
void rope(std::vector<T>& q, const dms::cache_config& cfg, int t, int pos) {
  const int d = cfg.head_dim, half = d / 2;
  for (int qh = 0; qh < cfg.num_query_heads(); ++qh) {
    std::vector<float> x(d);
    for (int c = 0; c < d; ++c) x[c] = dms::to_float(q_at(q, cfg, t, qh, c));
    for (int i = 0; i < half; ++i) {
      const float theta = float(pos) * std::pow(10000.0f, -2.0f * float(i) / float(d));
      const float cs = std::cos(theta), sn = std::sin(theta);
      q_at(q, cfg, t, qh, i) = dms::from_float<T>(x[i] * cs - x[i + half] * sn);
      q_at(q, cfg, t, qh, i + half) = dms::from_float<T>(x[i + half] * cs + x[i] * sn);
    }
  }
}

dms::cache_config readout_config() {
  dms::cache_config cfg;
  cfg.num_kv_heads = 2;
  cfg.group_size = 3;
  cfg.head_dim = 6;
  return cfg;
}

}  // namespace

TEMPLATE_TEST_CASE(
    "take_decision_logits reads channel d-1 of each group's first head and zeroes it",
    "[dms][decision]", float, dms::half, dms::bfloat16) {
  using T = TestType;
  const auto cfg = readout_config();
  const int tokens = 2, d = cfg.head_dim, G = cfg.group_size;
  auto q = make_q<T>(cfg, tokens);
  const float carried[2][2] = {{0.0625f, -0.5f}, {0.125f, 0.25f}};  // [t][g], exact in 16 bits
  for (int t = 0; t < tokens; ++t)
    for (int g = 0; g < 2; ++g) q_at(q, cfg, t, g * G, d - 1) = dms::from_float<T>(carried[t][g]);
  auto expected_q = q;
  for (int t = 0; t < tokens; ++t)
    for (int g = 0; g < 2; ++g) q_at(expected_q, cfg, t, g * G, d - 1) = dms::from_float<T>(0.0f);

  SECTION("default readout: 100 * q - 5") {
    std::vector<float> logits(tokens * 2, -1.0f);
    dms::take_decision_logits(std::span<T>(q), std::span<float>(logits), cfg);
    for (int t = 0; t < tokens; ++t)
      for (int g = 0; g < 2; ++g)
        REQUIRE(logits[t * 2 + g] == Approx(100.0f * carried[t][g] - 5.0f));
    REQUIRE(logits[0] == 1.25f);  // 100 * 0.0625 - 5
    REQUIRE(q == expected_q);     // channel d-1 of heads 0 and G zeroed, nothing else touched
  }
  SECTION("configurable scale and offset") {
    std::vector<float> logits(tokens * 2);
    dms::take_decision_logits(std::span<T>(q), std::span<float>(logits), cfg,
                              dms::decision_readout{2.0f, 0.5f});
    for (int t = 0; t < tokens; ++t)
      for (int g = 0; g < 2; ++g) REQUIRE(logits[t * 2 + g] == 2.0f * carried[t][g] - 0.5f);
    REQUIRE(q == expected_q);
  }
  SECTION("a single head") {
    T head[4] = {dms::from_float<T>(1.0f), dms::from_float<T>(2.0f), dms::from_float<T>(3.0f),
                 dms::from_float<T>(0.5f)};
    REQUIRE(dms::take_decision_logit(head, 4, dms::decision_readout{10.0f, 1.0f}) == 4.0f);
    REQUIRE(dms::to_float(head[3]) == 0.0f);
    REQUIRE(dms::to_float(head[2]) == 3.0f);
  }
}

TEMPLATE_TEST_CASE("zero_decision_channels touches only channel d-1 of each group's first head",
                   "[dms][decision]", float, dms::half, dms::bfloat16) {
  using T = TestType;
  const auto cfg = readout_config();
  auto q = make_q<T>(cfg, 3);
  for (auto& x : q)
    if (dms::to_float(x) == 0.0f) x = dms::from_float<T>(0.75f);  // no zeros to start with
  auto expected = q;
  for (int t = 0; t < 3; ++t)
    for (int g = 0; g < 2; ++g)
      q_at(expected, cfg, t, g * cfg.group_size, cfg.head_dim - 1) = dms::from_float<T>(0.0f);
  dms::zero_decision_channels(std::span<T>(q), cfg);
  REQUIRE(q == expected);
}

TEMPLATE_TEST_CASE("take before RoPE, RoPE, zero again: the decision channels end at 0",
                   "[dms][decision]", float, dms::half, dms::bfloat16) {
  using T = TestType;
  const auto cfg = readout_config();
  const int d = cfg.head_dim, G = cfg.group_size, tokens = 2;
  auto q = make_q<T>(cfg, tokens);
  std::vector<float> logits(tokens * 2);
  dms::take_decision_logits(std::span<T>(q), std::span<float>(logits), cfg);
  for (int t = 0; t < tokens; ++t) rope(q, cfg, t, 5 + t);
  auto after_rope = q;
  // Rotate-half RoPE moved channel d/2-1 into d-1: the first zeroing alone is not enough.
  for (int t = 0; t < tokens; ++t)
    for (int g = 0; g < 2; ++g) REQUIRE(dms::to_float(q_at(q, cfg, t, g * G, d - 1)) != 0.0f);
  dms::zero_decision_channels(std::span<T>(q), cfg);
  for (int t = 0; t < tokens; ++t)
    for (int qh = 0; qh < cfg.num_query_heads(); ++qh)
      for (int c = 0; c < d; ++c) {
        if (qh % G == 0 && c == d - 1)
          REQUIRE(dms::to_float(q_at(q, cfg, t, qh, c)) == 0.0f);
        else
          REQUIRE(q_at(q, cfg, t, qh, c) == q_at(after_rope, cfg, t, qh, c));
      }
}
