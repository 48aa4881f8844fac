// SPDX-License-Identifier: Apache-2.0
//
// dms_synthetic: the policies on synthetic K/V. One synthetic, seeded decode workload runs
// through every policy (dense, DMS, TOVA, H2O, Quest, StreamingLLM, SnapKV) at the same target
// compression ratio, and the program prints one comparison table.
//
//   dms_synthetic [--ratio N] [--steps N] [--seed N]
//
// Built with CUDA (nvcc compiles this file; see examples/CMakeLists.txt) and run on a machine
// with a GPU, it then runs every policy's decode steps again on the device with
// dms::cuda::decode_step (prefill stays on the CPU reference) and prints a second table that
// checks them against the CPU run: the same compression and KV reads (so the same evictions and
// page selections) and the largest output difference.
//
// The workload. Every number comes from one std::mt19937 seed and is generated once, so every
// policy sees exactly the same queries, keys, values and decision logits.
//  * One attention layer: 4 KV heads, G = 4 query heads per KV head (16 query heads), head_dim 64,
//    K/V stored as bf16, pages of 16 tokens.
//  * A batch of 3 sequences with prompts of 128, 192 and 256 tokens, prefilled with
//    dms::reference::prefill (chunks of 128), then --steps decode steps each (default 512, so the
//    whole demo takes a few seconds in Release and stays under a minute under ASan), run as a
//    batch, one token per sequence per step, with dms::reference::decode_step.
//  * Per token and KV head, a hidden importance z ~ Exponential(1); the first 4 tokens are
//    attention sinks with a large z. key = z * u + 2 * (slowly drifting topic vector) + noise, u
//    a fixed direction per KV head; query = 10.4 * u + 3 * topic + noise. So attention favours
//    important tokens and the sinks (heavy hitters), mildly favours recent tokens (their topic is
//    still close to the query's), and carries query-dependent noise. Values are Gaussian noise.
//  * DMS decision logits come from the same importance: the logit carried by token t judges token
//    t-1 (the DMS shift rule) and is positive, i.e. evict, when a noisy copy of z[t-1] falls below
//    a threshold. The threshold is calibrated on the generated data (a quantile) so that DMS ends
//    near the target ratio, given its window. Like the released checkpoints, the logit travels in
//    the last channel of the first query head of each group and is read back with
//    dms::take_decision_logits, which also zeroes that channel. Nothing here is learned.
//  * DMS window 64: the released Qwen3-8B-DMS-8x uses 512, scaled down here because the demo's
//    sequences are 640-768 tokens (with the default --steps), not tens of thousands.
//  * Training-free budgets: B tokens per row, chosen so that a policy that holds exactly B slots
//    per row at the end reaches the target ratio (B = 1 / (ratio * mean over sequences of
//    1/length)). TOVA: budget B. H2O: B with recent = B/2. StreamingLLM: 4 sinks + B-4 recent.
//    SnapKV: capacity B (it compresses the prompt only; decode tokens are all kept). Quest: token
//    budget B at layer index 2 (layers 0 and 1 stay dense in the official setup); Quest keeps
//    every token and saves reads, not memory.
//
// The metrics, per policy: tokens seen, peak and mean live slots (summed over the 12 rows of
// 3 sequences x 4 KV heads; the mean is over decode steps), the cache's compression ratio
// (cache.stats()), KV-cache token reads during decode and the read ratio against dense, the
// relative L2 error of each step's attention output against the dense policy's output for the
// same inputs (mean over decode steps and sequences), and wall time of prefill + decode.

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "dms/dms.hpp"

#if defined(__CUDACC__)
#include <cuda_runtime_api.h>

#include "dms/cuda/decode_step.cuh"
#include "dms/cuda/device_buffer.cuh"
#include "dms/cuda/device_cache.cuh"
#endif

namespace {

// ---- the workload ------------------------------------------------------------------------

constexpr int kv_heads = 4;
constexpr int group_size = 4;
constexpr int head_dim = 64;
constexpr int page_size = 16;
constexpr int num_sinks = 4;
constexpr int dms_window = 64;
constexpr int prefill_chunk = 128;
constexpr std::array<int, 3> prompt_lengths{128, 192, 256};

// Shape of the synthetic attention pattern (see the comment at the top).
constexpr float key_importance_gain = 1.0f;  // key = gain * z * u + ...
constexpr float query_direction = 10.4f;     // query = 10.4 * u + ...: logit ~ 1.3 * z
constexpr float key_topic = 2.0f, query_topic = 3.0f;
constexpr float topic_keep = 0.97f;  // topic(t) = 0.97 topic(t-1) + drift, renormalized
constexpr float key_noise = 0.5f, query_noise = 1.0f;
constexpr float sink_importance = 7.0f;
constexpr float decision_noise = 0.5f;       // DMS judges a noisy copy of z
constexpr float decision_sharpness = 10.0f;  // logit = 10 * (threshold - noisy z)

struct options {
  double ratio = 8.0;
  int steps = 512;
  std::uint32_t seed = 1;
};

struct sequence_data {
  int prompt = 0;
  int length = 0;             // prompt + decode steps
  std::vector<float> q;       // [length][num_query_heads][head_dim], decision channels zeroed
  std::vector<float> k, v;    // [length][kv_heads][head_dim]
  std::vector<float> logits;  // [length][kv_heads] DMS decision logits
};

struct workload {
  dms::cache_config cfg;
  std::vector<sequence_data> seqs;
  int steps = 0;
  int budget = 0;              // tokens per row for the training-free policies
  double keep_fraction = 1.0;  // fraction of tokens DMS keeps past its window
};

std::vector<float> random_unit(std::mt19937& rng, int n) {
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  std::vector<float> x(n);
  float norm = 0.0f;
  for (float& e : x) {
    e = gauss(rng);
    norm += e * e;
  }
  for (float& e : x) e /= std::sqrt(norm);
  return x;
}

workload make_workload(const options& opt) {
  workload w;
  w.steps = opt.steps;
  const int S = int(prompt_lengths.size());
  int longest = 0;
  for (int p : prompt_lengths) longest = std::max(longest, p + opt.steps);
  w.cfg.num_kv_heads = kv_heads;
  w.cfg.group_size = group_size;
  w.cfg.head_dim = head_dim;
  w.cfg.page_size = page_size;
  w.cfg.max_sequences = S;
  w.cfg.max_row_slots = longest;
  w.cfg.max_pages = S * kv_heads * ((longest + page_size - 1) / page_size);  // enough for dense

  std::mt19937 rng(opt.seed);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  std::exponential_distribution<float> exponential(1.0f);
  std::vector<std::vector<float>> u;  // [kv_heads] importance direction
  for (int h = 0; h < kv_heads; ++h) u.push_back(random_unit(rng, head_dim));

  const int H = w.cfg.num_query_heads();
  std::vector<std::vector<float>> noisy_z(S);  // [seq][t * kv_heads + h]: what DMS judges
  for (int s = 0; s < S; ++s) {
    sequence_data& sd = w.seqs.emplace_back();
    sd.prompt = prompt_lengths[s];
    sd.length = sd.prompt + opt.steps;
    const int L = sd.length;
    sd.q.resize(std::size_t(L) * H * head_dim);
    sd.k.resize(std::size_t(L) * kv_heads * head_dim);
    sd.v.resize(sd.k.size());
    sd.logits.resize(std::size_t(L) * kv_heads);
    noisy_z[s].resize(std::size_t(L) * kv_heads);
    std::vector<std::vector<float>> topic;
    for (int h = 0; h < kv_heads; ++h) topic.push_back(random_unit(rng, head_dim));
    for (int t = 0; t < L; ++t) {
      for (int h = 0; h < kv_heads; ++h) {
        std::vector<float>& tp = topic[h];
        float norm = 0.0f;
        for (float& e : tp) {
          e = topic_keep * e + 0.25f / std::sqrt(float(head_dim)) * gauss(rng);
          norm += e * e;
        }
        for (float& e : tp) e /= std::sqrt(norm);
        const float z = t < num_sinks ? sink_importance : exponential(rng);
        noisy_z[s][std::size_t(t) * kv_heads + h] = z + decision_noise * gauss(rng);
        float* key = &sd.k[(std::size_t(t) * kv_heads + h) * head_dim];
        float* value = &sd.v[(std::size_t(t) * kv_heads + h) * head_dim];
        for (int c = 0; c < head_dim; ++c) {
          key[c] = key_importance_gain * z * u[h][c] + key_topic * tp[c] + key_noise * gauss(rng);
          value[c] = gauss(rng);
        }
        for (int g = 0; g < group_size; ++g) {
          float* query = &sd.q[((std::size_t(t) * H) + h * group_size + g) * head_dim];
          for (int c = 0; c < head_dim; ++c)
            query[c] = query_direction * u[h][c] + query_topic * tp[c] + query_noise * gauss(rng);
        }
      }
    }
  }

  // Budgets. A row holding B slots out of L tokens has ratio L / B; the cache reports
  // 1 / mean(B / L), so B = 1 / (ratio * mean(1 / L)).
  double mean_inv_length = 0.0;
  for (const auto& sd : w.seqs) mean_inv_length += 1.0 / sd.length / S;
  w.budget = std::max(num_sinks + 1, int(std::lround(1.0 / (opt.ratio * mean_inv_length))));

  // DMS calibration. A row ends with its last w+1 tokens plus the kept fraction p of the older
  // ones, so 1/ratio = mean(a + p (1 - a)) with a = (w+1)/L: solve for p, then put the threshold
  // at the matching quantile of the noisy importances of the tokens that end up outside the window.
  double mean_a = 0.0;
  for (const auto& sd : w.seqs) mean_a += double(dms_window + 1) / sd.length / S;
  w.keep_fraction = std::clamp((1.0 / opt.ratio - mean_a) / (1.0 - mean_a), 0.0, 1.0);
  std::vector<float> judged;
  for (int s = 0; s < S; ++s)
    for (int t = 0; t < w.seqs[s].length - (dms_window + 1); ++t)
      for (int h = 0; h < kv_heads; ++h)
        judged.push_back(noisy_z[s][std::size_t(t) * kv_heads + h]);
  std::sort(judged.begin(), judged.end(), std::greater<>());
  const auto kept = std::size_t(std::lround(w.keep_fraction * double(judged.size())));
  float threshold;  // keep iff noisy z >= threshold
  if (judged.empty() || kept >= judged.size())
    threshold = -std::numeric_limits<float>::infinity();
  else if (kept == 0)
    threshold = judged.front() + 1.0f;
  else
    threshold = judged[kept - 1];

  // Logit of token t (about token t-1), written into the decision channel of q the way a DMS
  // checkpoint carries it (l = 100 * q[d-1] - 5), then read back and zeroed by the library.
  const dms::decision_readout readout{};
  for (int s = 0; s < S; ++s) {
    sequence_data& sd = w.seqs[s];
    for (int t = 0; t < sd.length; ++t) {
      for (int h = 0; h < kv_heads; ++h) {
        float logit = -readout.offset;  // the first token's logit applies to nothing
        if (t > 0 && std::isfinite(threshold))
          logit = std::clamp(
              decision_sharpness * (threshold - noisy_z[s][std::size_t(t - 1) * kv_heads + h]),
              -20.0f, 20.0f);
        sd.q[((std::size_t(t) * H) + h * group_size) * head_dim + head_dim - 1] =
            (logit + readout.offset) / readout.scale;
      }
    }
    dms::take_decision_logits(std::span<float>(sd.q), std::span<float>(sd.logits), w.cfg, readout);
  }
  return w;
}

// ---- running one policy --------------------------------------------------------------------

struct result {
  std::string name;
  std::int64_t tokens_seen = 0;
  std::int64_t peak_slots = 0;
  double mean_slots = 0.0;
  double compression_ratio = 1.0;
  std::int64_t kv_reads = 0;
  double error = 0.0;  // filled in against dense
  double wall_ms = 0.0;
};

/// Runs the whole workload through a fresh cache with `policy` on the CPU reference path.
/// `outputs` receives every decode step's attention output: [step][sequence][H * head_dim].
template <class Policy>
result run_cpu(const workload& w, Policy policy, std::vector<float>& outputs) {
  using clock = std::chrono::steady_clock;
  const dms::cache_config& cfg = w.cfg;
  const int S = int(w.seqs.size());
  const std::size_t qn = std::size_t(cfg.num_query_heads()) * cfg.head_dim;
  const std::size_t kn = std::size_t(cfg.num_kv_heads) * cfg.head_dim;
  const std::size_t ln = std::size_t(cfg.num_kv_heads);
  // Only DMS takes decision logits; the cache rejects them for every other policy.
  const auto logits_of = [&](const sequence_data& sd, std::size_t first, std::size_t count) {
    return Policy::uses_decision_logits
               ? std::span<const float>(sd.logits).subspan(first * ln, count * ln)
               : std::span<const float>{};
  };

  dms::paged_cache<dms::bfloat16, Policy> cache(cfg, std::move(policy));
  outputs.assign(std::size_t(w.steps) * S * qn, 0.0f);
  std::vector<int> ids;
  std::vector<float> prompt_out;
  clock::duration elapsed{};

  for (const sequence_data& sd : w.seqs) {
    const auto P = std::size_t(sd.prompt);
    prompt_out.assign(P * qn, 0.0f);
    const auto t0 = clock::now();
    ids.push_back(cache.add_sequence());
    const dms::reference::prefill_chunk_inputs in{.q = std::span<const float>(sd.q).first(P * qn),
                                                  .k = std::span<const float>(sd.k).first(P * kn),
                                                  .v = std::span<const float>(sd.v).first(P * kn),
                                                  .decision_logits = logits_of(sd, 0, P),
                                                  .padding = 0};
    dms::reference::prefill_outputs o{.out = prompt_out, .lse = {}, .softmax_scale = 0.0f};
    dms::reference::prefill(cache, ids.back(), in, prefill_chunk, o);
    elapsed += clock::now() - t0;
  }

  double live_sum = 0.0;
  for (int step = 0; step < w.steps; ++step) {
    const auto t0 = clock::now();
    for (int s = 0; s < S; ++s) {
      const sequence_data& sd = w.seqs[s];
      const auto t = std::size_t(sd.prompt + step);
      dms::reference::decode_step(
          cache, ids[s], std::span<const float>(sd.q).subspan(t * qn, qn),
          std::span<const float>(sd.k).subspan(t * kn, kn),
          std::span<const float>(sd.v).subspan(t * kn, kn), logits_of(sd, t, 1),
          std::span<float>(outputs).subspan((std::size_t(step) * S + s) * qn, qn));
    }
    elapsed += clock::now() - t0;
    live_sum += double(cache.stats().live_slots);
  }

  const dms::cache_stats st = cache.stats();
  result r;
  r.name = cache.policy().name();
  r.tokens_seen = st.tokens_seen;
  r.peak_slots = st.peak_live_slots;
  r.mean_slots = live_sum / std::max(w.steps, 1);
  r.compression_ratio = st.compression_ratio;
  r.kv_reads = st.kv_token_reads;
  r.wall_ms = std::chrono::duration<double, std::milli>(elapsed).count();
  return r;
}

/// Mean over (step, sequence) of |out - dense| / |dense|, each vector [H * head_dim].
double relative_error(const std::vector<float>& out, const std::vector<float>& dense,
                      std::size_t qn) {
  const std::size_t n = dense.size() / qn;
  double sum = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    double diff = 0.0, ref = 0.0;
    for (std::size_t c = i * qn; c < (i + 1) * qn; ++c) {
      diff += double(out[c] - dense[c]) * (out[c] - dense[c]);
      ref += double(dense[c]) * dense[c];
    }
    sum += ref > 0.0 ? std::sqrt(diff / ref) : 0.0;
  }
  return n ? sum / double(n) : 0.0;
}

// ---- the GPU backend (compiled when this file is built by nvcc) ----------------------------

/// What the GPU run of a policy shows: the same decode steps on dms::cuda, checked against the
/// CPU run of the same policy.
struct gpu_result {
  std::string name;
  double compression_ratio = 1.0;
  std::int64_t kv_reads = 0;
  double max_error = 0.0;  // max over outputs of |gpu - cpu| / max |cpu|
  double decode_ms = 0.0;  // all decode steps, CUDA events
};

#if defined(__CUDACC__)
bool cuda_device_present() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

/// Prefills on the CPU reference path, so both tables start from the same cache (dms::cuda::prefill
/// scores prompts in fp32 in another order, and a near tie may keep another token), uploads it,
/// runs every decode step of the batch as one dms::cuda::decode_step: inputs uploaded once, outputs
/// downloaded once, no host synchronization in between.
template <class Policy>
gpu_result run_gpu(const workload& w, Policy policy, const std::vector<float>& cpu_outputs) {
  const dms::cache_config& cfg = w.cfg;
  const int S = int(w.seqs.size());
  const std::size_t qn = std::size_t(cfg.num_query_heads()) * cfg.head_dim;
  const std::size_t kn = std::size_t(cfg.num_kv_heads) * cfg.head_dim;
  const std::size_t ln = std::size_t(cfg.num_kv_heads);

  dms::paged_cache<dms::bfloat16, Policy> host(cfg, policy);
  std::vector<std::int32_t> ids;
  std::vector<float> prompt_out;
  for (const sequence_data& sd : w.seqs) {
    const auto P = std::size_t(sd.prompt);
    prompt_out.assign(P * qn, 0.0f);
    ids.push_back(host.add_sequence());
    const dms::reference::prefill_chunk_inputs in{
        .q = std::span<const float>(sd.q).first(P * qn),
        .k = std::span<const float>(sd.k).first(P * kn),
        .v = std::span<const float>(sd.v).first(P * kn),
        .decision_logits = Policy::uses_decision_logits
                               ? std::span<const float>(sd.logits).first(P * ln)
                               : std::span<const float>{},
        .padding = 0};
    dms::reference::prefill(host, ids.back(), in, prefill_chunk, {.out = prompt_out});
  }
  dms::cuda::device_cache<dms::bfloat16, Policy> dev(host);
  dms::cuda::decoder<dms::bfloat16, Policy> decoder(dev);

  // Step-major inputs: [step][sequence][...], uploaded once.
  std::vector<float> q, k, v, logits;
  for (int step = 0; step < w.steps; ++step)
    for (const sequence_data& sd : w.seqs) {
      const auto t = std::size_t(sd.prompt + step);
      q.insert(q.end(), sd.q.begin() + t * qn, sd.q.begin() + (t + 1) * qn);
      k.insert(k.end(), sd.k.begin() + t * kn, sd.k.begin() + (t + 1) * kn);
      v.insert(v.end(), sd.v.begin() + t * kn, sd.v.begin() + (t + 1) * kn);
      logits.insert(logits.end(), sd.logits.begin() + t * ln, sd.logits.begin() + (t + 1) * ln);
    }
  const auto upload = [](const auto& h) {
    dms::cuda::device_buffer<std::decay_t<decltype(h[0])>> d(h.size());
    d.upload(h, nullptr);
    return d;
  };
  auto d_ids = upload(ids);
  auto d_q = upload(q), d_k = upload(k), d_v = upload(v);
  auto d_logits = upload(logits);
  dms::cuda::device_buffer<float> d_out(q.size());
  dms::cuda::device_buffer<std::int64_t> d_reads(1);
  dms::cuda::check(cudaMemset(d_reads.data(), 0, sizeof(std::int64_t)), "cudaMemset");

  cudaEvent_t start, stop;
  dms::cuda::check(cudaEventCreate(&start), "cudaEventCreate");
  dms::cuda::check(cudaEventCreate(&stop), "cudaEventCreate");
  dms::cuda::check(cudaEventRecord(start), "cudaEventRecord");
  for (int step = 0; step < w.steps; ++step) {
    const auto at = std::size_t(step) * S;
    dms::cuda::decode_step_inputs<float, float> in;
    in.seq_ids = d_ids.data();
    in.batch = S;
    in.k = d_k.data() + at * kn;
    in.v = d_v.data() + at * kn;
    in.decision_logits = Policy::uses_decision_logits ? d_logits.data() + at * ln : nullptr;
    in.q = d_q.data() + at * qn;
    dms::cuda::decode_step_outputs<float> out;
    out.out = d_out.data() + at * qn;
    out.kv_reads = d_reads.data();
    decoder.step(in, out);
  }
  dms::cuda::check(cudaEventRecord(stop), "cudaEventRecord");
  dms::cuda::check(cudaEventSynchronize(stop), "cudaEventSynchronize");
  dev.check_status();

  gpu_result r;
  r.name = host.policy().name();
  float ms = 0.0f;
  dms::cuda::check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
  r.decode_ms = ms;
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::vector<float> got;
  d_out.download(got, nullptr);
  std::vector<std::int64_t> reads;
  d_reads.download(reads, nullptr);
  r.kv_reads = reads[0];
  float scale = 0.0f, err = 0.0f;
  for (std::size_t i = 0; i < got.size(); ++i) {
    scale = std::max(scale, std::fabs(cpu_outputs[i]));
    err = std::max(err, std::fabs(got[i] - cpu_outputs[i]));
  }
  r.max_error = scale > 0.0f ? double(err / scale) : double(err);
  dev.download_to(host);
  r.compression_ratio = host.stats().compression_ratio;
  return r;
}
#endif

/// Runs every policy on the CPU reference path and, with `gpu` (CUDA builds on a machine with a
/// GPU), again on the device, checked against the CPU outputs of the same policy.
std::vector<result> run_all(const workload& w, std::vector<gpu_result>* gpu) {
  const std::size_t qn = std::size_t(w.cfg.num_query_heads()) * w.cfg.head_dim;
  const int B = w.budget;
  std::vector<result> results;
  std::vector<float> dense_out, out;
  const auto run = [&](auto policy, bool is_dense) {
    result r = run_cpu(w, policy, is_dense ? dense_out : out);
    if (!is_dense) r.error = relative_error(out, dense_out, qn);
    results.push_back(r);
#if defined(__CUDACC__)
    if (gpu) gpu->push_back(run_gpu(w, policy, is_dense ? dense_out : out));
#else
    (void)gpu;
#endif
  };
  run(dms::dense_policy{}, true);
  run(dms::dms_policy{{.window = dms_window}}, false);
  run(dms::tova_policy{{.budget = B}}, false);
  run(dms::h2o_policy{{.budget = B, .recent = B / 2}}, false);
  run(dms::quest_policy{{.token_budget = B, .layer = 2}}, false);
  run(dms::streaming_llm_policy{{.sinks = num_sinks, .recent = B - num_sinks}}, false);
  run(dms::snapkv_policy{{.capacity = B, .window = std::min(32, B)}}, false);
  return results;
}

// ---- reporting -----------------------------------------------------------------------------

void print_table(const workload& w, const options& opt, const std::vector<result>& results) {
  const int S = int(w.seqs.size());
  std::printf("workload: %d sequences, prompts", S);
  for (int s = 0; s < S; ++s) std::printf("%s%d", s ? "/" : " ", w.seqs[s].prompt);
  std::printf(
      " tokens + %d decode steps each; %d KV heads x G=%d, head_dim %d, bf16 K/V, page %d\n",
      w.steps, w.cfg.num_kv_heads, w.cfg.group_size, w.cfg.head_dim, w.cfg.page_size);
  std::printf(
      "target ratio %gx (seed %u): training-free budget %d tokens/row; DMS window %d, "
      "keeps %.1f%% of tokens past the window\n",
      opt.ratio, opt.seed, w.budget, dms_window, 100.0 * w.keep_fraction);
  if (w.keep_fraction <= 0.0)
    std::printf(
        "note: DMS always holds the last %d tokens of a row, too many for %gx on sequences\n"
        "this short; it evicts everything older (sinks included) and still misses the\n"
        "target. Use more --steps or a lower --ratio.\n",
        dms_window + 1, opt.ratio);
  std::printf("\n");

  const std::int64_t dense_reads = results.front().kv_reads;
  std::printf("%-13s %11s %10s %10s %9s %11s %8s %9s %9s\n", "policy", "tokens seen", "peak slots",
              "mean slots", "memory CR", "KV reads", "read CR", "attn err", "wall ms");
  std::printf("%-13s %11s %10s %10s %9s %11s %8s %9s %9s\n", "-------------", "-----------",
              "----------", "----------", "---------", "-----------", "--------", "---------",
              "---------");
  for (const result& r : results)
    std::printf("%-13s %11lld %10lld %10.0f %8.2fx %11lld %7.2fx %9.4f %9.1f\n", r.name.c_str(),
                static_cast<long long>(r.tokens_seen), static_cast<long long>(r.peak_slots),
                r.mean_slots, r.compression_ratio, static_cast<long long>(r.kv_reads),
                r.kv_reads ? double(dense_reads) / double(r.kv_reads) : 0.0, r.error, r.wall_ms);

  std::printf(
      "\nTokens, slots, reads: sums over the %d rows (%d sequences x %d KV heads). attn err: mean\n"
      "relative L2 vs dense. Quest keeps all tokens and saves reads only; SnapKV compresses only\n"
      "the prompt; peak slots include prompts held whole in prefill. DMS decisions are synthetic,\n"
      "not a trained model's; errors depend on the synthetic attention: mechanics, not accuracy.\n",
      S * w.cfg.num_kv_heads, S, w.cfg.num_kv_heads);
}

void print_gpu_table(const std::vector<result>& cpu, const std::vector<gpu_result>& gpu) {
  std::printf(
      "\nThe same decode steps on the GPU (dms::cuda::decode_step; prefill on the CPU):\n\n");
  std::printf("%-13s %9s %11s %12s %13s %9s\n", "policy", "memory CR", "KV reads", "same as CPU",
              "max rel diff", "decode ms");
  std::printf("%-13s %9s %11s %12s %13s %9s\n", "-------------", "---------", "-----------",
              "------------", "-------------", "---------");
  for (std::size_t i = 0; i < gpu.size(); ++i) {
    const bool same = gpu[i].kv_reads == cpu[i].kv_reads &&
                      std::fabs(gpu[i].compression_ratio - cpu[i].compression_ratio) < 1e-9;
    std::printf("%-13s %8.2fx %11lld %12s %13.2e %9.2f\n", gpu[i].name.c_str(),
                gpu[i].compression_ratio, static_cast<long long>(gpu[i].kv_reads),
                same ? "yes" : "NO", gpu[i].max_error, gpu[i].decode_ms);
  }
  std::printf(
      "\nsame as CPU: identical compression ratio and KV reads (the same evictions and page\n"
      "selections). max rel diff: max |gpu - cpu| / max |cpu| over every decode output.\n");
}

// ---- command line --------------------------------------------------------------------------

void usage(std::FILE* to, const char* argv0) {
  const options defaults;
  std::fprintf(to,
               "usage: %s [--ratio N] [--steps N] [--seed N]\n"
               "  --ratio N   target compression ratio, 1..64 (default %g)\n"
               "  --steps N   decode steps per sequence, 1..100000 (default %d)\n"
               "  --seed N    seed of the synthetic workload (default %u)\n",
               argv0, defaults.ratio, defaults.steps, defaults.seed);
}

enum class parsed { run, help, error };

parsed parse(int argc, char** argv, options& opt) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") return parsed::help;
    if (i + 1 >= argc) {
      std::fprintf(stderr, "%s: %s needs a value\n", argv[0], arg.c_str());
      return parsed::error;
    }
    const char* val = argv[++i];
    char* end = nullptr;
    if (arg == "--ratio") {
      opt.ratio = std::strtod(val, &end);
      if (*end || !(opt.ratio >= 1.0 && opt.ratio <= 64.0)) {
        std::fprintf(stderr, "%s: --ratio %s is not a number in [1, 64]\n", argv[0], val);
        return parsed::error;
      }
    } else if (arg == "--steps") {
      const long n = std::strtol(val, &end, 10);
      if (*end || n < 1 || n > 100000) {
        std::fprintf(stderr, "%s: --steps %s is not an integer in [1, 100000]\n", argv[0], val);
        return parsed::error;
      }
      opt.steps = int(n);
    } else if (arg == "--seed") {
      const unsigned long n = std::strtoul(val, &end, 10);
      if (*end || n > 0xffffffffUL) {
        std::fprintf(stderr, "%s: --seed %s is not a 32-bit unsigned integer\n", argv[0], val);
        return parsed::error;
      }
      opt.seed = std::uint32_t(n);
    } else {
      std::fprintf(stderr, "%s: unknown option %s\n", argv[0], arg.c_str());
      return parsed::error;
    }
  }
  return parsed::run;
}

}  // namespace

int main(int argc, char** argv) {
  options opt;
  switch (parse(argc, argv, opt)) {
    case parsed::run:
      break;
    case parsed::help:
      usage(stdout, argv[0]);
      return 0;
    case parsed::error:
      usage(stderr, argv[0]);
      return 2;
  }
#if defined(__CUDACC__)
  const bool gpu = cuda_device_present();
  const char* where =
      gpu ? "CPU reference path, then the GPU" : "CPU reference path (no GPU found)";
#else
  const bool gpu = false;
  const char* where = "CPU reference path (built without CUDA)";
#endif
  std::printf("dms %d.%d.%d: %s\n", DMS_VERSION_MAJOR, DMS_VERSION_MINOR, DMS_VERSION_PATCH, where);
  try {
    const workload w = make_workload(opt);
    std::vector<gpu_result> gpu_results;
    const std::vector<result> results = run_all(w, gpu ? &gpu_results : nullptr);
    print_table(w, opt, results);
    if (gpu) print_gpu_table(results, gpu_results);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dms_synthetic: %s\n", e.what());
    return 1;
  }
  return 0;
}
