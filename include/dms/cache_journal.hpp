// SPDX-License-Identifier: Apache-2.0
#pragma once

// The undo log of one paged_cache call that runs user policy hooks (append's on_append and
// on_evict, finish_step's after_attention, finish_prompt's compress_prompt, compaction's
// on_slot_moved). The cache records what it is about to change -- each row at its first touch
// (counters, holes, page-table entries, the policy's row state), each slot before it is written
// (and its K/V if they are overwritten), each page's key bounds before they widen, the pages it
// takes -- and holds back the pages it frees. If a hook throws, the cache replays the log
// backwards and is as it was; if not, it releases the held pages. Library policies promise their
// hooks never throw (policy::hooks_never_throw) and skip the log.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "dms/config.hpp"

DMS_NAMESPACE_BEGIN
namespace detail {

template <class T, class RowState>
struct cache_journal {
  struct row_backup {
    int row;
    std::int32_t length, live, seen, peak;
    std::vector<int> holes;
    std::vector<std::int32_t> table;  // page-table entries of the row's pages
    RowState state;
  };
  struct slot_backup {
    std::int64_t at;  // flat slot index: pages neither move nor get reused during the call
    std::int32_t position;
    float score;
    std::vector<T> k, v;  // empty unless the call overwrote the slot's K/V
  };
  struct bounds_backup {
    std::int32_t page;
    std::vector<float> lo, hi;
  };

  std::vector<row_backup> rows;
  std::vector<slot_backup> slots;
  std::vector<bounds_backup> bounds;
  std::vector<std::int32_t> allocated;  // pages taken, in order
  std::vector<std::int32_t> released;   // pages to give back once the call succeeds
  std::int64_t live_delta = 0;
  int from_reservation = 0;  // of `allocated`, the first ones came from the sequence's reservation

  [[nodiscard]] int fresh_from_pool() const {
    return std::max(0, int(allocated.size()) - from_reservation);
  }
  [[nodiscard]] bool has_row(int r) const {
    return std::any_of(rows.begin(), rows.end(), [r](const row_backup& b) { return b.row == r; });
  }

  void save_slot(std::int64_t at, const std::int32_t* position, const float* score, const T* k,
                 const T* v, int head_dim, bool with_kv) {
    slot_backup b{at, position[at], score ? score[at] : 0.0f, {}, {}};
    if (with_kv) {
      b.k.assign(k + at * head_dim, k + (at + 1) * head_dim);
      b.v.assign(v + at * head_dim, v + (at + 1) * head_dim);
    }
    slots.push_back(std::move(b));
  }
  void save_bounds(std::int32_t page, const float* page_min, const float* page_max, int head_dim) {
    for (const auto& b : bounds)
      if (b.page == page) return;
    const float* lo = page_min + std::int64_t{page} * head_dim;
    const float* hi = page_max + std::int64_t{page} * head_dim;
    bounds.push_back(
        {page, std::vector<float>(lo, lo + head_dim), std::vector<float>(hi, hi + head_dim)});
  }

  /// Puts the recorded slots (newest first) and key bounds back into the pool's arrays.
  void restore_slots(std::int32_t* position, float* score, T* k, T* v, float* page_min,
                     float* page_max, int head_dim) const noexcept {
    for (auto it = slots.rbegin(); it != slots.rend(); ++it) {
      position[it->at] = it->position;
      if (score) score[it->at] = it->score;
      if (!it->k.empty()) {
        std::copy(it->k.begin(), it->k.end(), k + it->at * head_dim);
        std::copy(it->v.begin(), it->v.end(), v + it->at * head_dim);
      }
    }
    for (const auto& b : bounds) {
      std::copy(b.lo.begin(), b.lo.end(), page_min + std::int64_t{b.page} * head_dim);
      std::copy(b.hi.begin(), b.hi.end(), page_max + std::int64_t{b.page} * head_dim);
    }
  }
};

}  // namespace detail
DMS_NAMESPACE_END
