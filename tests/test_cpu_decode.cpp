// SPDX-License-Identifier: Apache-2.0
// dms::cpu decode (the fast path) against dms::reference decode, on twin caches with identical
// contents: every policy, f32/fp16/bf16, GQA 1..8, head_dim 1..256, page sizes 1..600, lengths 0
// to past two split-K chunks, holes, Quest page lists, sharp and flat softmaxes, at every SIMD
// level this CPU runs and on 1, 2 and 7 threads. Outputs, lse, probabilities and folded scores
// agree within the documented tolerance; KV reads agree exactly; and for one level the results
// are bit for bit the same whatever the executor.
//
// Tolerance (docs/design.md, "CPU fast path"): both sides accumulate in fp32 but in a different
// order, and the fast path's exp is a polynomial (<= 3 ulp). An error in a logit is bounded by
// a few ulp of |q| |k|, and it moves probabilities by that much relatively, so every bound below
// scales with S = 1 + max scale |q_g| |k_j| over the row: |d lse| <= tol * S,
// |d p| <= tol * S, |d out| <= tol * S * max|v|, |d score| <= tol * S * G (+ the score's own
// magnitude for H2O's sums), with tol = 16 * 2^-23 (the worst seen over this file is 1.02 * 2^-23 *
// S).
#include <algorithm>
#include <array>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "dms/cpu.hpp"
#include "dms/dms.hpp"
#include "support/cpu_cases.hpp"

namespace {

using dms_test::cpu_rng;
using dms_test::policy_kind;
using dms_test::storage;

constexpr double kTol = 16.0 * 0x1.0p-23;

struct decode_case {
  policy_kind policy = policy_kind::dense;
  storage st = storage::bf16;
  int kv_heads = 2;
  int group = 4;
  int head_dim = 64;
  int page_size = 16;
  int length = 100;
  float q_scale = 1.0f;
  float kv_scale = 1.0f;
  enum class holes { none, some, all_in_row0 } hole_mode = holes::none;
  bool equal_keys = false;
  std::uint64_t seed = 1;

  std::string describe() const {
    std::ostringstream os;
    os << dms_test::policy_kind_name(policy) << " " << dms_test::storage_name(st)
       << " Hk=" << kv_heads << " G=" << group << " d=" << head_dim << " page=" << page_size
       << " length=" << length << " q_scale=" << q_scale << " kv_scale=" << kv_scale
       << " holes=" << int(hole_mode) << " equal_keys=" << equal_keys << " seed=" << seed;
    return os.str();
  }
};

/// The executors every case runs on.
std::vector<dms::cpu::executor*>& executors() {
  static dms::cpu::inline_executor inl;
  static dms::cpu::thread_pool one(1), two(2), seven(7);
  static std::vector<dms::cpu::executor*> all{&inl, &one, &two, &seven};
  return all;
}

/// Restores the SIMD level when a test section ends, also on failure.
struct level_guard {
  dms::cpu::simd_level saved = dms::cpu::active_simd_level();
  ~level_guard() { dms::cpu::set_simd_level(saved); }
};

/// Builds a cache for the case by decode appends (every policy's own evictions happen), with a
/// reference attention every so often so that TOVA/H2O scores are real probabilities, then
/// optional holes punched by hand.
template <class T, class P>
void fill(dms::paged_cache<T, P>& cache, const decode_case& c, cpu_rng& rng, int seq, int other) {
  const auto& cfg = cache.config();
  const std::size_t kn = std::size_t(cfg.num_kv_heads) * cfg.head_dim;
  const std::size_t qn = std::size_t(cfg.num_query_heads()) * cfg.head_dim;
  std::vector<float> k(kn), v(kn), q(qn), out(qn), logits(std::size_t(cfg.num_kv_heads));
  std::vector<float> shared_key(kn);
  rng.fill(shared_key, c.kv_scale);
  for (int t = 0; t < c.length; ++t) {
    if (c.equal_keys) {
      k = shared_key;
    } else {
      rng.fill(k, c.kv_scale);
    }
    rng.fill(v, c.kv_scale);
    for (float& l : logits) l = rng.uniform() < 0.7 ? 1.0f : -1.0f;
    cache.append(seq, k, v, logits);
    if (t % 2 == 0 && t / 2 < c.length / 2) cache.append(other, k, v, logits);  // interleave pages
    if (t % 64 == 63 || t + 2 >= c.length) {
      rng.fill(q, c.q_scale);
      dms::reference::decode_attention(cache, seq, q, out);
    }
    cache.finish_step(seq);
  }
  if (c.hole_mode == decode_case::holes::none) return;
  for (int h = 0; h < cfg.num_kv_heads; ++h) {
    auto row = cache.row(seq, h);
    for (int s = 0; s < row.length(); ++s)
      if (row.position(s) >= 0 &&
          ((c.hole_mode == decode_case::holes::all_in_row0 && h == 0) ||
           (c.hole_mode == decode_case::holes::some && rng.uniform() < 0.3)))
        row.evict(s);
  }
}

/// S = 1 + max over the sequence's rows of scale |q_g| |k_j|: the logit magnitude the
/// tolerance scales with.
template <class T, class P>
double logit_bound(dms::paged_cache<T, P>& cache, int seq, const std::vector<float>& q) {
  const auto& cfg = cache.config();
  const auto view = cache.view();
  double qmax = 0, kmax = 0;
  for (int g = 0; g < cfg.num_query_heads(); ++g) {
    double n = 0;
    for (int e = 0; e < cfg.head_dim; ++e)
      n += double(q[std::size_t(g) * cfg.head_dim + e]) * q[std::size_t(g) * cfg.head_dim + e];
    qmax = std::max(qmax, std::sqrt(n));
  }
  for (int h = 0; h < cfg.num_kv_heads; ++h) {
    auto row = cache.row(seq, h);
    for (int s = 0; s < row.length(); ++s) {
      if (row.position(s) < 0) continue;
      double n = 0;
      for (int e = 0; e < cfg.head_dim; ++e) {
        const double x = dms::to_float(view.key(row.index(), s)[e]);
        n += x * x;
      }
      kmax = std::max(kmax, std::sqrt(n));
    }
  }
  return 1.0 + qmax * kmax / std::sqrt(double(cfg.head_dim));
}

struct decode_result {
  std::vector<float> out, lse, probs, score;
  std::int64_t reads = 0;
};

template <class T, class P>
decode_result run_one(dms::paged_cache<T, P>& cache, int seq, const std::vector<float>& q,
                      dms::cpu::executor* exec) {
  const auto& cfg = cache.config();
  decode_result r;
  r.out.assign(std::size_t(cfg.num_query_heads()) * cfg.head_dim, -7.0f);
  r.lse.assign(std::size_t(cfg.num_query_heads()), -7.0f);
  const std::int64_t before = cache.stats().kv_token_reads;
  if (exec)
    dms::cpu::decode_attention(cache, seq, q, r.out, {.lse = r.lse, .probs = &r.probs}, *exec);
  else
    dms::reference::decode_attention(cache, seq, q, r.out, {.lse = r.lse, .probs = &r.probs});
  r.reads = cache.stats().kv_token_reads - before;
  r.score = cache.to_image().score;
  return r;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  // memcmp of two empty vectors would pass it null pointers, which UBSan rejects.
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

template <class T, class P>
void run_decode_case(const decode_case& c, const P& policy) {
  INFO(c.describe());
  dms::cache_config cfg;
  cfg.num_kv_heads = c.kv_heads;
  cfg.group_size = c.group;
  cfg.head_dim = c.head_dim;
  cfg.page_size = c.page_size;
  cfg.max_sequences = 3;
  cfg.max_row_slots = (c.length + 8 + c.page_size - 1) / c.page_size * c.page_size;
  cfg.max_pages = 2 * c.kv_heads * (cfg.max_row_slots / c.page_size) + 8;
  dms_test::twin<T, P> tw(cfg, policy);
  const int other = tw.ref.add_sequence();  // pages of two sequences interleave in the pool
  const int seq = tw.ref.add_sequence();
  cpu_rng rng{c.seed};
  fill(tw.ref, c, rng, seq, other);
  std::vector<float> q(std::size_t(cfg.num_query_heads()) * cfg.head_dim);
  rng.fill(q, c.q_scale);
  const auto image = tw.ref.to_image();

  const double S = logit_bound(tw.ref, seq, q);
  const double vmax = std::max(1.0f, 4.0f * c.kv_scale);
  level_guard guard;
  for (const dms::cpu::simd_level level : dms::cpu::supported_simd_levels()) {
    INFO("level " << dms::cpu::simd_level_name(level));
    dms::cpu::set_simd_level(level);
    decode_result first;
    for (std::size_t e = 0; e < executors().size(); ++e) {
      INFO("executor " << e << " (concurrency " << executors()[e]->concurrency() << ")");
      tw.ref.load_image(image);
      tw.fast.load_image(image);
      const decode_result want = run_one(tw.ref, seq, q, nullptr);
      const decode_result got = run_one(tw.fast, seq, q, executors()[e]);
      REQUIRE(got.reads == want.reads);
      REQUIRE(got.probs.size() == want.probs.size());
      for (std::size_t i = 0; i < want.out.size(); ++i)
        REQUIRE(std::abs(got.out[i] - want.out[i]) <= kTol * S * vmax);
      for (std::size_t i = 0; i < want.lse.size(); ++i) {
        if (std::isinf(want.lse[i])) {
          REQUIRE(got.lse[i] == want.lse[i]);
        } else {
          REQUIRE(std::abs(got.lse[i] - want.lse[i]) <= kTol * S);
        }
      }
      for (std::size_t i = 0; i < want.probs.size(); ++i)
        REQUIRE(std::abs(got.probs[i] - want.probs[i]) <= kTol * S);
      REQUIRE(got.score.size() == want.score.size());
      for (std::size_t i = 0; i < want.score.size(); ++i)
        REQUIRE(std::abs(got.score[i] - want.score[i]) <=
                kTol * (S * c.group + std::abs(want.score[i])));
      // The cache itself is untouched apart from scores and the read counter.
      REQUIRE(tw.fast.to_image().position == tw.ref.to_image().position);
      if (e == 0) {
        first = got;
      } else {  // thread-count independence: bit for bit
        REQUIRE(same_bits(got.out, first.out));
        REQUIRE(same_bits(got.lse, first.lse));
        REQUIRE(same_bits(got.probs, first.probs));
        REQUIRE(same_bits(got.score, first.score));
      }
    }
  }
}

void run(const decode_case& c) {
  dms_test::with_storage(c.st, [&](auto t) {
    using T = decltype(t);
    dms_test::with_policy(c.policy, c.length, c.page_size,
                          [&](auto policy) { run_decode_case<T>(c, policy); });
  });
}

}  // namespace

TEST_CASE("cpu decode == reference: every policy and storage type", "[cpu][decode]") {
  for (const policy_kind p : dms_test::all_policy_kinds)
    for (const storage s : dms_test::all_storages) {
      decode_case c;
      c.policy = p;
      c.st = s;
      c.length = 600;  // two split-K chunks of 512 slots
      c.seed = 100 + std::uint64_t(p) * 7 + std::uint64_t(s);
      run(c);
    }
}

TEST_CASE("cpu decode == reference: GQA group sizes", "[cpu][decode]") {
  for (const int g : {1, 2, 3, 4, 5, 7, 8, 12})
    for (const storage s : {storage::bf16, storage::f32}) {
      decode_case c;
      c.group = g;
      c.st = s;
      c.length = 150;
      c.seed = 200 + std::uint64_t(g);
      run(c);
    }
}

TEST_CASE("cpu decode == reference: head dims", "[cpu][decode]") {
  for (const int d : {1, 2, 7, 16, 32, 33, 64, 80, 100, 128, 256})
    for (const storage s : dms_test::all_storages) {
      decode_case c;
      c.head_dim = d;
      c.st = s;
      c.length = 70;
      c.seed = 300 + std::uint64_t(d);
      run(c);
    }
}

TEST_CASE("cpu decode == reference: lengths at page and chunk boundaries", "[cpu][decode]") {
  for (const int page : {1, 3, 16, 64, 600})
    for (const int len : {0, 1, 2, 15, 16, 17, 511, 512, 513, 1100}) {
      if (page == 1 && len > 600) continue;  // keeps the test fast; 600 crosses a chunk already
      decode_case c;
      c.page_size = page;
      c.length = len;
      c.head_dim = 32;
      c.group = 2;
      c.seed = 400 + std::uint64_t(page) * 1000 + std::uint64_t(len);
      run(c);
    }
}

TEST_CASE("cpu decode == reference: holes, empty rows, Quest page lists", "[cpu][decode]") {
  for (const policy_kind p :
       {policy_kind::dense, policy_kind::quest, policy_kind::h2o, policy_kind::tova})
    for (const auto holes : {decode_case::holes::some, decode_case::holes::all_in_row0}) {
      decode_case c;
      c.policy = p;
      c.hole_mode = holes;
      c.length = 700;
      c.seed = 500 + std::uint64_t(p) + 10 * std::uint64_t(holes);
      run(c);
    }
  for (const int page : {4, 16, 32}) {  // Quest selections with other page sizes and lengths
    decode_case c;
    c.policy = policy_kind::quest;
    c.page_size = page;
    c.length = 1000;
    c.st = storage::f16;
    c.seed = 550 + std::uint64_t(page);
    run(c);
  }
}

TEST_CASE("cpu decode == reference: sharp, flat and large-magnitude softmaxes", "[cpu][decode]") {
  for (const float qs : {0.0f, 30.0f})
    for (const storage s : dms_test::all_storages) {
      decode_case c;
      c.q_scale = qs;
      c.st = s;
      c.length = 300;
      c.policy = policy_kind::h2o;
      c.seed = 600 + std::uint64_t(qs);
      run(c);
    }
  {
    decode_case c;  // huge K/V: bf16 and fp32 keep it, logits in the thousands
    c.kv_scale = 300.0f;
    c.st = storage::bf16;
    c.length = 200;
    c.seed = 611;
    run(c);
  }
  {
    decode_case c;  // every key equal: a uniform softmax, ties everywhere
    c.equal_keys = true;
    c.policy = policy_kind::tova;
    c.length = 530;
    c.seed = 612;
    run(c);
  }
}

TEST_CASE("cpu decode == reference: random shapes", "[cpu][decode]") {
  cpu_rng rng{777};
  for (int i = 0; i < 24; ++i) {
    decode_case c;
    c.policy = dms_test::all_policy_kinds[rng.between(0, 8)];
    c.st = dms_test::all_storages[rng.between(0, 2)];
    c.kv_heads = rng.between(1, 3);
    c.group = rng.between(1, 6);
    c.head_dim = rng.between(1, 3) == 1 ? rng.between(1, 140) : 16 * rng.between(1, 8);
    c.page_size = std::array{1, 2, 5, 8, 16, 32}[std::size_t(rng.between(0, 5))];
    c.length = rng.between(0, 800);
    c.hole_mode = rng.between(0, 3) == 0 ? decode_case::holes::some : decode_case::holes::none;
    c.q_scale = float(rng.between(1, 8));
    c.seed = 1000 + std::uint64_t(i);
    run(c);
  }
}

namespace {

// The jobs dms::cpu plans for one decode step over `seqs` of `cache` (rows as decode.hpp builds
// them, dense: every page read): each job as its items' (row, chunk) pairs.
template <class Cache>
std::vector<std::vector<std::pair<int, int>>> planned_jobs(const Cache& cache,
                                                           const std::vector<int>& seqs,
                                                           int max_per_job) {
  namespace cd = dms::cpu::detail;
  const int ps = cache.config().page_size, chunk_pages = cd::decode_chunk_pages(ps);
  cd::decode_workspace ws;
  for (const int s : seqs)
    for (int h = 0; h < cache.config().num_kv_heads; ++h) {
      cd::decode_row rp;
      rp.row = cache.row_index(s, h);
      rp.length = cache.row_length(rp.row);
      rp.num_pages = (rp.length + ps - 1) / ps;
      ws.rows.push_back(rp);
    }
  cd::plan_decode_items(ws, chunk_pages);
  cd::plan_decode_jobs(ws, cache.view(), chunk_pages, false, max_per_job);
  std::vector<std::vector<std::pair<int, int>>> jobs;
  for (std::size_t j = 0; j + 1 < ws.job_first.size(); ++j) {
    jobs.emplace_back();
    for (int i = ws.job_first[j]; i < ws.job_first[j + 1]; ++i) {
      const int item = ws.job_items[std::size_t(i)];
      const cd::decode_row& rp = ws.rows[std::size_t(ws.item_row[std::size_t(item)])];
      jobs.back().push_back({rp.row, item - rp.first_item});
    }
  }
  return jobs;
}

}  // namespace

TEST_CASE("cpu decode plan: rows whose pages interleave in the pool run as one job",
          "[cpu][decode]") {
  dms::cache_config cfg;
  cfg.num_kv_heads = 8;
  cfg.group_size = 1;
  cfg.head_dim = 8;
  cfg.page_size = 16;
  cfg.max_sequences = 2;
  cfg.max_pages = 2 * 8 * 40;
  const int tokens = dms::cpu::detail::decode_chunk_slots + 40;  // two chunks per row
  const std::vector<float> kv(std::size_t(cfg.num_kv_heads) * cfg.head_dim, 0.5f);
  for (const auto placement : {dms::page_placement::stack, dms::page_placement::adjacent}) {
    dms::paged_cache<dms::bfloat16> cache(cfg, {}, placement);
    const int a = cache.add_sequence(), b = cache.add_sequence();
    for (int t = 0; t < tokens; ++t) {
      cache.append(a, kv, kv);
      cache.append(b, kv, kv);
    }
    const auto jobs = planned_jobs(cache, {a, b}, dms::cpu::detail::decode_max_lockstep);
    INFO(dms::page_placement_name(placement));
    std::size_t items = 0;
    for (const auto& job : jobs) items += job.size();
    REQUIRE(items == 2u * 16u);  // every item once
    if (placement == dms::page_placement::stack) {
      // The 16 rows took their pages in turn: chunk c of rows 0-7, then of rows 8-15 (a job
      // holds at most decode_max_lockstep items), for c = 0, 1.
      REQUIRE(dms::cpu::detail::decode_max_lockstep == 8);
      REQUIRE(jobs.size() == 4u);
      for (std::size_t j = 0; j < jobs.size(); ++j)
        for (std::size_t i = 0; i < jobs[j].size(); ++i)
          REQUIRE(jobs[j][i] == std::pair<int, int>(int(j % 2 * 8 + i), int(j / 2)));
      // A smaller cap (many threads: decode.hpp keeps 4 jobs per thread) cuts the runs shorter.
      const auto threes = planned_jobs(cache, {a, b}, 3);
      REQUIRE(threes.size() == 2u * 6u);  // per chunk: rows 0-2, 3-5, 6-8, 9-11, 12-14, 15
      REQUIRE(threes[2] == std::vector<std::pair<int, int>>{{6, 0}, {7, 0}, {8, 0}});
      REQUIRE(threes[5] == std::vector<std::pair<int, int>>{{15, 0}});
      REQUIRE(threes[6] == std::vector<std::pair<int, int>>{{0, 1}, {1, 1}, {2, 1}});
    } else {
      REQUIRE(jobs.size() == 32u);  // each row's pages form runs of their own: no job to share
    }
  }
}
