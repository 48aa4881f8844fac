// SPDX-License-Identifier: Apache-2.0
#pragma once

// SnapKV — prompt compression (spec: "SnapKV"). The last `window` prompt queries vote: their
// probabilities over the prompt keys are summed (over those queries and the group's heads; the
// spec's group average ranks identically), smoothed along positions with a 1-D pool, and each row
// keeps the top (capacity - window) prefix tokens plus the whole observation window. Decode after
// the prompt is dense (SnapKV compresses prompts only). Prompts of at most `capacity` tokens are
// kept whole. Pooling pads like torch's max_pool1d (-inf) and avg_pool1d (zeros, divisor = kernel).

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "dms/cache_config.hpp"
#include "dms/config.hpp"
#include "dms/error.hpp"
#include "dms/policy/device_policy.hpp"
#include "dms/policy/policy.hpp"
#include "dms/policy/ranking.hpp"

DMS_NAMESPACE_BEGIN

enum class snapkv_pooling { max, avg };

struct snapkv_params {
  int capacity = 1024;  // tokens kept per row after the prompt
  int window = 32;      // observation window W_obs: the last prompt queries, always kept
  int kernel = 7;       // pooling width (odd)
  snapkv_pooling pooling = snapkv_pooling::max;
};

/// Device form: decode after the prompt is dense; scores exist for the prompt's vote.
struct snapkv_device_policy : device_policy_base {
  int capacity;
  int window;
  int kernel;
  bool max_pooling;
  static constexpr bool keeps_scores = true;
  static constexpr prompt_reduction reduces_prompt = prompt_reduction::by_pooled_score;
  DMS_HOST_DEVICE int choose_victim(const row_context&, const token_info&) const { return -1; }
  DMS_HOST_DEVICE score_update prompt_score(std::int32_t query_position,
                                            std::int32_t prompt_end) const {
    return prompt_end >= 0 && query_position >= prompt_end - window ? score_update::add
                                                                    : score_update::none;
  }
  DMS_HOST_DEVICE bool prompt_candidate(std::int32_t position, std::int32_t seen) const {
    return position < seen - window;
  }
  // A row within capacity is left as it is; otherwise the prefix keeps capacity - window.
  DMS_HOST_DEVICE int prompt_evictions(int live, int candidates) const {
    if (live <= capacity) return -1;
    const int over = candidates - (capacity - window);
    return over > 0 ? over : 0;
  }
  DMS_HOST_DEVICE int pool_kernel() const { return kernel; }
  DMS_HOST_DEVICE bool pool_max() const { return max_pooling; }
};

struct snapkv_policy : policy<snapkv_policy> {
  static constexpr bool keeps_scores = true;
  static constexpr bool hooks_never_throw = true;

  snapkv_policy() : snapkv_policy(snapkv_params{}) {}
  explicit snapkv_policy(snapkv_params p) : params_(p) {
    detail::check_range("snapkv_params.window", p.window, 1, 1 << 20);
    if (p.capacity < p.window)
      detail::fail("snapkv_params.capacity = ", p.capacity, " is smaller than window = ", p.window);
    detail::check_range("snapkv_params.kernel", p.kernel, 1, 1023);
    if (p.kernel % 2 == 0) detail::fail("snapkv_params.kernel = ", p.kernel, " must be odd");
  }
  const char* name() const { return "SnapKV"; }
  [[nodiscard]] const snapkv_params& params() const { return params_; }

  /// Only the observation window's queries vote; prompt_end is -1 in decode.
  constexpr score_update score_for_query(int query_position, int prompt_end) const {
    return prompt_end >= 0 && query_position >= prompt_end - params_.window ? score_update::add
                                                                            : score_update::none;
  }

  template <class Row>
  int choose_victim(const Row&, const token_info&) const {
    return -1;
  }
  template <class Seq>
  void after_attention(Seq&) const {}

  void check_config(const cache_config& cfg) const {
    if (params_.capacity > cfg.max_row_slots)
      detail::fail("snapkv_params.capacity = ", params_.capacity,
                   " is outside the valid range [window = ", params_.window,
                   ", cache_config.max_row_slots = ", cfg.max_row_slots, "]");
  }

  [[nodiscard]] snapkv_device_policy device_form() const {
    return {{},
            params_.capacity,
            params_.window,
            params_.kernel,
            params_.pooling == snapkv_pooling::max};
  }

  template <class Seq>
  void compress_prompt(Seq& seq) const {
    for (int h = 0; h < seq.num_rows(); ++h) compress_row(seq.row(h));
  }

  /// Pooled votes of a row's prefix tokens, in position order: (pooled score, slot).
  template <class Row>
  std::vector<std::pair<float, int>> pooled_prefix(const Row& row) const {
    const std::int32_t prefix_end = row.tokens_seen() - params_.window;
    std::vector<std::pair<std::int32_t, int>> by_pos;  // (position, slot)
    for (int s = 0; s < row.length(); ++s) {
      const std::int32_t p = row.position(s);
      if (p >= 0 && p < prefix_end) by_pos.emplace_back(p, s);
    }
    std::sort(by_pos.begin(), by_pos.end());
    const int n = int(by_pos.size()), half = params_.kernel / 2;
    std::vector<std::pair<float, int>> out(n);
    for (int i = 0; i < n; ++i) {
      float acc =
          params_.pooling == snapkv_pooling::max ? -std::numeric_limits<float>::infinity() : 0.0f;
      for (int j = std::max(0, i - half); j <= std::min(n - 1, i + half); ++j) {
        const float x = row.score(by_pos[j].second);
        acc = params_.pooling == snapkv_pooling::max ? std::max(acc, x) : acc + x;
      }
      if (params_.pooling == snapkv_pooling::avg) acc /= float(params_.kernel);
      out[i] = {acc, by_pos[i].second};
    }
    return out;
  }

 private:
  template <class Row>
  void compress_row(Row& row) const {
    if (row.live() <= params_.capacity) return;
    auto pooled = pooled_prefix(row);
    const int keep = params_.capacity - params_.window;
    // Best first: higher pooled score, then the newer token (the tie rule of ranking.hpp).
    std::stable_sort(pooled.begin(), pooled.end(), [&](const auto& a, const auto& b) {
      return evicts_before(b.first, row.position(b.second), a.first, row.position(a.second));
    });
    for (std::size_t i = std::size_t(keep); i < pooled.size(); ++i) row.evict(pooled[i].second);
    row.compact();
  }

  snapkv_params params_;
};

DMS_NAMESPACE_END
