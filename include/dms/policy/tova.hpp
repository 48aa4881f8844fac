// SPDX-License-Identifier: Apache-2.0
#pragma once

// TOVA — Token Omission Via Attention (spec: "TOVA"). After each decode step a row holding more
// than `budget` tokens drops the one the CURRENT query attends to least (the new token is a
// candidate too). Prefill is dense; finish_prompt then keeps the `budget` tokens the last prompt
// query attends to most.
//
// Ranking modes:
//  * per_kv_head (default): probabilities averaged over the G query heads of the row's group.
//    The natural choice for per-row caches: each KV head keeps what its own queries use.
//  * layer_average: the official code — averaged over ALL query heads of the layer, one ranking
//    shared by every KV head, so all rows of a sequence keep the same positions.
// Ties: the oldest token goes first (dms/policy/ranking.hpp).

#include <cstdint>

#include "dms/cache_config.hpp"
#include "dms/config.hpp"
#include "dms/error.hpp"
#include "dms/policy/device_policy.hpp"
#include "dms/policy/policy.hpp"
#include "dms/policy/ranking.hpp"

DMS_NAMESPACE_BEGIN

enum class tova_ranking { per_kv_head, layer_average };

struct tova_params {
  int budget = 512;  // tokens kept per row after each step
  tova_ranking ranking = tova_ranking::per_kv_head;
};

/// Device form: per-KV-head ranking (layer_average has no device form yet). The prompt keeps the
/// `keep` tokens the last prompt query attends to most.
struct tova_device_policy : device_policy_base {
  int keep;
  static constexpr bool evicts_by_score = true;
  static constexpr bool keeps_scores = true;
  static constexpr score_update decode_score = score_update::assign;
  static constexpr prompt_reduction reduces_prompt = prompt_reduction::by_score;
  DMS_HOST_DEVICE int choose_victim(const row_context&, const token_info&) const { return -1; }
  DMS_HOST_DEVICE int budget() const { return keep; }
  DMS_HOST_DEVICE score_update prompt_score(std::int32_t, std::int32_t) const {
    return score_update::assign;
  }
  DMS_HOST_DEVICE bool prompt_candidate(std::int32_t, std::int32_t) const { return true; }
  DMS_HOST_DEVICE int prompt_evictions(int live, int) const {
    return live > keep ? live - keep : 0;
  }
};

struct tova_policy : policy<tova_policy> {
  static constexpr bool keeps_scores = true;
  static constexpr bool hooks_never_throw = true;

  tova_policy() : tova_policy(tova_params{}) {}
  explicit tova_policy(tova_params p) : params_(p) {
    detail::check_range("tova_params.budget", p.budget, 1, 1 << 30);
  }
  const char* name() const {
    return params_.ranking == tova_ranking::layer_average ? "TOVA (layer)" : "TOVA";
  }
  [[nodiscard]] const tova_params& params() const { return params_; }

  /// The score of a slot is the current query's probability summed over the group's heads.
  constexpr score_update score_for_query(int, int) const { return score_update::assign; }

  template <class Row>
  int choose_victim(const Row&, const token_info&) const {
    return -1;
  }
  template <class Seq>
  void after_attention(Seq& seq) const {
    reduce_to(seq, params_.budget);
  }
  /// A row holds budget + 1 tokens between an append and the step's eviction.
  void check_config(const cache_config& cfg) const {
    if (std::int64_t{params_.budget} + 1 > cfg.max_row_slots)
      detail::fail("tova_params.budget = ", params_.budget,
                   " is outside the valid range [1, cache_config.max_row_slots - 1 = ",
                   cfg.max_row_slots - 1, "] (a row holds budget + 1 tokens before each eviction)");
  }
  [[nodiscard]] tova_device_policy device_form() const {
    if (params_.ranking != tova_ranking::per_kv_head)
      detail::fail("tova_params.ranking = layer_average has no device form; use per_kv_head");
    return {{}, params_.budget};
  }

  template <class Seq>
  void compress_prompt(Seq& seq) const {
    reduce_to(seq, params_.budget);
    for (int h = 0; h < seq.num_rows(); ++h) seq.row(h).compact();
  }

 private:
  template <class Seq>
  void reduce_to(Seq& seq, int budget) const {
    if (params_.ranking == tova_ranking::per_kv_head) {
      for (int h = 0; h < seq.num_rows(); ++h) {
        auto& row = seq.row(h);
        while (row.live() > budget)
          row.evict(
              detail::lowest_slot(row, row.tokens_seen(), [&](int s) { return row.score(s); }));
      }
      return;
    }
    // Layer average: every row of the sequence went through the same appends and evictions, so
    // slot s holds the same position in all of them; rank by the score summed over rows.
    auto& first = seq.row(0);
    for (int h = 1; h < seq.num_rows(); ++h)
      if (seq.row(h).length() != first.length())
        detail::fail("tova layer_average: rows of one sequence diverged (lengths ", first.length(),
                     " and ", seq.row(h).length(), ")");
    const auto combined = [&](int s) {
      float sum = 0;
      for (int h = 0; h < seq.num_rows(); ++h) sum += seq.row(h).score(s);
      return sum;
    };
    while (first.live() > budget) {
      const int victim = detail::lowest_slot(first, first.tokens_seen(), combined);
      for (int h = 0; h < seq.num_rows(); ++h) seq.row(h).evict(victim);
    }
  }

  tova_params params_;
};

DMS_NAMESPACE_END
