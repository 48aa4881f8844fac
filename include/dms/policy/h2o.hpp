// SPDX-License-Identifier: Apache-2.0
#pragma once

// H2O — Heavy-Hitter Oracle (spec: "H2O"). Each slot's score is the running sum of the attention
// probability its token has received, summed over the G query heads of the group (the official
// per-query-head bookkeeping breaks under GQA). The `recent` newest tokens are always kept; of
// the rest, the top budget - recent by score. Decode is one-in/one-out after attention; prefill
// accumulates the column sums of the causal probabilities and reduces once at finish_prompt.
// Ties: the oldest token goes first.

#include <cstdint>

#include "dms/cache_config.hpp"
#include "dms/config.hpp"
#include "dms/error.hpp"
#include "dms/policy/device_policy.hpp"
#include "dms/policy/policy.hpp"
#include "dms/policy/ranking.hpp"

DMS_NAMESPACE_BEGIN

struct h2o_params {
  int budget = 512;  // heavy + recent tokens kept per row
  int recent = 256;  // newest tokens always kept
};

/// Device form: accumulated scores, the `recent` newest tokens protected.
struct h2o_device_policy : device_policy_base {
  int keep;
  int recent;
  static constexpr bool evicts_by_score = true;
  static constexpr bool keeps_scores = true;
  static constexpr score_update decode_score = score_update::add;
  DMS_HOST_DEVICE int choose_victim(const row_context&, const token_info&) const { return -1; }
  DMS_HOST_DEVICE int budget() const { return keep; }
  DMS_HOST_DEVICE std::int32_t protected_from(std::int32_t seen) const { return seen - recent; }
  // Prompt: column sums of the causal probabilities, then down to the budget outside `recent`.
  static constexpr prompt_reduction reduces_prompt = prompt_reduction::by_score;
  DMS_HOST_DEVICE score_update prompt_score(std::int32_t, std::int32_t) const {
    return score_update::add;
  }
  DMS_HOST_DEVICE bool prompt_candidate(std::int32_t position, std::int32_t seen) const {
    return position < seen - recent;
  }
  DMS_HOST_DEVICE int prompt_evictions(int live, int candidates) const {
    const int over = live > keep ? live - keep : 0;
    return over < candidates ? over : candidates;
  }
};

struct h2o_policy : policy<h2o_policy> {
  static constexpr bool keeps_scores = true;
  static constexpr bool hooks_never_throw = true;

  h2o_policy() : h2o_policy(h2o_params{}) {}
  explicit h2o_policy(h2o_params p) : params_(p) {
    detail::check_range("h2o_params.recent", p.recent, 0, 1 << 30);
    if (p.budget < p.recent || p.budget < 1)
      detail::fail("h2o_params.budget = ", p.budget, " must be >= max(1, recent = ", p.recent, ")");
  }
  const char* name() const { return "H2O"; }
  [[nodiscard]] const h2o_params& params() const { return params_; }

  constexpr score_update score_for_query(int, int) const { return score_update::add; }

  template <class Row>
  int choose_victim(const Row&, const token_info&) const {
    return -1;
  }
  template <class Seq>
  void after_attention(Seq& seq) const {
    for (int h = 0; h < seq.num_rows(); ++h) reduce(seq.row(h));
  }
  /// A row holds budget + 1 tokens between an append and the step's eviction.
  void check_config(const cache_config& cfg) const {
    if (std::int64_t{params_.budget} + 1 > cfg.max_row_slots)
      detail::fail("h2o_params.budget = ", params_.budget,
                   " is outside the valid range [max(1, recent), cache_config.max_row_slots - 1 = ",
                   cfg.max_row_slots - 1, "] (a row holds budget + 1 tokens before each eviction)");
  }
  [[nodiscard]] h2o_device_policy device_form() const {
    return {{}, params_.budget, params_.recent};
  }

  template <class Seq>
  void compress_prompt(Seq& seq) const {
    for (int h = 0; h < seq.num_rows(); ++h) {
      reduce(seq.row(h));
      seq.row(h).compact();
    }
  }

 private:
  template <class Row>
  void reduce(Row& row) const {
    const std::int32_t recent_from = row.tokens_seen() - params_.recent;
    while (row.live() > params_.budget)
      row.evict(detail::lowest_slot(row, recent_from, [&](int s) { return row.score(s); }));
  }

  h2o_params params_;
};

DMS_NAMESPACE_END
