// SPDX-License-Identifier: Apache-2.0
#pragma once

// The MQAR evaluation through the library: every sequence of the evaluation set is prefilled
// (BOS + context, in chunks) and then decoded one token per step, the query block fed token by
// token (teacher forcing: each query key is fed, the model's greedy answer is scored, then the
// true value is fed, so one wrong answer does not derail the next query). Attention runs over one
// dms::paged_cache per layer under a policy chosen at run time.
//
// The heavy templates (7 policies x 3 storage types) are instantiated once, one storage type
// per file: runner_f32.cpp, runner_bf16.cpp, runner_f16.cpp (engine.hpp).

#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "dms/policy/snapkv.hpp"
#include "dms/policy/tova.hpp"
#include "eval_set.hpp"
#include "model.hpp"

namespace mqar {

enum class policy_kind { dense, dms, tova, h2o, quest, streaming_llm, snapkv };
inline constexpr policy_kind all_policies[] = {
    policy_kind::dense, policy_kind::dms,           policy_kind::tova,  policy_kind::h2o,
    policy_kind::quest, policy_kind::streaming_llm, policy_kind::snapkv};

const char* policy_label(policy_kind k);
/// "dense", "dms", "tova", "h2o", "quest", "streaming" (or "streaming_llm"), "snapkv".
policy_kind parse_policy(std::string_view name);

/// A policy and its parameters. Budgets are per row (one sequence, one KV head, one layer).
struct policy_options {
  policy_kind kind = policy_kind::dense;
  int budget = 68;      // TOVA/H2O/StreamingLLM/SnapKV: tokens kept; Quest: tokens read per step
  int dms_window = -1;  // DMS: -1 = the checkpoint's trained window (16 for a dense checkpoint)
  dms::tova_ranking tova_ranking = dms::tova_ranking::per_kv_head;
  int h2o_recent = -1;         // -1 = budget / 2
  int quest_dense_layers = 0;  // layers [0, n) read densely (the model has only 2 layers)
  int sinks = 4;               // StreamingLLM: sinks + (budget - sinks) recent
  int snapkv_window = 16;      // observation window, at most the budget
  int snapkv_kernel = 7;
  dms::snapkv_pooling snapkv_pooling = dms::snapkv_pooling::max;
};

enum class kv_storage { f32, bf16, f16 };
const char* storage_label(kv_storage s);
kv_storage parse_storage(std::string_view name);

/// Which attention implementation reads the caches: dms::cpu (SIMD, threaded) or the
/// dms::reference oracle.
enum class attention_backend { fast, reference };

struct run_options {
  kv_storage storage = kv_storage::f32;
  attention_backend backend = attention_backend::fast;
  int threads = 0;     // fast path: 0 = the default pool (DMS_CPU_THREADS or every core)
  int first = 0;       // sequences [first, first + count) of the evaluation set
  int count = -1;      // -1 = to the end
  int batch = 16;      // sequences held (and decoded) concurrently
  int chunk = 128;     // prefill chunk length
  int page_size = 16;  // cache page size
  int max_pages = 0;   // pages per layer; 0 = enough for `batch` dense sequences
};

struct run_result {
  std::string policy;
  int sequences = 0;
  int answers = 0;
  int correct = 0;
  /// 1 / mean over (sequence, layer, KV head) rows of live slots / tokens seen, each row taken
  /// at the end of its sequence: the spec's compression ratio, over the whole evaluation.
  double memory_cr = 1.0;
  double mean_peak_slots = 0;   // mean over rows of the row's peak live slots
  double mean_final_slots = 0;  // mean over rows of live slots at the sequence's end
  std::int64_t kv_reads = 0;    // slots read by decode attention, summed over layers and steps
  std::int64_t prompt_tokens = 0;
  std::int64_t decode_tokens = 0;
  double seconds = 0;  // wall time of prefill + decode

  [[nodiscard]] double accuracy() const { return answers ? double(correct) / answers : 0.0; }
  /// Binomial standard error of the accuracy.
  [[nodiscard]] double standard_error() const {
    const double p = accuracy();
    return answers ? std::sqrt(p * (1 - p) / answers) : 0.0;
  }
  [[nodiscard]] double tokens_per_second() const {
    return seconds > 0 ? double(prompt_tokens + decode_tokens) / seconds : 0.0;
  }
};

/// Runs the evaluation set (or its slice) through the model under one policy.
run_result evaluate(const model_weights& m, const eval_set& e, const policy_options& p,
                    const run_options& o);

/// Logits [length][vocab] of one token sequence under a policy: the first `prompt_length` tokens
/// prefilled in chunks, the rest decoded one at a time (what the parity test compares).
std::vector<float> sequence_logits(const model_weights& m, const std::vector<int>& tokens,
                                   int prompt_length, const policy_options& p,
                                   const run_options& o);

/// The per-row budget that gives a training-free policy the memory compression `ratio` on
/// sequences of `tokens_seen` tokens of which `decode_tokens` are decoded: a row ends at its
/// budget (SnapKV: at its capacity plus every decoded token).
int budget_for_ratio(policy_kind k, double ratio, int tokens_seen, int decode_tokens);

}  // namespace mqar
