// SPDX-License-Identifier: Apache-2.0
#pragma once

// score_policy: a whole eviction policy from one function, the way a kvpress "press" is written.
// The user supplies a scorer
//
//   struct my_scorer {
//     const char* name() const { return "..."; }           // optional
//     template <class Row> float operator()(const Row& row, int slot) const;  // higher = keep
//   };
//
// and gets budgeted eviction: after each decode step's attention (finish_step), and once at the
// end of a prompt (finish_prompt, which also compacts the row), every row holding more than
// `budget` tokens evicts its lowest-scoring live slots until it holds `budget`. Ties go as in
// the built-in score policies (dms/policy/ranking.hpp): the oldest token first. The scorer sees
// the row handle (position, key, value, score, tokens_seen, ...) and is called once per live
// slot per eviction round, before anything is evicted, so a score never depends on the order of
// evictions. A scorer that throws leaves the cache unchanged (the cache's undo log).

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "dms/cache_config.hpp"
#include "dms/config.hpp"
#include "dms/error.hpp"
#include "dms/policy/policy.hpp"
#include "dms/policy/ranking.hpp"

DMS_NAMESPACE_BEGIN

template <class Scorer>
struct score_policy : policy<score_policy<Scorer>> {
  score_policy(int budget, Scorer scorer = Scorer{}) : budget_(budget), scorer_(std::move(scorer)) {
    detail::check_range("score_policy: budget", budget, 1, 1 << 30);
  }

  const char* name() const {
    if constexpr (requires(const Scorer& s) { s.name(); })
      return scorer_.name();
    else
      return "score policy";
  }
  [[nodiscard]] int budget() const { return budget_; }
  [[nodiscard]] const Scorer& scorer() const { return scorer_; }

  template <class Row>
  int choose_victim(const Row&, const token_info&) const {
    return -1;
  }
  template <class Seq>
  void after_attention(Seq& seq) const {
    for (int h = 0; h < seq.num_rows(); ++h) reduce(seq.row(h));
  }
  template <class Seq>
  void compress_prompt(Seq& seq) const {
    for (int h = 0; h < seq.num_rows(); ++h) {
      reduce(seq.row(h));
      seq.row(h).compact();
    }
  }
  /// A row holds budget + 1 tokens between an append and the step's eviction.
  void check_config(const cache_config& cfg) const {
    if (std::int64_t{budget_} + 1 > cfg.max_row_slots)
      detail::fail("score_policy: budget = ", budget_,
                   " is outside the valid range [1, cache_config.max_row_slots - 1 = ",
                   cfg.max_row_slots - 1, "]");
  }

 private:
  struct candidate {
    float score;
    std::int32_t position;
    int slot;
  };

  template <class Row>
  void reduce(Row& row) const {
    const int over = row.live() - budget_;
    if (over <= 0) return;
    std::vector<candidate> live;
    live.reserve(std::size_t(row.live()));
    for (int s = 0; s < row.length(); ++s)
      if (const std::int32_t p = row.position(s); p >= 0) {
        const float sc = float(scorer_(std::as_const(row), s));
        if (sc != sc)  // NaN has no rank; sorting with it would be undefined
          detail::fail("score_policy ", name(), ": the scorer returned nan for slot ", s,
                       " (position ", p, ") of row ", row.index());
        live.push_back({sc, p, s});
      }
    const auto first = [](const candidate& a, const candidate& b) {
      return evicts_before(a.score, a.position, b.score, b.position);
    };
    // Lowest first, in the order repeated arg-min eviction would take them (holes are refilled
    // last-evicted first, so the order is observable).
    std::partial_sort(live.begin(), live.begin() + over, live.end(), first);
    for (int i = 0; i < over; ++i) row.evict(live[std::size_t(i)].slot);
  }

  int budget_;
  Scorer scorer_;
};

DMS_NAMESPACE_END
