// SPDX-License-Identifier: Apache-2.0
#pragma once

// Quest — query-aware page selection (spec: "Quest"). Nothing is evicted; each page keeps the
// per-channel min and max of its keys, and a decode step reads only the pages whose upper bound
//   U(page) = sum_d max(q_d * max_d, q_d * min_d)  >=  q . k  for every key k in the page
// is among the top (token_budget / page_size - 1), plus the current (last) page, which is always
// read and never scored. Rows with at most token_budget / page_size pages are read densely.
//
// Choices: under GQA a page's score is the MAX of U over the G query heads of the group (a valid
// bound for each of them); ties go to the lower page index; the selection is returned in page
// order. Layers below `dense_layers` read everything; the default is 0, so a Quest cache saves
// reads unless told otherwise (the official setup keeps its first 2 layers dense: give each
// layer's cache `.layer = i, .dense_layers = 2`). The token budget is whole pages: it must be at
// least cache_config.page_size (the cache rejects less) and is rounded down to a multiple of it.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "dms/cache_config.hpp"
#include "dms/config.hpp"
#include "dms/error.hpp"
#include "dms/policy/device_policy.hpp"
#include "dms/policy/policy.hpp"

DMS_NAMESPACE_BEGIN

namespace quest_rule {

/// Upper bound of q . k over keys with kmin <= k <= kmax (channel-wise).
DMS_HOST_DEVICE float upper_bound(const float* q, const float* kmin, const float* kmax,
                                  int head_dim) {
  float u = 0.0f;
  for (int c = 0; c < head_dim; ++c) {
    const float a = q[c] * kmin[c], b = q[c] * kmax[c];
    u += a > b ? a : b;
  }
  return u;
}

/// Page budget: token_budget / page_size, at least the current page.
DMS_HOST_DEVICE int page_budget(int token_budget, int page_size) {
  const int b = token_budget / page_size;
  return b < 1 ? 1 : b;
}

}  // namespace quest_rule

/// Device form: page bounds on append, page selection in decode.
struct quest_device_policy : device_policy_base {
  int token_budget;
  bool dense;  // a layer below dense_layers reads every page
  static constexpr bool needs_page_bounds = true;
  static constexpr bool selects_pages = true;
  DMS_HOST_DEVICE int choose_victim(const row_context&, const token_info&) const { return -1; }
  /// Pages read per row (the current one included); a dense layer reads all.
  DMS_HOST_DEVICE int page_budget(int page_size) const {
    return dense ? 0x7fffffff : quest_rule::page_budget(token_budget, page_size);
  }
};

struct quest_params {
  int token_budget = 1024;  // B: tokens read per step (B / page_size pages)
  int layer = 0;            // index of the layer this cache belongs to
  int dense_layers = 0;     // layers [0, dense_layers) are read densely (official setup: 2)
};

struct quest_policy : policy<quest_policy> {
  static constexpr bool needs_page_bounds = true;
  static constexpr bool selects_pages = true;
  static constexpr bool hooks_never_throw = true;

  quest_policy() : quest_policy(quest_params{}) {}
  explicit quest_policy(quest_params p) : params_(p) {
    detail::check_range("quest_params.token_budget", p.token_budget, 1, 1 << 30);
    detail::check_range("quest_params.layer", p.layer, 0, 1 << 20);
    detail::check_range("quest_params.dense_layers", p.dense_layers, 0, 1 << 20);
  }
  const char* name() const { return "Quest"; }
  [[nodiscard]] const quest_params& params() const { return params_; }

  template <class Row>
  int choose_victim(const Row&, const token_info&) const {
    return -1;
  }
  template <class Seq>
  void after_attention(Seq&) const {}

  /// A budget below one page would silently read a whole page anyway.
  void check_config(const cache_config& cfg) const {
    if (params_.token_budget < cfg.page_size)
      detail::fail("quest_params.token_budget = ", params_.token_budget,
                   " is outside the valid range [cache_config.page_size = ", cfg.page_size,
                   ", 2^30]: Quest reads whole pages");
  }

  [[nodiscard]] quest_device_policy device_form() const {
    return {{}, params_.token_budget, params_.layer < params_.dense_layers};
  }

  /// Page scores U for every page but the last, max over the group. q is [G][head_dim].
  template <class Row>
  void score_pages(const Row& row, const float* q, int group_size, int head_dim,
                   std::vector<float>& scores) const {
    const int n = row.num_pages() - 1;
    scores.assign(std::max(n, 0), 0.0f);
    for (int p = 0; p < n; ++p) {
      float best = quest_rule::upper_bound(q, row.page_min(p), row.page_max(p), head_dim);
      for (int g = 1; g < group_size; ++g)
        best = std::max(best, quest_rule::upper_bound(q + std::size_t(g) * head_dim,
                                                      row.page_min(p), row.page_max(p), head_dim));
      scores[p] = best;
    }
  }

  /// Logical pages to read, ascending. q is [group_size][head_dim].
  template <class Row>
  void select_pages(const Row& row, const float* q, int group_size, int head_dim,
                    std::vector<int>& pages) const {
    const int n = row.num_pages();
    const int budget = quest_rule::page_budget(params_.token_budget, row.page_size());
    pages.clear();
    if (params_.layer < params_.dense_layers || n <= budget) {
      for (int p = 0; p < n; ++p) pages.push_back(p);
      return;
    }
    std::vector<float> scores;
    score_pages(row, q, group_size, head_dim, scores);
    for (int p = 0; p < n - 1; ++p) pages.push_back(p);
    const auto better = [&](int a, int b) {
      return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
    };
    std::partial_sort(pages.begin(), pages.begin() + (budget - 1), pages.end(), better);
    pages.resize(budget - 1);
    std::sort(pages.begin(), pages.end());
    pages.push_back(n - 1);
  }

 private:
  quest_params params_;
};

DMS_NAMESPACE_END
