// SPDX-License-Identifier: Apache-2.0
// The budgeted training-free policies (spec "TOVA", "H2O", "StreamingLLM", "SnapKV"): budgets hold
// after every decode step and after a prompt, the peaks are what one-in/one-out implies, and the
// token each policy drops is the one its rule names (checked against probabilities the reference
// attention reports, or against a brute-force softmax for prompts).

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

dms::cache_config budget_config(int kv_heads, int group_size, int head_dim) {
  dms::cache_config c;
  c.num_kv_heads = kv_heads;
  c.group_size = group_size;
  c.head_dim = head_dim;
  c.page_size = 4;
  c.max_pages = 1024;
  c.max_sequences = 3;
  c.max_row_slots = 1024;
  return c;
}

// Random Q/K/V of one sequence, token-major.
struct tokens {
  int T, Hq, Hk, d;
  std::vector<float> q, k, v;
  tokens(const dms::cache_config& cfg, int n, unsigned seed)
      : T(n), Hq(cfg.num_query_heads()), Hk(cfg.num_kv_heads), d(cfg.head_dim) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (int i = 0; i < T * Hq * d; ++i) q.push_back(normal(rng));
    for (int i = 0; i < T * Hk * d; ++i) k.push_back(normal(rng));
    for (int i = 0; i < T * Hk * d; ++i) v.push_back(normal(rng));
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
  std::span<const float> q_first(int n) const {
    return std::span(q).first(std::size_t(n) * Hq * d);
  }
  std::span<const float> k_first(int n) const {
    return std::span(k).first(std::size_t(n) * Hk * d);
  }
  std::span<const float> v_first(int n) const {
    return std::span(v).first(std::size_t(n) * Hk * d);
  }

  // Causal softmax of query head qh at position i over keys 0..i, in double.
  std::vector<double> probs(int qh, int i, int G) const {
    const int h = qh / G;
    std::vector<double> p(i + 1);
    double m = -std::numeric_limits<double>::infinity(), sum = 0;
    for (int j = 0; j <= i; ++j) {
      double s = 0;
      for (int c = 0; c < d; ++c)
        s += double(q[(std::size_t(i) * Hq + qh) * d + c]) * k[(std::size_t(j) * Hk + h) * d + c];
      p[j] = s / std::sqrt(double(d));
      m = std::max(m, p[j]);
    }
    for (auto& x : p) sum += (x = std::exp(x - m));
    for (auto& x : p) x /= sum;
    return p;
  }
};

template <class C>
std::vector<std::int32_t> held(const C& cache, int row) {
  auto p = cache.positions(row);
  p.erase(std::remove(p.begin(), p.end(), -1), p.end());
  std::sort(p.begin(), p.end());
  return p;
}

std::vector<std::int32_t> range(int lo, int hi) {  // [lo, hi)
  std::vector<std::int32_t> r;
  for (int i = lo; i < hi; ++i) r.push_back(i);
  return r;
}

// Indices of the `n` largest scores (ties: the newer position wins), as sorted positions.
std::vector<std::int32_t> top_positions(const std::vector<double>& score,
                                        const std::vector<std::int32_t>& pos, int n) {
  std::vector<std::size_t> idx(score.size());
  for (std::size_t i = 0; i < idx.size(); ++i) idx[i] = i;
  std::sort(idx.begin(), idx.end(), [&](std::size_t a, std::size_t b) {
    return score[a] > score[b] || (score[a] == score[b] && pos[a] > pos[b]);
  });
  std::vector<std::int32_t> out;
  for (int i = 0; i < n && i < int(idx.size()); ++i) out.push_back(pos[idx[i]]);
  std::sort(out.begin(), out.end());
  return out;
}

// One decode step with the slot probabilities reported. Returns, per row, the position each slot
// held when attention ran (the token evicted after attention included), or -1.
template <class C>
std::vector<std::vector<std::int32_t>> step(C& cache, int seq, const tokens& x, int t,
                                            std::vector<float>& probs, int& stride) {
  const int H = cache.config().num_kv_heads;
  std::vector<std::vector<std::int32_t>> before(H);
  for (int h = 0; h < H; ++h) before[h] = cache.positions(cache.row_index(seq, h));
  std::vector<float> out(x.q_at(t).size());
  dms::reference::decode_extras extras;
  extras.probs = &probs;
  dms::reference::decode_step(cache, seq, x.q_at(t), x.k_at(t), x.v_at(t), {}, out, extras);
  stride = int(probs.size()) / cache.config().num_query_heads();
  std::vector<std::vector<std::int32_t>> at_attention(H);
  for (int h = 0; h < H; ++h) {
    auto now = cache.positions(cache.row_index(seq, h));
    auto& a = at_attention[h];
    a.assign(std::max(now.size(), before[h].size()), -1);
    for (std::size_t s = 0; s < a.size(); ++s) {
      if (s < now.size() && now[s] >= 0)
        a[s] = now[s];
      else if (s < before[h].size() && before[h][s] >= 0)
        a[s] = before[h][s];  // evicted after attention
    }
    // The new token's slot, if it was evicted in the same step: the one slot not yet accounted for.
    const bool has_t = std::find(a.begin(), a.end(), t) != a.end();
    if (!has_t)
      for (std::size_t s = 0; s < a.size(); ++s)
        if (a[s] < 0) {
          a[s] = t;
          break;
        }
  }
  return at_attention;
}

// Probability of slot s summed over the G query heads of KV head h (in the order the library sums).
float group_prob(const std::vector<float>& probs, int stride, int h, int G, int s) {
  float p = 0.0f;
  for (int g = 0; g < G; ++g) p += probs[std::size_t(h * G + g) * stride + s];
  return p;
}

// The evicted slot of a row: live at attention, a hole now.
int evicted_slot(const std::vector<std::int32_t>& at_attention,
                 const std::vector<std::int32_t>& now) {
  int found = -1;
  for (std::size_t s = 0; s < at_attention.size(); ++s)
    if (at_attention[s] >= 0 && (s >= now.size() || now[s] < 0)) {
      REQUIRE(found == -1);  // one-in/one-out: at most one per step
      found = int(s);
    }
  return found;
}

}  // namespace

TEST_CASE("TOVA holds its budget, peaks at budget + 1 and drops the least-attended token",
          "[budget][tova]") {
  const auto ranking = GENERATE(dms::tova_ranking::per_kv_head, dms::tova_ranking::layer_average);
  const int budget = GENERATE(1, 5, 16);
  const int H = 3, G = 2, T = 60;
  const auto cfg = budget_config(H, G, 8);
  dms::paged_cache<float, dms::tova_policy> cache(cfg, dms::tova_policy({budget, ranking}));
  const tokens x(cfg, T, 7 + unsigned(budget));
  const int seq = cache.add_sequence();
  std::vector<float> probs;
  int stride = 0;
  bool rows_differ = false;
  for (int t = 0; t < T; ++t) {
    const auto att = step(cache, seq, x, t, probs, stride);
    CAPTURE(budget, int(ranking), t);
    for (int h = 0; h < H; ++h) {
      const int r = cache.row_index(seq, h);
      REQUIRE(cache.row_live(r) == std::min(t + 1, budget));
      const int victim = evicted_slot(att[h], cache.positions(r));
      REQUIRE((victim >= 0) == (t + 1 > budget));
      if (victim < 0) continue;
      // The victim has the lowest probability under the current query (ties: oldest first).
      const auto score = [&](int s) {
        if (ranking == dms::tova_ranking::per_kv_head) return group_prob(probs, stride, h, G, s);
        float sum = 0.0f;
        for (int hh = 0; hh < H; ++hh) sum += group_prob(probs, stride, hh, G, s);
        return sum;
      };
      for (std::size_t s = 0; s < att[h].size(); ++s)
        if (att[h][s] >= 0 && int(s) != victim)
          REQUIRE(dms::evicts_before(score(victim), att[h][victim], score(int(s)), att[h][s]));
    }
    for (int h = 1; h < H; ++h) {
      const bool same =
          cache.positions(cache.row_index(seq, h)) == cache.positions(cache.row_index(seq, 0));
      if (ranking == dms::tova_ranking::layer_average) REQUIRE(same);  // slot for slot
      rows_differ = rows_differ || !same;
    }
  }
  if (ranking == dms::tova_ranking::per_kv_head && budget > 1)
    REQUIRE(rows_differ);  // the data can tell
  for (int h = 0; h < H; ++h) REQUIRE(cache.row_peak(cache.row_index(seq, h)) == budget + 1);
  REQUIRE(cache.stats().peak_live_slots == H * (budget + 1));
  REQUIRE(cache.stats().live_slots == H * budget);
}

TEST_CASE("H2O holds its budget, keeps the recent tokens and drops the lowest accumulated score",
          "[budget][h2o]") {
  const int budget = GENERATE(4, 10);
  const int recent = GENERATE(0, 1, 3);
  const int H = 2, G = 3, T = 50;
  const auto cfg = budget_config(H, G, 8);
  dms::paged_cache<float, dms::h2o_policy> cache(cfg, dms::h2o_policy({budget, recent}));
  const tokens x(cfg, T, 17 + unsigned(recent));
  const int seq = cache.add_sequence();
  std::vector<std::vector<float>> acc(H, std::vector<float>(T, 0.0f));  // [row][position]
  std::vector<float> probs;
  int stride = 0;
  for (int t = 0; t < T; ++t) {
    const auto att = step(cache, seq, x, t, probs, stride);
    CAPTURE(budget, recent, t);
    for (int h = 0; h < H; ++h) {
      const int r = cache.row_index(seq, h);
      for (std::size_t s = 0; s < att[h].size(); ++s)
        if (att[h][s] >= 0)
          acc[h][att[h][s]] = acc[h][att[h][s]] + group_prob(probs, stride, h, G, int(s));
      REQUIRE(cache.row_live(r) == std::min(t + 1, budget));
      const auto now = held(cache, r);
      for (int j = std::max(0, t + 1 - recent); j <= t; ++j)
        REQUIRE(std::find(now.begin(), now.end(), j) != now.end());  // the recent newest stay
      const int victim = evicted_slot(att[h], cache.positions(r));
      REQUIRE((victim >= 0) == (t + 1 > budget));
      if (victim < 0) continue;
      const std::int32_t vp = att[h][victim];
      REQUIRE(vp < t + 1 - recent);
      for (const std::int32_t p : now)
        if (p < t + 1 - recent) REQUIRE(dms::evicts_before(acc[h][vp], vp, acc[h][p], p));
    }
  }
  for (int h = 0; h < H; ++h) REQUIRE(cache.row_peak(cache.row_index(seq, h)) == budget + 1);
  REQUIRE(cache.stats().peak_live_slots == H * (budget + 1));
}

TEST_CASE("StreamingLLM keeps exactly the sinks and the newest R tokens", "[budget][streaming]") {
  const int sinks = GENERATE(0, 1, 4);
  const int recent = GENERATE(1, 3, 8);
  const int H = 2, T = 40;
  const auto cfg = budget_config(H, 2, 4);
  dms::paged_cache<float, dms::streaming_llm_policy> cache(
      cfg, dms::streaming_llm_policy({sinks, recent}));
  const tokens x(cfg, T, 27);
  const int seq = cache.add_sequence();
  std::vector<float> probs;
  int stride = 0;
  for (int t = 0; t < T; ++t) {
    step(cache, seq, x, t, probs, stride);
    CAPTURE(sinks, recent, t);
    auto expected = range(0, std::min(sinks, t + 1));
    for (int j = std::max(sinks, t + 1 - recent); j <= t; ++j) expected.push_back(j);
    for (int h = 0; h < H; ++h) {
      const int r = cache.row_index(seq, h);
      REQUIRE(held(cache, r) == expected);
      REQUIRE(cache.row_length(r) == int(expected.size()));  // overwritten in place, no holes
    }
  }
  for (int h = 0; h < H; ++h) REQUIRE(cache.row_peak(cache.row_index(seq, h)) == sinks + recent);
  REQUIRE(cache.stats().peak_live_slots == H * (sinks + recent));
}

TEST_CASE("Budgets hold over a ragged batch", "[budget]") {
  const int H = 2, budget = 6;
  const auto cfg = budget_config(H, 2, 4);
  dms::paged_cache<float, dms::tova_policy> cache(
      cfg, dms::tova_policy({budget, dms::tova_ranking::per_kv_head}));
  const std::vector<int> lengths{3, 20, 9};
  std::vector<tokens> data;
  std::vector<int> ids;
  for (std::size_t i = 0; i < lengths.size(); ++i) {
    data.emplace_back(cfg, lengths[i], 40 + unsigned(i));
    ids.push_back(cache.add_sequence());
  }
  std::vector<float> probs;
  int stride = 0;
  for (int t = 0; t < 20; ++t)
    for (std::size_t i = 0; i < ids.size(); ++i)
      if (t < lengths[i]) {
        step(cache, ids[i], data[i], t, probs, stride);
        for (int h = 0; h < H; ++h)
          REQUIRE(cache.row_live(cache.row_index(ids[i], h)) == std::min(t + 1, budget));
      }
  REQUIRE(cache.stats().live_slots == H * (3 + 6 + 6));
  REQUIRE(cache.stats().tokens_seen == H * (3 + 20 + 9));
}

// ---- prompts
// -------------------------------------------------------------------------------------

namespace {

template <class P>
dms::paged_cache<float, P> prefilled(const dms::cache_config& cfg, P policy, const tokens& x,
                                     int prompt, int chunk, int& seq) {
  dms::paged_cache<float, P> cache(cfg, std::move(policy));
  seq = cache.add_sequence();
  std::vector<float> out(std::size_t(prompt) * x.Hq * x.d);
  dms::reference::prefill_chunk_inputs in;
  in.q = x.q_first(prompt);
  in.k = x.k_first(prompt);
  in.v = x.v_first(prompt);
  dms::reference::prefill_outputs o;
  o.out = out;
  dms::reference::prefill(cache, seq, in, chunk, o);
  return cache;
}

// After a prompt: each row holds `expected` tokens, compacted, and the pool holds only their pages.
template <class C>
void require_compacted(const C& cache, int seq, int expected) {
  const auto& cfg = cache.config();
  for (int h = 0; h < cfg.num_kv_heads; ++h) {
    const int r = cache.row_index(seq, h);
    REQUIRE(cache.row_live(r) == expected);
    REQUIRE(cache.row_length(r) == expected);
  }
  REQUIRE(cache.stats().pages_in_use ==
          cfg.num_kv_heads * ((expected + cfg.page_size - 1) / cfg.page_size));
}

}  // namespace

TEST_CASE("TOVA prompt: the budget tokens the last prompt query attends to most",
          "[budget][tova][prefill]") {
  const int H = 2, G = 2, T = 40, budget = 12;
  const int chunk = GENERATE(1, 7, 40);
  const auto cfg = budget_config(H, G, 8);
  const tokens x(cfg, T + 10, 51);
  int seq = 0;
  auto cache =
      prefilled(cfg, dms::tova_policy({budget, dms::tova_ranking::per_kv_head}), x, T, chunk, seq);
  require_compacted(cache, seq, budget);
  for (int h = 0; h < H; ++h) {
    std::vector<double> score(T, 0.0);
    for (int g = 0; g < G; ++g) {
      const auto p = x.probs(h * G + g, T - 1, G);
      for (int j = 0; j < T; ++j) score[j] += p[j];
    }
    REQUIRE(held(cache, cache.row_index(seq, h)) == top_positions(score, range(0, T), budget));
  }
  std::vector<float> probs;
  int stride = 0;
  for (int t = T; t < T + 10; ++t) {
    step(cache, seq, x, t, probs, stride);
    for (int h = 0; h < H; ++h) REQUIRE(cache.row_live(cache.row_index(seq, h)) == budget);
  }
}

TEST_CASE("TOVA layer_average prompt keeps the same positions in every row",
          "[budget][tova][prefill]") {
  const int H = 3, G = 2, T = 30, budget = 8;
  const auto cfg = budget_config(H, G, 8);
  const tokens x(cfg, T, 52);
  int seq = 0;
  auto cache =
      prefilled(cfg, dms::tova_policy({budget, dms::tova_ranking::layer_average}), x, T, 5, seq);
  require_compacted(cache, seq, budget);
  std::vector<double> score(T, 0.0);
  for (int qh = 0; qh < H * G; ++qh) {
    const auto p = x.probs(qh, T - 1, G);
    for (int j = 0; j < T; ++j) score[j] += p[j];
  }
  for (int h = 0; h < H; ++h) {
    REQUIRE(cache.positions(cache.row_index(seq, h)) == cache.positions(cache.row_index(seq, 0)));
    REQUIRE(held(cache, cache.row_index(seq, h)) == top_positions(score, range(0, T), budget));
  }
}

TEST_CASE("H2O prompt: the recent tokens plus the heaviest column sums", "[budget][h2o][prefill]") {
  const int H = 2, G = 2, T = 36, budget = 10;
  const int recent = GENERATE(0, 4, 10);
  const int chunk = GENERATE(5, 36);
  const auto cfg = budget_config(H, G, 8);
  const tokens x(cfg, T + 8, 61);
  int seq = 0;
  auto cache = prefilled(cfg, dms::h2o_policy({budget, recent}), x, T, chunk, seq);
  require_compacted(cache, seq, budget);
  for (int h = 0; h < H; ++h) {
    std::vector<double> column(T, 0.0);
    for (int i = 0; i < T; ++i)
      for (int g = 0; g < G; ++g) {
        const auto p = x.probs(h * G + g, i, G);
        for (int j = 0; j <= i; ++j) column[j] += p[j];
      }
    auto expected = top_positions(std::vector<double>(column.begin(), column.end() - recent),
                                  range(0, T - recent), budget - recent);
    for (int j = T - recent; j < T; ++j) expected.push_back(j);
    REQUIRE(held(cache, cache.row_index(seq, h)) == expected);
  }
  std::vector<float> probs;
  int stride = 0;
  for (int t = T; t < T + 8; ++t) {
    step(cache, seq, x, t, probs, stride);
    for (int h = 0; h < H; ++h) {
      const auto now = held(cache, cache.row_index(seq, h));
      REQUIRE(now.size() == std::size_t(budget));
      for (int j = t + 1 - recent; j <= t; ++j)
        REQUIRE(std::find(now.begin(), now.end(), j) != now.end());
    }
  }
}

TEST_CASE("StreamingLLM prompt: sinks and the last R prompt tokens, then the window slides",
          "[budget][streaming][prefill]") {
  const int H = 2, T = 30, sinks = 2, recent = 6;
  const int chunk = GENERATE(1, 4, 30);
  const auto cfg = budget_config(H, 1, 4);
  const tokens x(cfg, T + 12, 71);
  int seq = 0;
  auto cache = prefilled(cfg, dms::streaming_llm_policy({sinks, recent}), x, T, chunk, seq);
  require_compacted(cache, seq, sinks + recent);
  std::vector<float> probs;
  int stride = 0;
  for (int t = T - 1; t < T + 12; ++t) {
    if (t >= T) step(cache, seq, x, t, probs, stride);
    auto expected = range(0, sinks);
    for (int j = t + 1 - recent; j <= t; ++j) expected.push_back(j);
    for (int h = 0; h < H; ++h) {
      REQUIRE(held(cache, cache.row_index(seq, h)) == expected);
      REQUIRE(cache.row_length(cache.row_index(seq, h)) == sinks + recent);
    }
  }
}

TEST_CASE("A prompt within the budget is kept whole", "[budget][prefill]") {
  const auto cfg = budget_config(2, 2, 4);
  const tokens x(cfg, 6, 81);
  int seq = 0;
  auto tova = prefilled(cfg, dms::tova_policy({8, dms::tova_ranking::per_kv_head}), x, 6, 4, seq);
  REQUIRE(held(tova, tova.row_index(seq, 1)) == range(0, 6));
  auto h2o = prefilled(cfg, dms::h2o_policy({8, 2}), x, 6, 4, seq);
  REQUIRE(held(h2o, h2o.row_index(seq, 1)) == range(0, 6));
  auto stream = prefilled(cfg, dms::streaming_llm_policy({2, 6}), x, 6, 4, seq);
  REQUIRE(held(stream, stream.row_index(seq, 1)) == range(0, 6));
  auto snap = prefilled(cfg, dms::snapkv_policy({8, 2, 3, dms::snapkv_pooling::max}), x, 6, 4, seq);
  REQUIRE(held(snap, snap.row_index(seq, 1)) == range(0, 6));
}

TEST_CASE("SnapKV keeps the observation window and the top pooled votes, to capacity",
          "[budget][snapkv][prefill]") {
  const int H = 2, G = 2, T = 48, capacity = 16, window = 5;
  const auto pooling = GENERATE(dms::snapkv_pooling::max, dms::snapkv_pooling::avg);
  const int kernel = GENERATE(1, 3, 7);
  const int chunk = GENERATE(6, 48);
  const auto cfg = budget_config(H, G, 8);
  const tokens x(cfg, T + 5, 91);
  int seq = 0;
  auto cache =
      prefilled(cfg, dms::snapkv_policy({capacity, window, kernel, pooling}), x, T, chunk, seq);
  CAPTURE(int(pooling), kernel, chunk);
  require_compacted(cache, seq, capacity);
  const int prefix = T - window;
  for (int h = 0; h < H; ++h) {
    // Votes: probabilities of the last `window` queries, summed over them and the group.
    std::vector<double> votes(prefix, 0.0);
    for (int i = prefix; i < T; ++i)
      for (int g = 0; g < G; ++g) {
        const auto p = x.probs(h * G + g, i, G);
        for (int j = 0; j < prefix; ++j) votes[j] += p[j];
      }
    // 1-D pooling over prefix positions, padded like torch (max: -inf, avg: zeros / kernel).
    std::vector<double> pooled(prefix);
    for (int j = 0; j < prefix; ++j) {
      double acc =
          pooling == dms::snapkv_pooling::max ? -std::numeric_limits<double>::infinity() : 0.0;
      for (int i = j - kernel / 2; i <= j + kernel / 2; ++i) {
        if (i < 0 || i >= prefix) continue;
        acc = pooling == dms::snapkv_pooling::max ? std::max(acc, votes[i]) : acc + votes[i];
      }
      pooled[j] = pooling == dms::snapkv_pooling::max ? acc : acc / kernel;
    }
    auto expected = top_positions(pooled, range(0, prefix), capacity - window);
    for (int j = prefix; j < T; ++j) expected.push_back(j);
    REQUIRE(held(cache, cache.row_index(seq, h)) == expected);
  }
  // Decode after the prompt is dense.
  std::vector<float> probs;
  int stride = 0;
  for (int t = T; t < T + 5; ++t) {
    step(cache, seq, x, t, probs, stride);
    for (int h = 0; h < H; ++h)
      REQUIRE(cache.row_live(cache.row_index(seq, h)) == capacity + t - T + 1);
  }
}
