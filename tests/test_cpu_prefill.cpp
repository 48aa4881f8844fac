// SPDX-License-Identifier: Apache-2.0
// dms::cpu prefill (the fast path) against dms::reference prefill on twin caches: every policy
// (the DMS visibility rule inside the prompt, the training-free prompt scores, compress_prompt at
// the end of the prompt), f32/fp16/bf16, GQA 1..8, head_dim 1..256, chunkings from 1 token to the
// whole prompt, left padding, prompts that continue a cache, at every SIMD level this CPU runs
// and on 1, 2 and 7 threads. After every chunk the outputs and lse agree within tolerance, the
// caches hold the same tokens in the same slots (scores within tolerance), and for one level the
// results are bit for bit the same whatever the executor. Bad calls throw the reference's errors
// and change nothing.
//
// Tolerance: as in test_cpu_decode.cpp, tol * S with S = 1 + max scale |q| |k| and
// tol = 16 * 2^-23; scores, which sum up to one probability per query and head, get
// tol * S * G * (1 + queries).
#include <algorithm>
#include <array>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <sstream>
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

constexpr double kTol = 16.0 * 0x1.0p-23;

struct prefill_case {
  policy_kind policy = policy_kind::dense;
  storage st = storage::bf16;
  int kv_heads = 2;
  int group = 2;
  int head_dim = 32;
  int page_size = 16;
  int prompt = 200;  // real tokens
  int padding = 0;   // left padding tokens before them
  int chunk = 64;    // tokens per chunk (padding included)
  int before = 0;    // tokens already in the cache (a prompt that continues one); no padding
  float flag_rate = 0.7f;
  int window = -1;  // DMS window; -1: the prompt / 8
  float q_scale = 1.0f;
  std::uint64_t seed = 1;

  std::string describe() const {
    std::ostringstream os;
    os << dms_test::policy_kind_name(policy) << " " << dms_test::storage_name(st)
       << " Hk=" << kv_heads << " G=" << group << " d=" << head_dim << " page=" << page_size
       << " prompt=" << prompt << " padding=" << padding << " chunk=" << chunk
       << " before=" << before << " flag_rate=" << flag_rate << " window=" << window
       << " q_scale=" << q_scale << " seed=" << seed;
    return os.str();
  }
};

std::vector<dms::cpu::executor*>& executors() {
  static dms::cpu::inline_executor inl;
  static dms::cpu::thread_pool one(1), two(2), seven(7);
  static std::vector<dms::cpu::executor*> all{&inl, &one, &two, &seven};
  return all;
}

struct level_guard {
  dms::cpu::simd_level saved = dms::cpu::active_simd_level();
  ~level_guard() { dms::cpu::set_simd_level(saved); }
};

struct prompt_data {
  std::vector<float> q, k, v, logits;
};

prompt_data random_prompt(const dms::cache_config& cfg, int tokens, const prefill_case& c,
                          cpu_rng& rng) {
  prompt_data p;
  p.q.resize(std::size_t(tokens) * cfg.num_query_heads() * cfg.head_dim);
  p.k.resize(std::size_t(tokens) * cfg.num_kv_heads * cfg.head_dim);
  p.v.resize(p.k.size());
  p.logits.resize(std::size_t(tokens) * cfg.num_kv_heads);
  rng.fill(p.q, c.q_scale);
  rng.fill(p.k);
  rng.fill(p.v);
  for (float& l : p.logits) l = rng.uniform() < c.flag_rate ? 1.5f : -1.5f;
  return p;
}

double logit_bound(const prompt_data& p, int d, double q_scale) {
  (void)q_scale;
  const auto norm_max = [&](const std::vector<float>& x) {
    double best = 0;
    for (std::size_t i = 0; i < x.size(); i += std::size_t(d)) {
      double n = 0;
      for (int e = 0; e < d; ++e) n += double(x[i + e]) * x[i + e];
      best = std::max(best, std::sqrt(n));
    }
    return best;
  };
  return 1.0 + norm_max(p.q) * norm_max(p.k) * 1.01 / std::sqrt(double(d));
}

template <class T>
void require_same_cache(dms::cache_image<T> a, dms::cache_image<T> b, double score_tol) {
  REQUIRE(a.score.size() == b.score.size());
  for (std::size_t i = 0; i < a.score.size(); ++i)
    REQUIRE(std::abs(a.score[i] - b.score[i]) <= score_tol * (1 + std::abs(b.score[i])));
  std::fill(a.score.begin(), a.score.end(), 0.0f);
  std::fill(b.score.begin(), b.score.end(), 0.0f);
  REQUIRE(dms_test::first_difference(a, b) == "");
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  // memcmp of two empty vectors would pass it null pointers, which UBSan rejects.
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

template <class T, class P>
void run_prefill_case(const prefill_case& c, const P& policy) {
  INFO(c.describe());
  dms::cache_config cfg;
  cfg.num_kv_heads = c.kv_heads;
  cfg.group_size = c.group;
  cfg.head_dim = c.head_dim;
  cfg.page_size = c.page_size;
  cfg.max_sequences = 2;
  cfg.max_row_slots = (c.before + c.prompt + c.page_size) / c.page_size * c.page_size;
  cfg.max_pages = 2 * c.kv_heads * (cfg.max_row_slots / c.page_size) + 4;
  dms_test::twin<T, P> tw(cfg, policy);
  const int other = tw.ref.add_sequence();
  const int seq = tw.ref.add_sequence();
  cpu_rng rng{c.seed};
  const int H = cfg.num_query_heads(), Hk = cfg.num_kv_heads, d = cfg.head_dim;
  const std::size_t qrow = std::size_t(H) * d, krow = std::size_t(Hk) * d;

  // A first part of the prompt through the reference (c.before tokens), so the fast path starts
  // from a cache with survivors, DMS flags in the ring and scores.
  const int total = c.before + c.prompt;
  if (c.before > 0) {
    const prompt_data first = random_prompt(cfg, c.before, c, rng);
    std::vector<float> out(first.q.size());
    for (int t = 0; t < c.before; t += 37) {  // also interleave the other sequence's pages
      const int len = std::min(37, c.before - t);
      const auto part = [&](const std::vector<float>& x, std::size_t per) {
        return std::span<const float>(x).subspan(std::size_t(t) * per, std::size_t(len) * per);
      };
      dms::reference::prefill_chunk(
          tw.ref, seq,
          {part(first.q, qrow), part(first.k, krow), part(first.v, krow),
           part(first.logits, std::size_t(Hk)), 0},
          total, {std::span<float>(out).subspan(std::size_t(t) * qrow, std::size_t(len) * qrow)});
      const prompt_data o = random_prompt(cfg, 1, c, rng);
      tw.ref.append(other, o.k, o.v, o.logits);
    }
  }
  const int tokens = c.padding + c.prompt;
  const prompt_data p = random_prompt(cfg, tokens, c, rng);
  const double S = logit_bound(p, d, c.q_scale);
  const auto image = tw.ref.to_image();

  // The chunks through the reference once: its outputs, and its cache after each chunk, which
  // the fast path must match at every SIMD level and on every executor.
  const auto chunk_inputs = [&](int begin) {
    const int len = std::min(c.chunk, tokens - begin);
    const auto part = [&](const std::vector<float>& x, std::size_t per) {
      return std::span<const float>(x).subspan(std::size_t(begin) * per, std::size_t(len) * per);
    };
    return dms::reference::prefill_chunk_inputs{part(p.q, qrow), part(p.k, krow), part(p.v, krow),
                                                part(p.logits, std::size_t(Hk)),
                                                std::clamp(c.padding - begin, 0, len)};
  };
  const auto chunk_outputs = [&](std::vector<float>& out, std::vector<float>& lse, int begin) {
    const int len = std::min(c.chunk, tokens - begin);
    const auto part = [&](std::vector<float>& x, std::size_t per) {
      return std::span<float>(x).subspan(std::size_t(begin) * per, std::size_t(len) * per);
    };
    return dms::reference::prefill_outputs{part(out, qrow), part(lse, std::size_t(H))};
  };
  std::vector<float> want(std::size_t(tokens) * qrow, -9.0f);
  std::vector<float> want_lse(std::size_t(tokens) * H, -9.0f);
  std::vector<dms::cache_image<T>> want_cache;
  for (int begin = 0; begin < tokens; begin += c.chunk) {
    dms::reference::prefill_chunk(tw.ref, seq, chunk_inputs(begin), total,
                                  chunk_outputs(want, want_lse, begin));
    want_cache.push_back(tw.ref.to_image());
  }

  level_guard guard;
  for (const dms::cpu::simd_level level : dms::cpu::supported_simd_levels()) {
    INFO("level " << dms::cpu::simd_level_name(level));
    dms::cpu::set_simd_level(level);
    std::vector<float> first_out, first_lse, first_score;
    for (std::size_t e = 0; e < executors().size(); ++e) {
      INFO("executor " << e);
      tw.fast.load_image(image);
      std::vector<float> got(want.size(), -9.0f), got_lse(want_lse.size(), -9.0f);
      for (int begin = 0, k = 0; begin < tokens; begin += c.chunk, ++k) {
        INFO("chunk at " << begin);
        const int len = std::min(c.chunk, tokens - begin);
        dms::cpu::prefill_chunk(tw.fast, seq, chunk_inputs(begin), total,
                                chunk_outputs(got, got_lse, begin), dms::cpu::end_of_prompt::finish,
                                *executors()[e]);
        require_same_cache(tw.fast.to_image(), want_cache[std::size_t(k)],
                           kTol * S * c.group * (1 + begin + len + c.before));
      }
      for (std::size_t i = 0; i < want.size(); ++i)
        REQUIRE(std::abs(got[i] - want[i]) <= kTol * S * 4);
      for (std::size_t i = 0; i < want_lse.size(); ++i) {
        if (std::isinf(want_lse[i])) {
          REQUIRE(got_lse[i] == want_lse[i]);
        } else {
          REQUIRE(std::abs(got_lse[i] - want_lse[i]) <= kTol * S);
        }
      }
      const auto score = tw.fast.to_image().score;
      if (e == 0) {
        first_out = got;
        first_lse = got_lse;
        first_score = score;
      } else {
        REQUIRE(same_bits(got, first_out));
        REQUIRE(same_bits(got_lse, first_lse));
        REQUIRE(same_bits(score, first_score));
      }
    }
  }
}

void run(const prefill_case& c) {
  dms_test::with_storage(c.st, [&](auto t) {
    using T = decltype(t);
    dms_test::with_policy(
        c.policy, c.before + c.prompt, c.page_size,
        [&](auto policy) { run_prefill_case<T>(c, policy); }, c.window);
  });
}

}  // namespace

TEST_CASE("cpu prefill == reference: every policy and storage type", "[cpu][prefill]") {
  for (const policy_kind p : dms_test::all_policy_kinds)
    for (const storage s : dms_test::all_storages) {
      prefill_case c;
      c.policy = p;
      c.st = s;
      c.prompt = 230;
      c.padding = 5;
      c.chunk = 100;
      c.seed = 100 + std::uint64_t(p) * 7 + std::uint64_t(s);
      run(c);
    }
}

TEST_CASE("cpu prefill == reference: chunkings, padding, continued prompts", "[cpu][prefill]") {
  for (const policy_kind p :
       {policy_kind::dms, policy_kind::h2o, policy_kind::tova, policy_kind::snapkv})
    for (const int chunk : {1, 7, 64, 65, 1000}) {
      prefill_case c;
      c.policy = p;
      c.prompt = chunk == 1 ? 40 : 150;
      c.padding = chunk == 7 ? 9 : 0;
      c.chunk = chunk;
      c.seed = 200 + std::uint64_t(p) * 11 + std::uint64_t(chunk);
      run(c);
    }
  for (const policy_kind p :
       {policy_kind::dms, policy_kind::h2o, policy_kind::snapkv, policy_kind::dense}) {
    prefill_case c;  // the prompt continues 150 tokens the reference already prefilled
    c.policy = p;
    c.before = 150;
    c.prompt = 120;
    c.chunk = 50;
    c.seed = 250 + std::uint64_t(p);
    run(c);
  }
}

TEST_CASE("cpu prefill == reference: GQA, head dims, DMS windows", "[cpu][prefill]") {
  for (const int g : {1, 2, 3, 4, 8}) {
    prefill_case c;
    c.group = g;
    c.policy = policy_kind::dms;
    c.prompt = 170;
    c.seed = 300 + std::uint64_t(g);
    run(c);
  }
  for (const int d : {1, 5, 32, 64, 80, 128, 256})
    for (const storage s : {storage::bf16, storage::f16}) {
      prefill_case c;
      c.head_dim = d;
      c.st = s;
      c.kv_heads = 1;
      c.prompt = 90;
      c.chunk = 90;
      c.seed = 400 + std::uint64_t(d);
      run(c);
    }
  for (const float rate : {0.0f, 0.5f, 1.0f})
    for (const int page : {1, 8, 64}) {
      prefill_case c;  // DMS with everything, half or nothing flagged: expired blocks skip
      c.policy = policy_kind::dms;
      c.flag_rate = rate;
      c.page_size = page;
      c.prompt = 400;
      c.chunk = 128;
      c.seed = 500 + std::uint64_t(rate * 10) + std::uint64_t(page);
      run(c);
    }
}

TEST_CASE("cpu prefill == reference: DMS deadlines at key-block and tile edges", "[cpu][prefill]") {
  // Every token flagged, so each key's deadline is position + window: with these windows the
  // last key of a 64-key block stops being visible at, or just after, the first query of a
  // tile (tiles of 128 / G queries), where a block skip must not cut one query too early.
  for (const int window : {0, 1, 2, 3, 63, 64, 65, 127})
    for (const int g : {1, 2, 4}) {
      prefill_case c;
      c.policy = policy_kind::dms;
      c.flag_rate = 1.0f;
      c.window = window;
      c.group = g;
      c.kv_heads = 1;
      c.prompt = 330;
      c.chunk = 330;
      c.seed = 700 + std::uint64_t(window) * 5 + std::uint64_t(g);
      run(c);
    }
}

TEST_CASE("cpu prefill == reference: random shapes, sharp softmaxes", "[cpu][prefill]") {
  cpu_rng rng{4242};
  for (int i = 0; i < 16; ++i) {
    prefill_case c;
    c.policy = dms_test::all_policy_kinds[rng.between(0, 8)];
    c.st = dms_test::all_storages[rng.between(0, 2)];
    c.kv_heads = rng.between(1, 2);
    c.group = rng.between(1, 5);
    c.head_dim = rng.between(1, 2) == 1 ? rng.between(1, 70) : 32 * rng.between(1, 3);
    c.page_size = std::array{1, 4, 16, 32}[std::size_t(rng.between(0, 3))];
    c.prompt = rng.between(1, 300);
    c.padding = rng.between(0, 3) == 0 ? rng.between(1, 20) : 0;
    c.chunk = rng.between(1, 4) == 1 ? rng.between(1, 20) : rng.between(20, 400);
    c.q_scale = rng.between(0, 2) == 0 ? 12.0f : 1.0f;
    c.seed = 600 + std::uint64_t(i);
    run(c);
  }
}

TEST_CASE("cpu prefill: the reference's errors, nothing changed", "[cpu][prefill]") {
  dms::cache_config cfg;
  cfg.num_kv_heads = 2;
  cfg.group_size = 2;
  cfg.head_dim = 8;
  cfg.page_size = 4;
  cfg.max_sequences = 2;
  cfg.max_row_slots = 64;
  cfg.max_pages = 40;
  dms::paged_cache<dms::bfloat16, dms::dms_policy> cache(cfg, dms::dms_policy{{.window = 4}});
  const int seq = cache.add_sequence();
  cpu_rng rng{3};
  prefill_case c;
  prompt_data p = random_prompt(cfg, 10, c, rng);
  std::vector<float> out(p.q.size());
  dms::cpu::prefill(cache, seq, {p.q, p.k, p.v, p.logits}, 4, {out});  // 10 tokens in
  const auto before = cache.to_image();
  using Catch::Contains;
  const auto same_as_reference = [&](const dms::reference::prefill_chunk_inputs& in,
                                     dms::reference::prefill_outputs o, int prompt_length) {
    std::string want, got;
    try {
      dms::reference::prefill_chunk(cache, seq, in, prompt_length, o);
    } catch (const dms::error& e) {
      want = e.what();
    }
    try {
      dms::cpu::prefill_chunk(cache, seq, in, prompt_length, o);
    } catch (const dms::error& e) {
      got = e.what();
    }
    REQUIRE(!want.empty());
    REQUIRE(got == want);
    REQUIRE(dms_test::first_difference(cache.to_image(), before) == "");
  };
  prompt_data next = random_prompt(cfg, 4, c, rng);
  std::vector<float> o4(next.q.size()), lse_bad(3);
  same_as_reference({next.q, next.k, next.v, next.logits, 1}, {o4}, 20);  // padding after tokens
  same_as_reference({next.q, next.k, next.v, next.logits, 0}, {o4}, 12);  // past prompt_length
  same_as_reference({next.q, std::span<const float>(next.k).first(5), next.v, next.logits, 0}, {o4},
                    20);
  same_as_reference({next.q, next.k, next.v, next.logits, 0}, {o4, lse_bad}, 20);
  next.logits[5] = std::numeric_limits<float>::infinity();
  same_as_reference({next.q, next.k, next.v, next.logits, 0}, {o4}, 20);
  CHECK_THROWS_WITH(dms::cpu::prefill(cache, seq, {next.q, next.k, next.v, next.logits}, 0, {o4}),
                    Contains("prefill: chunk_size = 0 is outside the valid range"));
  CHECK_THROWS_WITH(dms::cpu::prefill(cache, seq, {next.q, next.k, next.v, next.logits}, 2, {o4}),
                    Contains("decision_logits[2][1] = inf is not finite"));
  REQUIRE(dms_test::first_difference(cache.to_image(), before) == "");
}
