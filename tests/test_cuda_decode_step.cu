// SPDX-License-Identifier: Apache-2.0
// GPU: the bookkeeping kernels against the serial step algorithm (exact image equality; the CPU
// tests tie that algorithm to paged_cache), whole decode steps of every policy against the CPU
// reference path step by step, and a decode step captured in a CUDA graph and replayed.
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

TEST_CASE("gpu decode step captured in a CUDA graph replays exactly", "[gpu][graph]") {
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
  std::size_t bytes = 0;
  REQUIRE(dms::cuda::decode_step(nullptr, bytes, graphed.state(), graphed.device_policy(), in,
                                 out_graph, stream) == cudaSuccess);
  device_buffer<unsigned char> temp_eager(bytes), temp_graph(bytes);

  cudaGraph_t graph;
  cudaGraphExec_t exec;
  check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "BeginCapture");
  REQUIRE(dms::cuda::decode_step(temp_graph.data(), bytes, graphed.state(), graphed.device_policy(),
                                 in, out_graph, stream) == cudaSuccess);
  check(cudaStreamEndCapture(stream, &graph), "EndCapture");
  check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");

  for (int step = 0; step < 200; ++step) {
    // New inputs each step: host-to-device copies into the buffers the graph reads.
    d_k.upload(random_vector(rng, d_k.size()), stream);
    d_v.upload(random_vector(rng, d_v.size()), stream);
    d_q.upload(random_vector(rng, d_q.size(), 0.5f), stream);
    std::vector<float> lg(d_logits.size());
    for (auto& x : lg) x = logit(rng);
    d_logits.upload(lg, stream);
    check(dms::cuda::decode_step(temp_eager.data(), bytes, eager.state(), eager.device_policy(), in,
                                 out_eager, stream),
          "decode_step");
    check(cudaGraphLaunch(exec, stream), "cudaGraphLaunch");
    if (step % 50 == 49) {
      std::vector<float> a, b;
      d_out_eager.download(a, stream);
      d_out_graph.download(b, stream);
      REQUIRE(a == b);
      REQUIRE(dms_test::first_difference(eager.download(stream), graphed.download(stream)) == "");
    }
  }
  CHECK(graphed.status(stream) == dms::step_status::ok);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}
