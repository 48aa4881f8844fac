// SPDX-License-Identifier: Apache-2.0
#pragma once

// cache_image<T>: a cache_state whose arrays are host vectors. It is the interchange format
// between the host cache (paged_cache::to_image / load_image) and the device cache (upload /
// download are flat copies of these vectors), and the CPU execution of the batched step
// algorithm runs on it directly.

#include <cstdint>
#include <vector>

#include "dms/cache_config.hpp"
#include "dms/config.hpp"
#include "dms/numeric.hpp"
#include "dms/step/cache_state.hpp"

DMS_NAMESPACE_BEGIN

template <storage_type T>
struct cache_image {
  cache_config config;
  int ring_length = 0;  // per-row ring entries of the policy's device form
  std::vector<T> k, v;
  std::vector<std::int32_t> position;
  std::vector<float> score, page_min, page_max;  // empty when the policy needs none
  std::vector<std::int32_t> page_table, row_length, live, seen, peak, hole_head;
  std::vector<std::int32_t> free_pages;  // [max_pages]; entries past free_top are unused
  std::int32_t free_top = 0;
  std::vector<std::int32_t> ring_slot;
  std::vector<std::uint8_t> ring_flag;
  std::vector<std::uint8_t> active;
  std::int32_t status = 0;

  cache_image() = default;
  /// An empty cache: every page free (page max_pages-1 on the bottom, page 0 on top), no
  /// sequences. ring_flags says whether the ring keeps a flag per entry.
  cache_image(const cache_config& cfg, bool with_scores, bool with_bounds, int ring,
              bool ring_flags)
      : config(cfg), ring_length(ring) {
    cfg.validate();
    const auto slots = std::size_t(cfg.max_pages) * cfg.page_size;
    const auto rows = std::size_t(cfg.max_rows());
    k.assign(slots * cfg.head_dim, T{});
    v.assign(slots * cfg.head_dim, T{});
    position.assign(slots, -1);
    if (with_scores) score.assign(slots, 0.0f);
    if (with_bounds) {
      page_min.assign(std::size_t(cfg.max_pages) * cfg.head_dim, 0.0f);
      page_max.assign(std::size_t(cfg.max_pages) * cfg.head_dim, 0.0f);
    }
    page_table.assign(rows * cfg.max_pages_per_row(), -1);
    row_length.assign(rows, 0);
    live.assign(rows, 0);
    seen.assign(rows, 0);
    peak.assign(rows, 0);
    hole_head.assign(rows, -1);
    free_pages.resize(std::size_t(cfg.max_pages));
    for (int i = 0; i < cfg.max_pages; ++i) free_pages[i] = cfg.max_pages - 1 - i;
    free_top = cfg.max_pages;
    ring_slot.assign(rows * std::size_t(ring), -1);
    if (ring_flags) ring_flag.assign(rows * std::size_t(ring), 0);
    active.assign(std::size_t(cfg.max_sequences), 0);
  }

  /// The same arrays as raw pointers, for the step algorithm.
  cache_state<T> state() {
    return {k.data(),
            v.data(),
            position.data(),
            score.empty() ? nullptr : score.data(),
            page_min.empty() ? nullptr : page_min.data(),
            page_max.empty() ? nullptr : page_max.data(),
            page_table.data(),
            row_length.data(),
            live.data(),
            seen.data(),
            peak.data(),
            hole_head.data(),
            free_pages.data(),
            &free_top,
            ring_slot.empty() ? nullptr : ring_slot.data(),
            ring_flag.empty() ? nullptr : ring_flag.data(),
            active.data(),
            &status,
            config.num_kv_heads,
            config.group_size,
            config.head_dim,
            config.page_size,
            config.max_pages,
            config.max_pages_per_row(),
            config.max_sequences,
            config.max_row_slots,
            ring_length};
  }

  /// Positions of a row in slot order with every hole as -1, as paged_cache::positions gives.
  [[nodiscard]] std::vector<std::int32_t> positions(int row) const {
    std::vector<std::int32_t> out(static_cast<std::size_t>(row_length[row]));
    for (int s = 0; s < row_length[row]; ++s) {
      const std::int32_t page =
          page_table[std::size_t(row) * config.max_pages_per_row() + s / config.page_size];
      const std::int32_t p = position[std::size_t(page) * config.page_size + s % config.page_size];
      out[s] = p < 0 ? -1 : p;
    }
    return out;
  }
};

DMS_NAMESPACE_END
