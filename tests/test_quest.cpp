// SPDX-License-Identifier: Apache-2.0
// Quest (spec "Quest"): per-page key bounds, the upper bound U >= q.k, page selection against a
// brute-force top-k, the dense cases, and the KV-token reads it saves.

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

dms::cache_config quest_config(int kv_heads, int group_size, int head_dim, int page_size) {
  dms::cache_config c;
  c.num_kv_heads = kv_heads;
  c.group_size = group_size;
  c.head_dim = head_dim;
  c.page_size = page_size;
  c.max_pages = 2048;
  c.max_sequences = 2;
  c.max_row_slots = 4096;
  return c;
}

dms::quest_policy quest(int token_budget, int layer = 2, int dense_layers = 2) {
  return dms::quest_policy(dms::quest_params{token_budget, layer, dense_layers});
}

template <class T>
using quest_cache = dms::paged_cache<T, dms::quest_policy>;

std::vector<float> random_vector(std::mt19937& rng, std::size_t n, float sigma = 1.0f) {
  std::normal_distribution<float> normal(0.0f, sigma);
  std::vector<float> x(n);
  for (auto& e : x) e = normal(rng);
  return x;
}

template <class T>
void append_random(quest_cache<T>& cache, int seq, std::mt19937& rng, float sigma = 1.0f) {
  const auto& cfg = cache.config();
  const auto n = std::size_t(cfg.num_kv_heads) * cfg.head_dim;
  cache.append(seq, random_vector(rng, n, sigma), random_vector(rng, n));
}

// Per-channel min/max of the stored keys of one logical page, recomputed from the storage.
template <class T>
void stored_bounds(const quest_cache<T>& cache, int row, int page, std::vector<float>& lo,
                   std::vector<float>& hi) {
  const auto view = cache.view();
  const int d = cache.config().head_dim, P = cache.config().page_size;
  lo.assign(d, std::numeric_limits<float>::infinity());
  hi.assign(d, -std::numeric_limits<float>::infinity());
  for (int s = page * P; s < std::min(view.length(row), (page + 1) * P); ++s)
    for (int c = 0; c < d; ++c) {
      const float x = dms::to_float(view.key(row, s)[c]);
      lo[c] = std::min(lo[c], x);
      hi[c] = std::max(hi[c], x);
    }
}

// Each product rounded before it is added, as quest_rule::upper_bound adds them: without the
// volatile, GCC on AArch64 fuses a[c] * b[c] + s into one rounding (it contracts by default), and
// the bound's exact equality for one-key pages and U >= q.k would be off by an ulp.
float dot(const float* a, const float* b, int d) {
  float s = 0.0f;
  for (int c = 0; c < d; ++c) {
    const volatile float product = a[c] * b[c];
    s += product;
  }
  return s;
}

// The spec's bound, written independently of quest_rule.
float upper_bound(const float* q, const std::vector<float>& lo, const std::vector<float>& hi) {
  float u = 0.0f;
  for (std::size_t c = 0; c < lo.size(); ++c) u += std::max(q[c] * lo[c], q[c] * hi[c]);
  return u;
}

// Brute force: score every page but the last (max of U over the group), take the top
// (budget - 1) by score with ties to the lower index, sort, add the last page.
std::vector<int> brute_select(const quest_cache<float>& cache, int row, const float* q,
                              int budget_pages) {
  const auto& cfg = cache.config();
  const int n = cache.view().num_pages(row);
  std::vector<int> all;
  for (int p = 0; p < n; ++p) all.push_back(p);
  if (n <= budget_pages) return all;
  std::vector<std::pair<float, int>> scored;
  std::vector<float> lo, hi;
  for (int p = 0; p + 1 < n; ++p) {
    stored_bounds(cache, row, p, lo, hi);
    float best = -std::numeric_limits<float>::infinity();
    for (int g = 0; g < cfg.group_size; ++g)
      best = std::max(best, upper_bound(q + g * cfg.head_dim, lo, hi));
    scored.emplace_back(-best,
                        p);  // ascending (-score, index) = descending score, lower index first
  }
  std::sort(scored.begin(), scored.end());
  std::vector<int> pick;
  for (int i = 0; i < budget_pages - 1; ++i) pick.push_back(scored[i].second);
  std::sort(pick.begin(), pick.end());
  pick.push_back(n - 1);
  return pick;
}

std::vector<int> select(quest_cache<float>& cache, int seq, int h, const float* q) {
  std::vector<int> pages{99};  // select_pages must clear what it is given
  cache.policy().select_pages(cache.row(seq, h), q, cache.config().group_size,
                              cache.config().head_dim, pages);
  return pages;
}

}  // namespace

TEMPLATE_TEST_CASE("Quest page bounds are the exact per-channel min/max of the stored keys",
                   "[quest]", float, dms::half, dms::bfloat16) {
  using T = TestType;
  const auto cfg = quest_config(2, 2, 8, 4);
  quest_cache<T> cache(cfg, quest(16));
  std::mt19937 rng(1);
  int seq = cache.add_sequence();
  std::vector<float> lo, hi;
  const auto check_all = [&] {
    for (int h = 0; h < cfg.num_kv_heads; ++h) {
      const auto row = cache.row(seq, h);
      for (int p = 0; p < row.num_pages(); ++p) {
        stored_bounds(cache, row.index(), p, lo, hi);
        for (int c = 0; c < cfg.head_dim; ++c) {
          REQUIRE(row.page_min(p)[c] == lo[c]);
          REQUIRE(row.page_max(p)[c] == hi[c]);
        }
      }
    }
  };
  for (int t = 0; t < 23; ++t) {  // checked after every append, the partial last page included
    append_random(cache, seq, rng, 3.0f);
    check_all();
  }
  // Recycled pages start from scratch: small keys in pages that used to hold large ones.
  cache.remove_sequence(seq);
  seq = cache.add_sequence();
  for (int t = 0; t < 10; ++t) {
    append_random(cache, seq, rng, 0.01f);
    check_all();
  }
}

TEST_CASE("Quest upper bound U >= q.k for every key of the page", "[quest]") {
  const int P = GENERATE(1, 3, 8);
  const auto cfg = quest_config(2, 4, 16, P);
  quest_cache<float> cache(cfg, quest(16));
  std::mt19937 rng(2 + unsigned(P));
  const int seq = cache.add_sequence();
  for (int t = 0; t < 25 * P + 1; ++t) append_random(cache, seq, rng, 2.0f);
  const auto view = cache.view();
  const int d = cfg.head_dim, G = cfg.group_size;
  std::vector<float> scores;
  for (int trial = 0; trial < 20; ++trial) {
    const auto q = random_vector(rng, std::size_t(G) * d, 1.5f);
    for (int h = 0; h < cfg.num_kv_heads; ++h) {
      const auto row = cache.row(seq, h);
      cache.policy().score_pages(row, q.data(), G, d, scores);
      REQUIRE(int(scores.size()) == row.num_pages() - 1);  // the last page is not scored
      for (int p = 0; p < row.num_pages(); ++p)
        for (int s = p * P; s < std::min(row.length(), (p + 1) * P); ++s)
          for (int g = 0; g < G; ++g) {
            const float* qg = q.data() + g * d;
            const float u = dms::quest_rule::upper_bound(qg, row.page_min(p), row.page_max(p), d);
            const float qk = dot(qg, view.key(row.index(), s), d);
            REQUIRE(u >= qk);
            if (P == 1) REQUIRE(u == qk);  // a one-key page: the bound is tight
            if (p + 1 < row.num_pages()) REQUIRE(scores[p] >= u);  // the group's max
          }
    }
  }
}

TEST_CASE("Quest select_pages equals a brute-force top-(B/P - 1) plus the last page", "[quest]") {
  const int P = 4;
  const auto cfg = quest_config(2, 3, 8, P);
  const int budget = GENERATE(2 * P, 3 * P, 5 * P + 3, 9 * P);  // 2, 3, 5, 9 pages
  quest_cache<float> cache(cfg, quest(budget));
  std::mt19937 rng(3);
  const int seq = cache.add_sequence();
  for (int t = 0; t < 61; ++t) {  // up to 16 pages, the last one partial at times
    append_random(cache, seq, rng);
    for (int trial = 0; trial < 3; ++trial) {
      const auto q = random_vector(rng, std::size_t(cfg.group_size) * cfg.head_dim);
      for (int h = 0; h < cfg.num_kv_heads; ++h) {
        const auto picked = select(cache, seq, h, q.data());
        CAPTURE(budget, t, h);
        REQUIRE(picked == brute_select(cache, cache.row_index(seq, h), q.data(), budget / P));
        REQUIRE(std::is_sorted(picked.begin(), picked.end()));
        REQUIRE(int(picked.size()) == std::min(budget / P, cache.row(seq, h).num_pages()));
      }
    }
  }
}

TEST_CASE("Quest ties go to the lower page index", "[quest]") {
  const int P = 4, pages = 9;
  const auto cfg = quest_config(1, 2, 4, P);
  quest_cache<float> cache(cfg, quest(4 * P));  // 4 pages: 3 scored + the last
  const int seq = cache.add_sequence();
  // Every page holds the same keys, so every page has the same bound.
  std::mt19937 rng(4);
  std::vector<std::vector<float>> keys;
  for (int i = 0; i < P; ++i) keys.push_back(random_vector(rng, 4));
  for (int t = 0; t < pages * P; ++t) cache.append(seq, keys[t % P], random_vector(rng, 4));
  const auto q = random_vector(rng, 2 * 4);
  REQUIRE(select(cache, seq, 0, q.data()) == std::vector<int>{0, 1, 2, pages - 1});

  // Lift page 5 above the rest: it wins, the remaining slots go to the lowest ties.
  auto big = keys[0];
  for (std::size_t c = 0; c < big.size(); ++c) big[c] = q[c] + q[4 + c] > 0 ? 50.0f : -50.0f;
  quest_cache<float> lifted(cfg, quest(4 * P));
  const int s2 = lifted.add_sequence();
  for (int t = 0; t < pages * P; ++t)
    lifted.append(s2, t == 5 * P + 2 ? big : keys[t % P], random_vector(rng, 4));
  REQUIRE(select(lifted, s2, 0, q.data()) == std::vector<int>{0, 1, 5, pages - 1});
}

TEST_CASE("Quest reads every page of a short row, and of a dense layer", "[quest]") {
  const int P = 4;
  const auto cfg = quest_config(1, 1, 4, P);
  std::mt19937 rng(5);
  const auto q = random_vector(rng, 4);
  const auto all = [](int n) {
    std::vector<int> v;
    for (int p = 0; p < n; ++p) v.push_back(p);
    return v;
  };

  SECTION("rows with at most B/P pages are read densely") {
    quest_cache<float> cache(cfg, quest(3 * P));
    const int seq = cache.add_sequence();
    for (int t = 0; t < 3 * P; ++t) {
      append_random(cache, seq, rng);
      REQUIRE(select(cache, seq, 0, q.data()) == all(t / P + 1));
    }
    append_random(cache, seq, rng);  // a 4th page: now 2 scored pages + the last
    const auto picked = select(cache, seq, 0, q.data());
    REQUIRE(picked.size() == 3u);
    REQUIRE(picked.back() == 3);
  }
  SECTION("a budget below one page is rejected (it would read a whole page anyway)") {
    REQUIRE_THROWS_WITH(quest_cache<float>(cfg, quest(P - 1)),
                        Catch::Contains("quest_params.token_budget = " + std::to_string(P - 1)));
    quest_cache<float> cache(cfg, quest(P));  // one page: the current one only
    const int seq = cache.add_sequence();
    for (int t = 0; t < 3 * P; ++t) append_random(cache, seq, rng);
    REQUIRE(select(cache, seq, 0, q.data()) == std::vector<int>{2});
  }
  SECTION("layers below dense_layers read everything") {
    const int layer = GENERATE(0, 1, 2, 3);
    quest_cache<float> cache(cfg, quest(2 * P, layer, 2));
    const int seq = cache.add_sequence();
    for (int t = 0; t < 10 * P; ++t) append_random(cache, seq, rng);
    const auto picked = select(cache, seq, 0, q.data());
    if (layer < 2)
      REQUIRE(picked == all(10));
    else
      REQUIRE(picked.size() == 2u);
  }
}

TEST_CASE("Quest decode reads only the selected pages and counts only their slots", "[quest]") {
  const int P = 4, H = 2, G = 2, d = 8;
  const auto cfg = quest_config(H, G, d, P);
  const int budget = 3 * P;
  quest_cache<float> cache(cfg, quest(budget));
  std::mt19937 rng(6);
  const int seq = cache.add_sequence();
  std::vector<float> out(std::size_t(H) * G * d);
  std::int64_t reads = 0;
  for (int t = 0; t < 50; ++t) {
    const auto q = random_vector(rng, std::size_t(H) * G * d, 2.0f);
    const auto k = random_vector(rng, std::size_t(H) * d, 2.0f),
               v = random_vector(rng, std::size_t(H) * d);
    dms::reference::decode_step(cache, seq, q, k, v, {}, out);
    CAPTURE(t);
    // Quest evicts nothing, so the state after the step is the one attention saw.
    const auto view = cache.view();
    for (int h = 0; h < H; ++h) {
      const int r = cache.row_index(seq, h);
      REQUIRE(cache.row_live(r) == t + 1);
      const auto pages = brute_select(cache, r, q.data() + h * G * d, budget / P);
      std::vector<int> slots;
      for (int p : pages)
        for (int s = p * P; s < std::min(t + 1, (p + 1) * P); ++s) slots.push_back(s);
      reads += std::int64_t(slots.size());
      // The output is attention over exactly those slots.
      for (int g = 0; g < G; ++g) {
        const float* qg = q.data() + (h * G + g) * d;
        std::vector<double> w;
        double m = -1e30, sum = 0;
        for (int s : slots) {
          w.push_back(double(dot(qg, view.key(r, s), d)) / std::sqrt(double(d)));
          m = std::max(m, w.back());
        }
        for (double& x : w) sum += (x = std::exp(x - m));
        for (int c = 0; c < d; ++c) {
          double o = 0;
          for (std::size_t j = 0; j < slots.size(); ++j)
            o += w[j] / sum * view.value(r, slots[j])[c];
          REQUIRE(out[(h * G + g) * d + c] == Approx(o).margin(1e-5));
        }
      }
    }
    REQUIRE(cache.stats().kv_token_reads == reads);
  }
  // Once the rows are long, far fewer than all slots are read.
  REQUIRE(reads < std::int64_t(H) * 50 * 51 / 2);
  REQUIRE(cache.stats().live_slots == H * 50);  // nothing evicted
}
