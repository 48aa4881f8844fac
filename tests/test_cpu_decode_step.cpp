// SPDX-License-Identifier: Apache-2.0
// dms::cpu::decode_step (single and batched) and the batched decode_attention against the
// reference, step after step: the caches must stay equal (every position, page, ring entry and
// K/V bit; scores within tolerance), so every policy evicts the same tokens; outputs agree within
// tolerance; a batch equals its sequences one by one, bit for bit; bad calls throw and change
// nothing.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "dms/cpu.hpp"
#include "dms/dms.hpp"
#include "support/cpu_cases.hpp"
#include "support/image_compare.hpp"

namespace {

using dms_test::cpu_rng;
using dms_test::policy_kind;
using dms_test::storage;

// Unit-scale data (|q|, |k| ~ sqrt(d)): see test_cpu_decode.cpp for how the bound scales.
constexpr float kOutTol = 2e-5f;
constexpr float kScoreTol = 2e-5f;

dms::cache_config small_config(int page_size) {
  dms::cache_config cfg;
  cfg.num_kv_heads = 2;
  cfg.group_size = 3;
  cfg.head_dim = 40;
  cfg.page_size = page_size;
  cfg.max_sequences = 4;
  cfg.max_row_slots = 1024;
  cfg.max_pages = 4 * 2 * (1024 / page_size);
  return cfg;
}

/// Equal caches: everything bit for bit but the scores, which agree within tolerance.
template <class T>
void require_same_cache(dms::cache_image<T> a, dms::cache_image<T> b) {
  REQUIRE(a.score.size() == b.score.size());
  for (std::size_t i = 0; i < a.score.size(); ++i)
    REQUIRE(std::abs(a.score[i] - b.score[i]) <= kScoreTol * (1 + std::abs(a.score[i])));
  std::fill(a.score.begin(), a.score.end(), 0.0f);
  std::fill(b.score.begin(), b.score.end(), 0.0f);
  REQUIRE(dms_test::first_difference(a, b) == "");
}

void require_close(const std::vector<float>& got, const std::vector<float>& want) {
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i)
    REQUIRE(std::abs(got[i] - want[i]) <= kOutTol * (1 + std::abs(want[i])));
}

struct step_inputs {
  std::vector<float> q, k, v, logits;
};

step_inputs random_inputs(const dms::cache_config& cfg, int batch, cpu_rng& rng) {
  step_inputs in;
  in.q.resize(std::size_t(batch) * cfg.num_query_heads() * cfg.head_dim);
  in.k.resize(std::size_t(batch) * cfg.num_kv_heads * cfg.head_dim);
  in.v.resize(in.k.size());
  in.logits.resize(std::size_t(batch) * cfg.num_kv_heads);
  rng.fill(in.q);
  rng.fill(in.k);
  rng.fill(in.v);
  for (float& l : in.logits) l = rng.uniform() < 0.6 ? 2.0f : -2.0f;
  return in;
}

/// `steps` decode steps on three sequences of different lengths: the reference one sequence at
/// a time, the fast path one batched step (or, with batched = false, sequence by sequence).
template <class T, class P>
void run_steps(const P& policy, int page_size, int steps, bool batched, std::uint64_t seed) {
  const dms::cache_config cfg = small_config(page_size);
  dms_test::twin<T, P> tw(cfg, policy);
  std::vector<int> seqs;
  for (int s = 0; s < 3; ++s) seqs.push_back(tw.ref.add_sequence());
  cpu_rng rng{seed};
  // Different lengths: 3, 40 and 150 tokens of plain appends (plus the policies' evictions).
  for (std::size_t s = 0; s < seqs.size(); ++s)
    for (int t = 0; t < std::array{3, 40, 150}[s]; ++t) {
      const step_inputs in = random_inputs(cfg, 1, rng);
      tw.ref.append(seqs[s], in.k, in.v, in.logits);
      tw.ref.finish_step(seqs[s]);
    }
  tw.sync();
  dms::cpu::thread_pool pool(3);
  const std::size_t qn = std::size_t(cfg.num_query_heads()) * cfg.head_dim;
  const std::size_t kn = std::size_t(cfg.num_kv_heads) * cfg.head_dim;
  const std::size_t Hk = std::size_t(cfg.num_kv_heads), H = std::size_t(cfg.num_query_heads());
  for (int step = 0; step < steps; ++step) {
    INFO("step " << step);
    const step_inputs in = random_inputs(cfg, 3, rng);
    std::vector<float> want(3 * qn), got(3 * qn), want_lse(3 * H), got_lse(3 * H);
    for (std::size_t b = 0; b < 3; ++b)
      dms::reference::decode_step(tw.ref, seqs[b], std::span<const float>(in.q).subspan(b * qn, qn),
                                  std::span<const float>(in.k).subspan(b * kn, kn),
                                  std::span<const float>(in.v).subspan(b * kn, kn),
                                  std::span<const float>(in.logits).subspan(b * Hk, Hk),
                                  std::span<float>(want).subspan(b * qn, qn),
                                  {.lse = std::span<float>(want_lse).subspan(b * H, H)});
    if (batched) {
      dms::cpu::decode_step(tw.fast, std::span<const int>(seqs), in.q, in.k, in.v, in.logits, got,
                            {.lse = got_lse}, pool);
    } else {
      for (std::size_t b = 0; b < 3; ++b)
        dms::cpu::decode_step(tw.fast, seqs[b], std::span<const float>(in.q).subspan(b * qn, qn),
                              std::span<const float>(in.k).subspan(b * kn, kn),
                              std::span<const float>(in.v).subspan(b * kn, kn),
                              std::span<const float>(in.logits).subspan(b * Hk, Hk),
                              std::span<float>(got).subspan(b * qn, qn),
                              {.lse = std::span<float>(got_lse).subspan(b * H, H)}, pool);
    }
    require_close(got, want);
    require_close(got_lse, want_lse);
    require_same_cache(tw.fast.to_image(), tw.ref.to_image());
    REQUIRE(tw.fast.stats().kv_token_reads == tw.ref.stats().kv_token_reads);
  }
}

}  // namespace

TEST_CASE("cpu decode_step == reference decode_step, step after step, every policy",
          "[cpu][decode_step]") {
  for (const policy_kind p : dms_test::all_policy_kinds)
    for (const bool batched : {false, true}) {
      INFO(dms_test::policy_kind_name(p) << (batched ? " batched" : " one by one"));
      dms_test::with_storage(p == policy_kind::dense ? storage::f16 : storage::bf16, [&](auto t) {
        using T = decltype(t);
        dms_test::with_policy(p, 120, 8, [&](auto policy) {
          run_steps<T>(policy, 8, 40, batched, 9000 + std::uint64_t(p));
        });
      });
    }
}

TEST_CASE("cpu decode_attention: a batch equals its sequences one by one, bit for bit",
          "[cpu][decode_step]") {
  for (const policy_kind p : {policy_kind::dense, policy_kind::h2o, policy_kind::quest}) {
    INFO(dms_test::policy_kind_name(p));
    dms_test::with_policy(p, 300, 16, [&](auto policy) {
      using P = decltype(policy);
      const dms::cache_config cfg = small_config(16);
      dms_test::twin<float, P> tw(cfg, policy);
      std::vector<int> seqs;
      cpu_rng rng{31};
      for (int s = 0; s < 4; ++s) seqs.push_back(tw.ref.add_sequence());
      for (int t = 0; t < 300; ++t)
        for (int s = 0; s < 4; ++s) {
          if (t >= 75 * (s + 1)) continue;
          const step_inputs in = random_inputs(cfg, 1, rng);
          tw.ref.append(seqs[std::size_t(s)], in.k, in.v);
        }
      tw.sync();
      const step_inputs in = random_inputs(cfg, 4, rng);
      const std::size_t qn = std::size_t(cfg.num_query_heads()) * cfg.head_dim;
      const std::size_t H = std::size_t(cfg.num_query_heads());
      std::vector<float> one(4 * qn), all(4 * qn), one_lse(4 * H), all_lse(4 * H);
      dms::cpu::thread_pool pool(2);
      for (std::size_t b = 0; b < 4; ++b)
        dms::cpu::decode_attention(tw.ref, seqs[b],
                                   std::span<const float>(in.q).subspan(b * qn, qn),
                                   std::span<float>(one).subspan(b * qn, qn),
                                   {.lse = std::span<float>(one_lse).subspan(b * H, H)}, pool);
      dms::cpu::decode_attention(tw.fast, std::span<const int>(seqs), in.q, all, {.lse = all_lse},
                                 pool);
      REQUIRE(std::memcmp(one.data(), all.data(), one.size() * sizeof(float)) == 0);
      REQUIRE(std::memcmp(one_lse.data(), all_lse.data(), one_lse.size() * sizeof(float)) == 0);
      const auto a = tw.ref.to_image(), b = tw.fast.to_image();
      REQUIRE((a.score.empty() ||
               std::memcmp(a.score.data(), b.score.data(), a.score.size() * sizeof(float)) == 0));
      REQUIRE(tw.ref.stats().kv_token_reads == tw.fast.stats().kv_token_reads);
    });
  }
}

TEST_CASE("cpu decode: bad calls throw dms::error and change nothing", "[cpu][decode_step]") {
  const dms::cache_config cfg = small_config(8);
  dms::paged_cache<dms::bfloat16, dms::dms_policy> cache(cfg, dms::dms_policy{{.window = 4}});
  const int a = cache.add_sequence(), b = cache.add_sequence();
  cpu_rng rng{5};
  for (int t = 0; t < 20; ++t) {
    const step_inputs in = random_inputs(cfg, 1, rng);
    cache.append(a, in.k, in.v, in.logits);
    cache.append(b, in.k, in.v, in.logits);
  }
  const auto before = cache.to_image();
  const auto reads = cache.stats().kv_token_reads;
  const std::size_t qn = std::size_t(cfg.num_query_heads()) * cfg.head_dim;
  std::vector<float> q(qn), out(qn), two_q(2 * qn), two_out(2 * qn), lse(3);
  const auto unchanged = [&] {
    REQUIRE(dms_test::first_difference(cache.to_image(), before) == "");
    REQUIRE(cache.stats().kv_token_reads == reads);
  };
  using Catch::Contains;
  CHECK_THROWS_WITH(dms::cpu::decode_attention(cache, a, std::span<const float>(q).first(5), out),
                    Contains("decode_attention: q has 5 elements; expected 240"));
  CHECK_THROWS_WITH(dms::cpu::decode_attention(cache, a, q, std::span<float>(out).first(7)),
                    Contains("decode_attention: out has 7 elements"));
  CHECK_THROWS_WITH(dms::cpu::decode_attention(cache, a, q, out, {.lse = lse}),
                    Contains("decode_attention: lse has 3 elements; expected 6"));
  CHECK_THROWS_WITH(dms::cpu::decode_attention(cache, 3, q, out),
                    Contains("unknown sequence id 3"));
  unchanged();
  const int dup[2] = {a, a}, unknown[2] = {a, 9}, pair[2] = {a, b};
  CHECK_THROWS_WITH(dms::cpu::decode_attention(cache, std::span<const int>(dup), two_q, two_out),
                    Contains("sequence 0 appears twice in the batch"));
  CHECK_THROWS_WITH(
      dms::cpu::decode_attention(cache, std::span<const int>(unknown), two_q, two_out),
      Contains("unknown sequence id 9"));
  CHECK_THROWS_WITH(dms::cpu::decode_attention(cache, std::span<const int>(pair), q, two_out),
                    Contains("q has 240 elements; expected 480"));
  unchanged();

  // Batched steps: a non-finite logit of the second sequence, then a pool that cannot take the
  // second sequence's new page: nothing may be appended for the first either.
  const step_inputs in = random_inputs(cfg, 2, rng);
  auto logits = in.logits;
  logits[3] = std::nanf("");
  CHECK_THROWS_WITH(
      dms::cpu::decode_step(cache, std::span<const int>(pair), in.q, in.k, in.v, logits, two_out),
      Contains("decision_logits[1][1] = nan is not finite (sequence 1)"));
  CHECK_THROWS_WITH(dms::cpu::decode_step(cache, std::span<const int>(pair), in.q, in.k, in.v,
                                          std::span<const float>(in.logits).first(3), two_out),
                    Contains("decision_logits has 3 elements; expected 4"));
  unchanged();

  dms::cache_config tight = cfg;
  tight.max_pages = 2 * cfg.num_kv_heads * 1 + 1;  // one page per row, and one to spare
  dms::paged_cache<float> small(tight);
  const int s0 = small.add_sequence(), s1 = small.add_sequence();
  for (int t = 0; t < tight.page_size; ++t) {
    const step_inputs one = random_inputs(tight, 1, rng);
    small.append(s0, one.k, one.v);
    small.append(s1, one.k, one.v);
  }
  const auto small_before = small.to_image();
  const int both[2] = {s0, s1};
  CHECK_THROWS_WITH(
      dms::cpu::decode_step(small, std::span<const int>(both), in.q, in.k, in.v, {}, two_out),
      Contains("page pool exhausted: decode step of 2 sequences needs 4 new pages, 1"));
  REQUIRE(dms_test::first_difference(small.to_image(), small_before) == "");
}
