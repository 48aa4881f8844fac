// SPDX-License-Identifier: Apache-2.0
// GPU: the bookkeeping kernels against the serial step algorithm (exact image equality; the CPU
// tests tie that algorithm to paged_cache), whole decode steps of every policy against the CPU
// reference path step by step, failed steps (defined outputs, sticky status), duplicate ids (the
// first entry counts, as in the serial driver), and a decode step captured in a CUDA graph from
// the very first step and replayed.
//
// Tolerances (relative to the largest |reference output| of the step):
//   fp32 queries/outputs over bf16 or half K/V: 1e-4 (both sides accumulate in fp32 over the same
//   rounded K/V; only the summation order differs).
// Evictions must be identical: DMS, StreamingLLM, Quest and dense decide from integers; TOVA and
// H2O decide from fp32 scores whose gaps (random data) are far above the summation-order noise.

#include <cuda_runtime_api.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <tuple>
#include <vector>

#include "dms/cuda/bookkeeping.cuh"
#include "dms/cuda/decode_step.cuh"
#include "dms/cuda/device_buffer.cuh"
#include "dms/cuda/device_cache.cuh"
#include "dms/dms.hpp"
#include "support/image_compare.hpp"
#include "support/step_config.hpp"

namespace {

using dms::cuda::check;
using dms::cuda::device_buffer;

using dms_test::step_config;

template <class T>
device_buffer<T> to_device(const std::vector<T>& h) {
  device_buffer<T> d(h.size());
  d.upload(h, nullptr);
  return d;
}

std::vector<float> random_vector(std::mt19937& rng, std::size_t n, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> x(n);
  for (auto& e : x) e = normal(rng);
  return x;
}

// ---- bookkeeping kernels == serial algorithm ------------------------------------------------

template <class T, class P>
void check_bookkeeping(const dms::cache_config& cfg, P policy, int steps, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> logit(-1.0f, 1.0f), uniform(0.0f, 1.0f);
  const int H = cfg.num_kv_heads, d = cfg.head_dim;
  dms::paged_cache<T, P> host(cfg, policy);
  std::vector<std::int32_t> seqs;
  for (int s = 0; s < 4; ++s) seqs.push_back(host.add_sequence());
  auto img = host.to_image();
  dms::cuda::device_cache<T, P> dev(host);
  const auto dp = dev.device_policy();

  for (int step = 0; step < steps; ++step) {
    std::vector<std::int32_t> batch;
    for (std::size_t i = 0; i < seqs.size(); ++i)
      if (step >= int(i)) batch.push_back(seqs[i]);
    std::shuffle(batch.begin(), batch.end(), rng);
    const int B = int(batch.size());
    const auto k = random_vector(rng, std::size_t(B) * H * d);
    const auto v = random_vector(rng, std::size_t(B) * H * d);
    std::vector<float> logits(std::size_t(B) * H);
    for (auto& x : logits) x = logit(rng);

    REQUIRE(dms::step::append_batch(img.state(), dp, std::span<const std::int32_t>(batch), k.data(),
                                    v.data(), logits.data(), false) == dms::step_status::ok);
    auto d_batch = to_device(batch);
    auto d_k = to_device(k), d_v = to_device(v), d_logits = to_device(logits);
    std::size_t bytes = 0;
    REQUIRE(dms::cuda::append(nullptr, bytes, dev.state(), dp, d_batch.data(), B, d_k.data(),
                              d_v.data(), d_logits.data(), false) == cudaSuccess);
    device_buffer<unsigned char> temp(bytes);
    REQUIRE(dms::cuda::append(temp.data(), bytes, dev.state(), dp, d_batch.data(), B, d_k.data(),
                              d_v.data(), d_logits.data(), false) == cudaSuccess);
    REQUIRE(dms_test::first_difference(dev.download(), img) == "");

    if (!img.score.empty()) {  // the same random scores on both sides, then evict
      for (auto& s : img.score) s = uniform(rng);
      dev.upload(img);
      dms::step::evict_batch(img.state(), dp, std::span<const std::int32_t>(batch));
      REQUIRE(dms::cuda::evict_after_attention(dev.state(), dp, d_batch.data(), B) == cudaSuccess);
      REQUIRE(dms_test::first_difference(dev.download(), img) == "");
    }
    if (step == steps / 2) {  // release one sequence and reuse its id
      dev.remove_sequence(seqs[0]);
      dms::step::release_sequence(img.state(), seqs[0]);
      REQUIRE(dev.add_sequence() == seqs[0]);
      img.active[seqs[0]] = 1;
      REQUIRE(dms_test::first_difference(dev.download(), img) == "");
    }
  }
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

// ---- whole decode steps == CPU reference -----------------------------------------------------

template <class T, class P>
void check_decode(const dms::cache_config& cfg, P policy, int prompt, int steps, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> logit(-1.0f, 0.4f);
  const int H = cfg.num_kv_heads, Hq = cfg.num_query_heads(), d = cfg.head_dim;
  dms::paged_cache<T, P> host(cfg, policy);
  std::vector<std::int32_t> seqs;
  for (int s = 0; s < 3; ++s) seqs.push_back(host.add_sequence());
  // Ragged prompts appended token by token (sequence 2 stays empty until decode).
  for (int s = 0; s < 2; ++s)
    for (int t = 0; t < prompt * (s + 1); ++t) {
      const auto k = random_vector(rng, std::size_t(H) * d), v = random_vector(rng, k.size());
      std::vector<float> lg(static_cast<std::size_t>(H));
      for (auto& x : lg) x = logit(rng);
      host.append(seqs[s], k, v, lg);
    }
  dms::cuda::device_cache<T, P> dev(host);
  dms::cuda::decoder<T, P> decoder(dev);

  const int B = int(seqs.size());
  for (int step = 0; step < steps; ++step) {
    const auto k = random_vector(rng, std::size_t(B) * H * d);
    const auto v = random_vector(rng, k.size());
    const auto q = random_vector(rng, std::size_t(B) * Hq * d, 0.5f);
    std::vector<float> logits(std::size_t(B) * H);
    for (auto& x : logits) x = logit(rng);

    std::vector<float> ref(q.size()), ref_lse(std::size_t(B) * Hq);
    for (int b = 0; b < B; ++b) {
      const auto sub = [&](const std::vector<float>& x, std::size_t n) {
        return std::span<const float>(x).subspan(std::size_t(b) * n, n);
      };
      dms::reference::decode_extras extras;
      extras.lse = std::span<float>(ref_lse).subspan(std::size_t(b) * Hq, std::size_t(Hq));
      dms::reference::decode_step(
          host, seqs[b], sub(q, std::size_t(Hq) * d), sub(k, std::size_t(H) * d),
          sub(v, std::size_t(H) * d),
          P::uses_decision_logits ? sub(logits, std::size_t(H)) : std::span<const float>{},
          std::span<float>(ref).subspan(std::size_t(b) * Hq * d, std::size_t(Hq) * d), extras);
    }

    auto d_seqs = to_device(seqs);
    auto d_k = to_device(k), d_v = to_device(v), d_q = to_device(q), d_logits = to_device(logits);
    device_buffer<float> d_out(q.size()), d_lse(ref_lse.size());
    dms::cuda::decode_step_inputs<float, float> in;
    in.seq_ids = d_seqs.data();
    in.batch = B;
    in.k = d_k.data();
    in.v = d_v.data();
    in.decision_logits = P::uses_decision_logits ? d_logits.data() : nullptr;
    in.q = d_q.data();
    dms::cuda::decode_step_outputs<float> out;
    out.out = d_out.data();
    out.lse = d_lse.data();
    decoder.step(in, out);
    dev.check_status();

    std::vector<float> got, got_lse;
    d_out.download(got, nullptr);
    d_lse.download(got_lse, nullptr);
    float scale = 0.0f, err = 0.0f;
    for (std::size_t i = 0; i < ref.size(); ++i) {
      scale = std::max(scale, std::fabs(ref[i]));
      err = std::max(err, std::fabs(ref[i] - got[i]));
    }
    INFO("step " << step << ": max |out - ref| = " << err << ", max |ref| = " << scale);
    REQUIRE(err <= 1e-4f * std::max(scale, 1.0f));
    for (std::size_t i = 0; i < ref_lse.size(); ++i)
      REQUIRE(got_lse[i] == Approx(ref_lse[i]).epsilon(1e-4));

    // Same evictions: every row holds the same positions in the same slots.
    dms::paged_cache<T, P> mirror(cfg, policy);
    dev.download_to(mirror);
    for (const int seq : seqs)
      for (int h = 0; h < H; ++h) {
        const int r = host.row_index(seq, h);
        INFO("step " << step << " row " << r);
        REQUIRE(mirror.positions(r) == host.positions(r));
      }
  }
}

}  // namespace

TEST_CASE("gpu bookkeeping == serial step: every policy", "[gpu][step]") {
  check_bookkeeping<dms::bfloat16>(step_config(2, 2, 64, 4, 256), dms::dense_policy{}, 20, 1);
  for (const int w : {0, 3, 16})
    check_bookkeeping<dms::half>(step_config(3, 2, 64, 4, 512), dms::dms_policy(dms::dms_params{w}),
                                 40, unsigned(2 + w));
  check_bookkeeping<float>(step_config(2, 4, 64, 4, 256), dms::tova_policy(dms::tova_params{7}), 30,
                           3);
  check_bookkeeping<dms::bfloat16>(step_config(2, 2, 64, 4, 256),
                                   dms::h2o_policy(dms::h2o_params{9, 4}), 30, 4);
  check_bookkeeping<dms::half>(step_config(2, 2, 64, 4, 256),
                               dms::streaming_llm_policy(dms::streaming_params{2, 5}), 30, 5);
  check_bookkeeping<float>(step_config(2, 2, 64, 4, 256),
                           dms::quest_policy(dms::quest_params{8, 2, 2}), 30, 6);
}

TEST_CASE("gpu bookkeeping: capacity errors are reported, change nothing, and stick",
          "[gpu][step][errors]") {
  const auto cfg = step_config(2, 1, 64, 2, 5);  // 3 sequences x 2 heads need 6 pages; 5 exist
  dms::paged_cache<float, dms::dense_policy> host(cfg);
  for (int s = 0; s < 3; ++s) host.add_sequence();
  dms::cuda::device_cache<float, dms::dense_policy> dev(host);
  const auto before = dev.download();
  const std::vector<std::int32_t> three{0, 1, 2};
  auto d_seqs = to_device(three);
  device_buffer<float> kv(3 * 2 * 64);
  check(cudaMemset(kv.data(), 0, kv.size() * sizeof(float)), "cudaMemset");
  std::size_t bytes = 0;
  REQUIRE(dms::cuda::append(nullptr, bytes, dev.state(), dev.device_policy(), d_seqs.data(), 3,
                            kv.data(), kv.data(), nullptr, false) == cudaSuccess);
  device_buffer<unsigned char> temp(bytes);
  REQUIRE(dms::cuda::append(temp.data(), bytes, dev.state(), dev.device_policy(), d_seqs.data(), 3,
                            kv.data(), kv.data(), nullptr, false) == cudaSuccess);
  CHECK(dev.status() == dms::step_status::pool_exhausted);
  CHECK_THROWS_WITH(dev.check_status(), Catch::Contains("page pool exhausted"));
  auto after = dev.download();
  after.status = 0;
  CHECK(dms_test::first_difference(before, after) == "");
  // Sticky: two sequences would fit, but nothing runs until the status is cleared.
  REQUIRE(dms::cuda::append(temp.data(), bytes, dev.state(), dev.device_policy(), d_seqs.data(), 2,
                            kv.data(), kv.data(), nullptr, false) == cudaSuccess);
  CHECK(dev.status() == dms::step_status::pool_exhausted);
  dev.clear_status();
  REQUIRE(dms::cuda::append(temp.data(), bytes, dev.state(), dev.device_policy(), d_seqs.data(), 2,
                            kv.data(), kv.data(), nullptr, false) == cudaSuccess);
  CHECK(dev.status() == dms::step_status::ok);
  CHECK(dev.download().free_top == 1);
  // Sizing with too little temporary storage is an error, not an overrun.
  std::size_t small = bytes / 2;
  CHECK(dms::cuda::append(temp.data(), small, dev.state(), dev.device_policy(), d_seqs.data(), 2,
                          kv.data(), kv.data(), nullptr, false) == cudaErrorInvalidValue);
}

TEST_CASE("gpu decode steps == CPU reference: every policy, step by step", "[gpu][decode]") {
  const auto cfg = step_config(2, 4, 64, 16, 512);
  check_decode<dms::bfloat16>(cfg, dms::dense_policy{}, 40, 24, 11);
  check_decode<dms::bfloat16>(cfg, dms::dms_policy(dms::dms_params{8}), 40, 40, 12);
  check_decode<dms::half>(cfg, dms::tova_policy(dms::tova_params{24}), 40, 30, 13);
  check_decode<dms::bfloat16>(cfg, dms::h2o_policy(dms::h2o_params{24, 8}), 40, 30, 14);
  check_decode<dms::half>(cfg, dms::streaming_llm_policy(dms::streaming_params{4, 20}), 40, 30, 15);
  check_decode<dms::bfloat16>(cfg, dms::quest_policy(dms::quest_params{32, 2, 2}), 60, 30, 16);
  check_decode<dms::bfloat16>(cfg, dms::snapkv_policy{}, 40, 20, 17);
}

// The subset bench/gpu_check/run.sh runs under compute-sanitizer: the bookkeeping kernels (append,
// score eviction, release) and whole decode steps of every policy (Quest selection included) at
// small shapes.
TEST_CASE("gpu decode steps: small shapes for the sanitizers", "[gpu][step][decode][sanitize]") {
  check_bookkeeping<dms::half>(step_config(3, 2, 64, 4, 512), dms::dms_policy(dms::dms_params{3}),
                               8, 61);
  check_bookkeeping<float>(step_config(2, 4, 64, 4, 256), dms::tova_policy(dms::tova_params{7}), 8,
                           62);
  const auto cfg = step_config(2, 4, 64, 16, 512);
  check_decode<dms::bfloat16>(cfg, dms::dense_policy{}, 20, 3, 63);
  check_decode<dms::bfloat16>(cfg, dms::dms_policy(dms::dms_params{8}), 20, 4, 64);
  check_decode<dms::half>(cfg, dms::tova_policy(dms::tova_params{24}), 20, 3, 65);
  check_decode<dms::bfloat16>(cfg, dms::h2o_policy(dms::h2o_params{24, 8}), 20, 3, 66);
  check_decode<dms::half>(cfg, dms::streaming_llm_policy(dms::streaming_params{4, 20}), 20, 3, 67);
  check_decode<dms::bfloat16>(cfg, dms::quest_policy(dms::quest_params{32, 2, 2}), 40, 3, 68);
}

TEST_CASE("gpu bookkeeping: of duplicate ids the first entry counts, as in the serial driver",
          "[gpu][step][errors][sanitize]") {
  // One KV head, so every batch entry is one row of the planning block and duplicates of one id
  // land in different warps; ids 0..3 active, 4 inactive, -1 and 9 out of range.
  for (const int H : {1, 2}) {
    const auto cfg = step_config(H, 1, 64, 4, 512);
    dms::paged_cache<float, dms::dense_policy> host(cfg);
    for (int s = 0; s < 4; ++s) host.add_sequence();
    auto img = host.to_image();
    dms::cuda::device_cache<float, dms::dense_policy> dev(host);
    const auto dp = dev.device_policy();
    const std::vector<std::int32_t> pool{0, 1, 2, 3, 0, 1, 2, 3, 4, -1, 9};
    std::mt19937 rng(41 + unsigned(H));
    constexpr int max_batch = 300;  // over one planning block of 256 rows
    device_buffer<float> kv(std::size_t(max_batch) * H * 64);
    check(cudaMemset(kv.data(), 0, kv.size() * sizeof(float)), "cudaMemset");
    std::vector<float> h_kv(kv.size(), 0.0f);
    std::size_t bytes = 0;
    REQUIRE(dms::cuda::append(nullptr, bytes, dev.state(), dp, nullptr, max_batch, kv.data(),
                              kv.data(), nullptr, false) == cudaSuccess);
    device_buffer<unsigned char> temp(bytes);
    int failed = 0;
    for (int trial = 0; trial < 120; ++trial) {
      // Mostly failing batches of every length, some that succeed (a permutation of 0..3).
      std::vector<std::int32_t> batch;
      if (trial % 6 == 5) {
        batch = {0, 1, 2, 3};
        std::shuffle(batch.begin(), batch.end(), rng);
      } else {
        batch.resize(1 + rng() % max_batch);
        for (auto& x : batch) x = pool[rng() % pool.size()];
      }
      const int B = int(batch.size());
      INFO("H " << H << " trial " << trial << ", batch of " << B);
      const auto expect =
          dms::step::append_batch(img.state(), dp, std::span<const std::int32_t>(batch),
                                  h_kv.data(), h_kv.data(), nullptr, false);
      failed += expect != dms::step_status::ok;
      auto d_batch = to_device(batch);
      REQUIRE(dms::cuda::append(temp.data(), bytes, dev.state(), dp, d_batch.data(), B, kv.data(),
                                kv.data(), nullptr, false) == cudaSuccess);
      REQUIRE(dev.status() == expect);
      REQUIRE(dms_test::first_difference(dev.download(), img) == "");
      dev.clear_status();
      img.status = 0;
    }
    CHECK(failed > 60);
  }
}

TEST_CASE("gpu decode step: a failed step writes out = 0, lse = -inf, reads and folds nothing",
          "[gpu][decode][errors][sanitize]") {
  // 2 KV heads x G = 2, pages of 4 slots, 5 pages. Sequence 0 holds 3 tokens (its next token fits
  // its pages), sequence 1 holds 4 (its next token needs 2 fresh pages, 1 is free), 2 is empty.
  const auto cfg = step_config(2, 2, 64, 4, 5);
  using policy = dms::tova_policy;  // a score fold, so "folds nothing" is checked too
  const policy pol(dms::tova_params{64});
  std::mt19937 rng(51);
  const int H = cfg.num_kv_heads, Hq = cfg.num_query_heads(), d = cfg.head_dim;
  dms::paged_cache<float, policy> host(cfg, pol);
  for (int s = 0; s < 3; ++s) host.add_sequence();
  for (int s = 0; s < 2; ++s)
    for (int t = 0; t < 3 + s; ++t) {
      const auto k = random_vector(rng, std::size_t(H) * d), v = random_vector(rng, k.size());
      host.append(s, k, v);
    }
  // Scores that a fold would change: the host's are 0 after append.
  auto img0 = host.to_image();
  for (auto& x : img0.score) x = 0.5f;
  host.load_image(img0);
  dms::cuda::device_cache<float, policy> dev(host);
  dms::cuda::decoder<float, policy> decoder(dev, 3);

  device_buffer<float> d_k(std::size_t(3) * H * d), d_v(d_k.size()), d_q(std::size_t(3) * Hq * d),
      d_out(d_q.size()), d_lse(std::size_t(3) * Hq);
  device_buffer<std::int64_t> d_reads(1);
  d_k.upload(random_vector(rng, d_k.size()), nullptr);
  d_v.upload(random_vector(rng, d_v.size()), nullptr);
  const auto q = random_vector(rng, d_q.size(), 0.5f);
  d_q.upload(q, nullptr);

  const auto run = [&](const std::vector<std::int32_t>& batch) {
    auto d_batch = to_device(batch);
    // Garbage (NaN bytes) where the outputs go: a defined output overwrites all of it.
    check(cudaMemset(d_out.data(), 0xff, d_out.size() * sizeof(float)), "cudaMemset");
    check(cudaMemset(d_lse.data(), 0xff, d_lse.size() * sizeof(float)), "cudaMemset");
    check(cudaMemset(d_reads.data(), 0, sizeof(std::int64_t)), "cudaMemset");
    dms::cuda::decode_step_inputs<float, float> in;
    in.seq_ids = d_batch.data();
    in.batch = int(batch.size());
    in.k = d_k.data();
    in.v = d_v.data();
    in.q = d_q.data();
    dms::cuda::decode_step_outputs<float> out;
    out.out = d_out.data();
    out.lse = d_lse.data();
    out.kv_reads = d_reads.data();
    decoder.step(in, out);
    std::vector<float> o, l;
    std::vector<std::int64_t> reads;
    d_out.download(o, nullptr);
    d_lse.download(l, nullptr);
    d_reads.download(reads, nullptr);
    const std::size_t n = batch.size();
    o.resize(n * Hq * d);
    l.resize(n * Hq);
    return std::make_tuple(o, l, reads[0]);
  };
  const auto expect_skipped = [&](const std::vector<std::int32_t>& batch, dms::step_status why) {
    const auto before = dev.download();
    const auto [o, l, reads] = run(batch);
    CHECK(dev.status() == why);
    CHECK(std::all_of(o.begin(), o.end(), [](float x) { return x == 0.0f; }));
    CHECK(std::all_of(l.begin(), l.end(), [](float x) { return std::isinf(x) && x < 0.0f; }));
    CHECK(reads == 0);
    auto after = dev.download();
    after.status = before.status;
    CHECK(dms_test::first_difference(before, after) == "");  // scores included
  };

  SECTION("pool exhausted") {
    expect_skipped({0, 1}, dms::step_status::pool_exhausted);
  }
  SECTION("bad sequence id") {
    expect_skipped({0, 9}, dms::step_status::bad_sequence);
  }
  SECTION("duplicate sequence id") {
    expect_skipped({0, 2, 0}, dms::step_status::duplicate_sequence);
  }
  SECTION("after a failed step, a step that would fit is skipped too, until cleared") {
    expect_skipped({1, 0}, dms::step_status::pool_exhausted);
    expect_skipped({0}, dms::step_status::pool_exhausted);  // sticky
    CHECK_THROWS_WITH(dev.check_status(), Catch::Contains("page pool exhausted"));
    dev.clear_status();
    // Now the same step runs, and equals the reference.
    const auto [o, l, reads] = run({0});
    CHECK(dev.status() == dms::step_status::ok);
    std::vector<float> k, v;
    d_k.download(k, nullptr);
    d_v.download(v, nullptr);
    std::vector<float> ref(std::size_t(Hq) * d), ref_lse(static_cast<std::size_t>(Hq));
    dms::reference::decode_extras extras;
    extras.lse = ref_lse;
    dms::reference::decode_step(host, 0, std::span<const float>(q).first(ref.size()),
                                std::span<const float>(k).first(std::size_t(H) * d),
                                std::span<const float>(v).first(std::size_t(H) * d), {}, ref,
                                extras);
    for (std::size_t i = 0; i < ref.size(); ++i) REQUIRE(o[i] == Approx(ref[i]).margin(1e-4));
    for (std::size_t i = 0; i < ref_lse.size(); ++i)
      REQUIRE(l[i] == Approx(ref_lse[i]).epsilon(1e-4));
    CHECK(reads == 2 * 4);  // 2 rows of 4 live slots
  }
}

TEST_CASE("gpu decode step captured in a CUDA graph from the very first step replays exactly",
          "[gpu][graph]") {
  const auto cfg = step_config(2, 4, 128, 16, 1024);
  using policy = dms::dms_policy;
  const policy pol(dms::dms_params{8});
  std::mt19937 rng(21);
  std::uniform_real_distribution<float> logit(-1.0f, 0.4f);
  const int H = cfg.num_kv_heads, Hq = cfg.num_query_heads(), d = cfg.head_dim, B = 3;

  dms::cuda::device_cache<dms::bfloat16, policy> eager(cfg, pol), graphed(cfg, pol);
  for (int s = 0; s < B; ++s) {
    (void)eager.add_sequence();
    (void)graphed.add_sequence();
  }
  const std::vector<std::int32_t> seqs{0, 1, 2};
  auto d_seqs = to_device(seqs);
  device_buffer<float> d_k(std::size_t(B) * H * d), d_v(d_k.size()), d_q(std::size_t(B) * Hq * d),
      d_logits(std::size_t(B) * H), d_out_eager(d_q.size()), d_out_graph(d_q.size());
  dms::cuda::decode_step_inputs<float, float> in;
  in.seq_ids = d_seqs.data();
  in.batch = B;
  in.k = d_k.data();
  in.v = d_v.data();
  in.decision_logits = d_logits.data();
  in.q = d_q.data();
  dms::cuda::decode_step_outputs<float> out_eager, out_graph;
  out_eager.out = d_out_eager.data();
  out_graph.out = d_out_graph.data();

  cudaStream_t stream;
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  // The eager decoder grows its storage on its first step; the graphed one reserves it up front,
  // so that its very first step, the one captured, allocates nothing.
  dms::cuda::decoder<dms::bfloat16, policy> eager_decoder(eager);
  dms::cuda::decoder<dms::bfloat16, policy> graph_decoder(graphed);
  graph_decoder.reserve(B, 0, stream);
  const std::size_t reserved = graph_decoder.reserved_bytes();
  REQUIRE(reserved > 0);

  cudaGraph_t graph;
  cudaGraphExec_t exec;
  check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "BeginCapture");
  graph_decoder.step(in, out_graph, stream);
  check(cudaStreamEndCapture(stream, &graph), "EndCapture");
  check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
  CHECK(graph_decoder.reserved_bytes() == reserved);

  for (int step = 0; step < 200; ++step) {
    // New inputs each step: host-to-device copies into the buffers the graph reads.
    d_k.upload(random_vector(rng, d_k.size()), stream);
    d_v.upload(random_vector(rng, d_v.size()), stream);
    d_q.upload(random_vector(rng, d_q.size(), 0.5f), stream);
    std::vector<float> lg(d_logits.size());
    for (auto& x : lg) x = logit(rng);
    d_logits.upload(lg, stream);
    eager_decoder.step(in, out_eager, stream);
    check(cudaGraphLaunch(exec, stream), "cudaGraphLaunch");
    if (step % 50 == 49 || step == 0) {
      std::vector<float> a, b;
      d_out_eager.download(a, stream);
      d_out_graph.download(b, stream);
      REQUIRE(a == b);
      REQUIRE(dms_test::first_difference(eager.download(stream), graphed.download(stream)) == "");
    }
  }
  CHECK(graphed.status(stream) == dms::step_status::ok);
  CHECK(eager_decoder.reserved_bytes() == reserved);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

TEST_CASE("gpu decoder: a step under capture that would allocate throws, and reserve validates",
          "[gpu][graph][errors]") {
  const auto cfg = step_config(2, 4, 64, 16, 256);
  dms::cuda::device_cache<float, dms::dense_policy> cache(cfg);
  for (int s = 0; s < 4; ++s) (void)cache.add_sequence();
  dms::cuda::decoder<float, dms::dense_policy> decoder(cache);
  CHECK_THROWS_WITH(decoder.reserve(0),
                    Catch::Contains("max_batch = 0") && Catch::Contains("[1, 6]"));
  CHECK_THROWS_WITH(decoder.reserve(7), Catch::Contains("max_batch = 7"));
  CHECK(decoder.reserved_bytes() == 0);

  const std::vector<std::int32_t> seqs{0, 1, 2, 3};
  auto d_seqs = to_device(seqs);
  device_buffer<float> kv(std::size_t(4) * 2 * 64), q(std::size_t(4) * 8 * 64), o(q.size());
  check(cudaMemset(kv.data(), 0, kv.size() * sizeof(float)), "cudaMemset");
  check(cudaMemset(q.data(), 0, q.size() * sizeof(float)), "cudaMemset");
  dms::cuda::decode_step_inputs<float, float> in;
  in.seq_ids = d_seqs.data();
  in.batch = 4;
  in.k = kv.data();
  in.v = kv.data();
  in.q = q.data();
  dms::cuda::decode_step_outputs<float> out;
  out.out = o.data();

  cudaStream_t stream;
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  decoder.reserve(2, 0, stream);  // too small for a batch of 4
  cudaGraph_t graph = nullptr;
  check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "BeginCapture");
  CHECK_THROWS_WITH(decoder.step(in, out, stream),
                    Catch::Contains("reserve(max_batch)") && Catch::Contains("batch = 4"));
  // Nothing illegal reached the stream: the capture ends cleanly, with nothing in it.
  REQUIRE(cudaStreamEndCapture(stream, &graph) == cudaSuccess);
  std::size_t nodes = 1;
  check(cudaGraphGetNodes(graph, nullptr, &nodes), "cudaGraphGetNodes");
  CHECK(nodes == 0);
  cudaGraphDestroy(graph);
  // Eagerly it grows, and then a capture of the same step works.
  decoder.step(in, out, stream);
  CHECK(cache.status(stream) == dms::step_status::ok);
  check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "BeginCapture");
  decoder.step(in, out, stream);
  REQUIRE(cudaStreamEndCapture(stream, &graph) == cudaSuccess);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}
