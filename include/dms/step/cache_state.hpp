// SPDX-License-Identifier: Apache-2.0
#pragma once

// cache_state<T>: every array of one layer's cache that a batched decode step reads or writes, as
// raw pointers plus shapes. It is what the CUDA bookkeeping kernels take by value, and what the
// serial CPU execution of the same algorithm (batch_step.hpp) runs on, so the two share one body.
// The arrays live in device memory (dms::cuda::device_cache) or in host vectors (cache_image).
//
// Differences from the host cache's internal layout, both for the sake of the GPU:
//  * Holes are an intrusive LIFO list threaded through `position`: hole_head[row] is the most
//    recent hole (-1 = none), and a hole's position is -1 if it is the last in the list, else
//    -2 - (next hole's slot). Every position < 0 is a hole, so readers only test p >= 0.
//  * The page free list is a stack (free_pages[0, *free_top)) popped from the top, in row order,
//    so a batched append hands out exactly the pages a sequence-by-sequence host append would.

#include <cstdint>

#include "dms/cache_view.hpp"
#include "dms/config.hpp"
#include "dms/policy/device_policy.hpp"

DMS_NAMESPACE_BEGIN

/// Why a device step did nothing. The first error sticks in cache_state::status, and every later
/// step is skipped until the host clears it, so one bad step cannot cascade into corruption.
enum class step_status : std::int32_t {
  ok = 0,
  pool_exhausted = 1,      // the step needed more free pages than the pool had
  row_full = 2,            // a row reached cache_config.max_row_slots
  bad_sequence = 3,        // a sequence id out of range or not active
  bad_victim = 4,          // a policy named a slot that is not live
  duplicate_sequence = 5,  // a sequence id appears twice in one batch
};

DMS_HOST_DEVICE constexpr const char* step_status_name(step_status s) {
  switch (s) {
    case step_status::ok:
      return "ok";
    case step_status::pool_exhausted:
      return "page pool exhausted (cache_config.max_pages)";
    case step_status::row_full:
      return "row full (cache_config.max_row_slots)";
    case step_status::bad_sequence:
      return "unknown or inactive sequence id";
    case step_status::bad_victim:
      return "policy chose a victim slot that is not live";
    case step_status::duplicate_sequence:
      return "a sequence id appears twice in one batch";
  }
  return "unknown status";
}

template <class T>
struct cache_state {
  T* k;                      // [max_pages][page_size][head_dim]
  T* v;                      // [max_pages][page_size][head_dim]
  std::int32_t* position;    // [max_pages][page_size] token index; < 0 = hole (see above)
  float* score;              // [max_pages][page_size] or null (policy keeps no scores)
  float* page_min;           // [max_pages][head_dim] or null (policy needs no bounds)
  float* page_max;           // [max_pages][head_dim] or null
  std::int32_t* page_table;  // [max_rows][max_pages_per_row], -1 = none
  std::int32_t* row_length;  // [max_rows] slots spanned
  std::int32_t* live;        // [max_rows] slots holding a token
  std::int32_t* seen;        // [max_rows] tokens appended
  std::int32_t* peak;        // [max_rows] maximum of live
  std::int32_t* hole_head;   // [max_rows] most recent hole, -1 = none
  std::int32_t* free_pages;  // [max_pages] stack of free page ids
  std::int32_t* free_top;    // [1] entries in free_pages
  std::int32_t* ring_slot;   // [max_rows][ring_length] or null (policy keeps no ring)
  std::uint8_t* ring_flag;   // [max_rows][ring_length] or null
  std::uint8_t* active;      // [max_sequences] 1 = sequence id in use
  std::int32_t* status;      // [1] step_status of the first failed step, 0 = ok
  int num_kv_heads;
  int group_size;
  int head_dim;
  int page_size;
  int max_pages;
  int max_pages_per_row;
  int max_sequences;
  int max_row_slots;
  int ring_length;

  [[nodiscard]] DMS_HOST_DEVICE int max_rows() const { return max_sequences * num_kv_heads; }

  DMS_HOST_DEVICE std::int32_t& page_entry(int row, int logical_page) const {
    return page_table[std::int64_t{row} * max_pages_per_row + logical_page];
  }
  DMS_HOST_DEVICE std::int64_t slot_index(int row, int slot) const {
    return std::int64_t{page_entry(row, slot / page_size)} * page_size + slot % page_size;
  }

  /// The row as a policy hook sees it.
  DMS_HOST_DEVICE row_context context(int row) const {
    const std::int64_t ring = std::int64_t{row} * ring_length;
    return {row_length[row], live[row], seen[row], ring_slot ? ring_slot + ring : nullptr,
            ring_flag ? ring_flag + ring : nullptr};
  }

  /// Marks a live slot as a hole and pushes it on the row's hole list.
  DMS_HOST_DEVICE void push_hole(int row, int slot) const {
    const std::int64_t at = slot_index(row, slot);
    position[at] = hole_head[row] < 0 ? -1 : -2 - hole_head[row];
    if (score) score[at] = 0.0f;
    hole_head[row] = slot;
    --live[row];
  }
  /// Pops the most recent hole of the row (the caller checked hole_head[row] >= 0).
  DMS_HOST_DEVICE int pop_hole(int row) const {
    const int slot = hole_head[row];
    const std::int32_t link = position[slot_index(row, slot)];
    hole_head[row] = link == -1 ? -1 : -2 - link;
    return slot;
  }

  /// The read-only view decode attention takes.
  [[nodiscard]] DMS_HOST_DEVICE cache_view<T> view() const {
    return {k,        v,          position,          score,        page_min,
            page_max, page_table, row_length,        num_kv_heads, group_size,
            head_dim, page_size,  max_pages_per_row, max_rows()};
  }
};

DMS_NAMESPACE_END
