// SPDX-License-Identifier: Apache-2.0
// The thread-safety contract of paged_cache (paged_cache.hpp, README "Threads"): calls on
// different sequences of one cache may run on different threads, add_sequence / remove_sequence
// included; the page pool is shared and locked inside. Four threads each add a sequence, prefill
// it in chunks, decode it and remove it, three times over, on one cache whose pool is exactly big
// enough for all of them; every thread's outputs and kept positions must equal a one-thread run
// of the same work bit for bit. The tsan preset runs this under ThreadSanitizer (label thread),
// where any data race fails the test.

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "dms/dms.hpp"

namespace {

constexpr int kThreads = 4, kRounds = 3, kPrompt = 20, kChunk = 5, kSteps = 40;

dms::cache_config config() {
  dms::cache_config c;
  c.num_kv_heads = 2;
  c.group_size = 2;
  c.head_dim = 16;
  c.page_size = 4;
  c.max_sequences = kThreads;
  c.max_row_slots = kPrompt + kSteps;
  // Every thread's sequence may hold all its tokens (Quest, dense): exactly enough pages.
  c.max_pages = kThreads * c.num_kv_heads * ((kPrompt + kSteps) / c.page_size);
  return c;
}

struct rng {
  std::uint64_t s;
  float next() {
    std::uint64_t z = (s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    return float(double(z >> 11) * 0x1.0p-53 * 4.0 - 2.0);
  }
  std::vector<float> many(std::size_t n) {
    std::vector<float> x(n);
    for (auto& e : x) e = next();
    return x;
  }
};

/// One thread's work; everything it saw, for the comparison.
template <class Cache>
std::vector<float> work(Cache& cache, int thread) {
  using P = typename Cache::policy_type;
  const auto& c = cache.config();
  const std::size_t qn = std::size_t(c.num_query_heads()) * c.head_dim,
                    kn = std::size_t(c.num_kv_heads) * c.head_dim;
  rng r{0x7e57ULL + std::uint64_t(thread)};
  std::vector<float> seen;
  for (int round = 0; round < kRounds; ++round) {
    const int seq = cache.add_sequence();
    const auto q = r.many(kPrompt * qn), k = r.many(kPrompt * kn), v = r.many(kPrompt * kn);
    auto logits = r.many(std::size_t(kPrompt) * c.num_kv_heads);
    if (!P::uses_decision_logits) logits.clear();
    std::vector<float> out(q.size());
    dms::reference::prefill(cache, seq, {q, k, v, logits}, kChunk, {out});
    seen.insert(seen.end(), out.begin(), out.end());
    for (int t = 0; t < kSteps; ++t) {
      const auto qt = r.many(qn), kt = r.many(kn), vt = r.many(kn);
      auto lt = r.many(std::size_t(c.num_kv_heads));
      if (!P::uses_decision_logits) lt.clear();
      std::vector<float> o(qn);
      dms::reference::decode_step(cache, seq, std::span<const float>(qt),
                                  std::span<const float>(kt), std::span<const float>(vt),
                                  std::span<const float>(lt), std::span<float>(o));
      seen.insert(seen.end(), o.begin(), o.end());
    }
    for (int h = 0; h < c.num_kv_heads; ++h) {
      auto row = cache.row(seq, h);
      seen.push_back(float(row.live()));
      for (int s = 0; s < row.length(); ++s) seen.push_back(float(row.position(s)));
    }
    cache.remove_sequence(seq);
  }
  return seen;
}

template <class P>
void run_concurrently(const P& policy) {
  INFO("policy " << policy.name());
  std::vector<std::vector<float>> expected(kThreads);
  {
    dms::paged_cache<dms::bfloat16, P> serial(config(), policy);
    for (int i = 0; i < kThreads; ++i) expected[std::size_t(i)] = work(serial, i);
  }
  dms::paged_cache<dms::bfloat16, P> shared(config(), policy);
  std::vector<std::vector<float>> got(kThreads);
  std::vector<std::string> errors(kThreads);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i)
    threads.emplace_back([&, i] {
      try {
        got[std::size_t(i)] = work(shared, i);
      } catch (const std::exception& e) {
        errors[std::size_t(i)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  for (int i = 0; i < kThreads; ++i) {
    INFO("thread " << i);
    REQUIRE(errors[std::size_t(i)] == "");
    REQUIRE(got[std::size_t(i)].size() == expected[std::size_t(i)].size());
    REQUIRE(std::memcmp(got[std::size_t(i)].data(), expected[std::size_t(i)].data(),
                        got[std::size_t(i)].size() * sizeof(float)) == 0);
  }
  const auto st = shared.stats();
  REQUIRE(st.pages_in_use == 0);
  REQUIRE(st.live_slots == 0);
  REQUIRE(shared.available_pages() == config().max_pages);
}

}  // namespace

TEST_CASE("threads: different sequences of one cache run concurrently", "[thread]") {
  run_concurrently(dms::dms_policy{{.window = 4}});
  run_concurrently(dms::tova_policy({.budget = 8}));
  run_concurrently(dms::h2o_policy({.budget = 8, .recent = 3}));
  run_concurrently(dms::quest_policy({.token_budget = 8}));
  run_concurrently(dms::streaming_llm_policy({.sinks = 2, .recent = 6}));
  run_concurrently(dms::dense_policy{});
}

TEST_CASE("threads: appends racing for the last free pages never lose the strong guarantee",
          "[thread]") {
  // Four threads append to their own sequences until the pool runs dry: every page goes to
  // exactly one of them, the failed appends change nothing, and the totals add up.
  dms::cache_config c = config();
  c.max_pages = 30;
  c.max_row_slots = 400;
  dms::paged_cache<float> cache(c);
  std::vector<int> appended(kThreads, 0), ids(kThreads, -1);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i)
    threads.emplace_back([&, i] {
      const int seq = cache.add_sequence();
      ids[std::size_t(i)] = seq;
      const std::vector<float> kv(std::size_t(c.num_kv_heads) * c.head_dim, float(i));
      for (;;) {
        try {
          cache.append(seq, kv, kv);
          ++appended[std::size_t(i)];
        } catch (const dms::error&) {
          break;  // the pool is exhausted
        }
      }
    });
  for (auto& t : threads) t.join();
  int total = 0;
  for (int i = 0; i < kThreads; ++i) {
    total += appended[std::size_t(i)];
    const int r = cache.row_index(ids[std::size_t(i)], 0);
    REQUIRE(cache.row_live(r) == appended[std::size_t(i)]);
    REQUIRE(cache.row_live(r + 1) == appended[std::size_t(i)]);
  }
  REQUIRE(cache.stats().pages_in_use == 30);
  REQUIRE(cache.stats().live_slots == 2 * total);
  // Each row fills whole pages before taking another, so the rows hold exactly the 30 pages.
  int pages = 0;
  for (int i = 0; i < kThreads; ++i)
    pages += 2 * ((appended[std::size_t(i)] + c.page_size - 1) / c.page_size);
  REQUIRE(pages == 30);
}
