// SPDX-License-Identifier: Apache-2.0
//
// dms_demo: the library's main job on the CPU. One synthetic, seeded decode workload runs
// through every policy (dense, DMS, TOVA, H2O, Quest, StreamingLLM, SnapKV) at the same target
// compression ratio, and the program prints one comparison table.
//
//   dms_demo [--ratio N] [--steps N] [--seed N]
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
#include <utility>
#include <vector>

#include "dms/dms.hpp"

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

std::vector<result> run_all_cpu(const workload& w) {
  const std::size_t qn = std::size_t(w.cfg.num_query_heads()) * w.cfg.head_dim;
  const int B = w.budget;
  std::vector<result> results;
  std::vector<float> dense_out, out;

  results.push_back(run_cpu(w, dms::dense_policy{}, dense_out));
  const auto add = [&](result r) {
    r.error = relative_error(out, dense_out, qn);
    results.push_back(r);
  };
  add(run_cpu(w, dms::dms_policy{{.window = dms_window}}, out));
  add(run_cpu(w, dms::tova_policy{{.budget = B}}, out));
  add(run_cpu(w, dms::h2o_policy{{.budget = B, .recent = B / 2}}, out));
  add(run_cpu(w, dms::quest_policy{{.token_budget = B, .layer = 2}}, out));
  add(run_cpu(w, dms::streaming_llm_policy{{.sinks = num_sinks, .recent = B - num_sinks}}, out));
  add(run_cpu(w, dms::snapkv_policy{{.capacity = B, .window = std::min(32, B)}}, out));
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

/// Where the attention runs. Only the CPU reference exists; the CUDA kernels (dms/cuda/) will add
/// a backend here that runs the same workload, so the table and the error metric stay comparable.
enum class backend { cpu_reference };

const char* backend_name(backend b) {
  switch (b) {
    case backend::cpu_reference:
      return "CPU reference path";
  }
  return "unknown";
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
  const backend where = backend::cpu_reference;
  std::printf("dms %d.%d.%d: %s\n", DMS_VERSION_MAJOR, DMS_VERSION_MINOR, DMS_VERSION_PATCH,
              backend_name(where));
  try {
    const workload w = make_workload(opt);
    std::vector<result> results;
    switch (where) {
      case backend::cpu_reference:
        results = run_all_cpu(w);
        break;
    }
    print_table(w, opt, results);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dms_demo: %s\n", e.what());
    return 1;
  }
  return 0;
}
