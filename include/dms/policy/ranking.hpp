// SPDX-License-Identifier: Apache-2.0
#pragma once

// Score ranking shared by the score-based policies (TOVA, H2O, SnapKV). One tie-break for all of
// them, so the CPU path, the kernels and the tests agree: among equal scores the OLDEST token
// (smallest position) goes first, matching "evict the earliest" in the original implementations.

#include <cstdint>

#include "dms/config.hpp"

DMS_NAMESPACE_BEGIN

/// True if (score a, position pa) should be evicted before (score b, position pb).
DMS_HOST_DEVICE bool evicts_before(float a, std::int32_t pa, float b, std::int32_t pb) {
  return a < b || (a == b && pa < pb);
}

namespace detail {

/// The live slot of `row` with the lowest `score_of(slot)` among those with position < limit,
/// or -1 if there is none. score_of lets layer-averaged TOVA rank with a combined score.
template <class Row, class ScoreOf>
int lowest_slot(const Row& row, std::int32_t position_limit, ScoreOf score_of) {
  int best = -1;
  float best_score = 0;
  std::int32_t best_pos = 0;
  for (int s = 0; s < row.length(); ++s) {
    const std::int32_t p = row.position(s);
    if (p < 0 || p >= position_limit) continue;
    const float sc = score_of(s);
    if (best < 0 || evicts_before(sc, p, best_score, best_pos)) {
      best = s;
      best_score = sc;
      best_pos = p;
    }
  }
  return best;
}

}  // namespace detail

DMS_NAMESPACE_END
