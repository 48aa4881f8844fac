// SPDX-License-Identifier: Apache-2.0
#pragma once

// check_image: is a cache_image a cache? paged_cache::load_image runs it before it touches
// anything, so a corrupt image (a bad page id, a page in two rows, a hole list that loops, a
// counter that disagrees with the slots) is a dms::error that names what is wrong, never a crash
// at the next append. K/V, scores and page bounds are data and are not checked (a test may well
// poison the slots nobody reads); slots past a row's length and the page-table entries past its
// last page are leftovers and are ignored.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "dms/cache_config.hpp"
#include "dms/config.hpp"
#include "dms/error.hpp"
#include "dms/numeric.hpp"
#include "dms/step/cache_image.hpp"

DMS_NAMESPACE_BEGIN
namespace step {

/// Throws dms::error unless `img` is a consistent cache of its config:
///  * every array has the size the config (and with_scores, with_bounds, ring_flags) gives it;
///  * 0 <= free_top <= max_pages, the free pages are distinct page ids, and every page is either
///    free or holds exactly one (row, logical page) of an active sequence;
///  * an inactive sequence's rows are empty (length, live, seen, peak 0, no holes);
///  * an active row has 0 <= length <= max_row_slots, valid page ids for its pages, a hole list
///    of distinct slots below length that ends, live = length - holes, every other slot a
///    position in [0, seen), no position twice, live <= peak <= seen, and ring slots that are -1
///    or a live slot.
template <class T>
void check_image(const cache_image<T>& img, bool with_scores, bool with_bounds, bool ring_flags) {
  const cache_config& c = img.config;
  c.validate();
  const auto slots = std::size_t(c.max_pages) * std::size_t(c.page_size);
  const auto rows = std::size_t(c.max_rows());
  const auto ppr = std::size_t(c.max_pages_per_row());
  const auto ring = std::size_t(img.ring_length);
  const auto size = [](const char* what, std::size_t got, std::size_t want) {
    if (got != want)
      detail::fail("load_image: image.", what, " has ", got, " elements; expected ", want);
  };
  size("k", img.k.size(), slots * std::size_t(c.head_dim));
  size("v", img.v.size(), slots * std::size_t(c.head_dim));
  size("position", img.position.size(), slots);
  size("score", img.score.size(), with_scores ? slots : 0);
  size("page_min", img.page_min.size(), with_bounds ? std::size_t(c.max_pages) * c.head_dim : 0);
  size("page_max", img.page_max.size(), with_bounds ? std::size_t(c.max_pages) * c.head_dim : 0);
  size("page_table", img.page_table.size(), rows * ppr);
  size("row_length", img.row_length.size(), rows);
  size("live", img.live.size(), rows);
  size("seen", img.seen.size(), rows);
  size("peak", img.peak.size(), rows);
  size("hole_head", img.hole_head.size(), rows);
  size("free_pages", img.free_pages.size(), std::size_t(c.max_pages));
  size("ring_slot", img.ring_slot.size(), rows * ring);
  size("ring_flag", img.ring_flag.size(), ring_flags ? rows * ring : 0);
  size("active", img.active.size(), std::size_t(c.max_sequences));
  detail::check_range("load_image: image.free_top", img.free_top, 0, c.max_pages);

  // Page ownership: -1 unseen, -2 free, else the row holding it.
  std::vector<std::int32_t> owner(std::size_t(c.max_pages), -1);
  for (std::int32_t i = 0; i < img.free_top; ++i) {
    const std::int32_t p = img.free_pages[std::size_t(i)];
    if (p < 0 || p >= c.max_pages)
      detail::fail("load_image: image.free_pages[", i, "] = ", p,
                   " is outside the valid range [0, ", c.max_pages - 1, "]");
    if (owner[std::size_t(p)] != -1)
      detail::fail("load_image: page ", p, " is on the free list twice");
    owner[std::size_t(p)] = -2;
  }

  std::vector<std::uint8_t> is_hole;
  std::vector<std::int32_t> held;
  for (int r = 0; r < c.max_rows(); ++r) {
    const auto ru = std::size_t(r);
    const std::int32_t len = img.row_length[ru], live = img.live[ru], seen = img.seen[ru],
                       peak = img.peak[ru], head = img.hole_head[ru];
    const int seq = r / c.num_kv_heads;
    if (!img.active[std::size_t(seq)]) {
      if (len != 0 || live != 0 || seen != 0 || peak != 0 || head != -1)
        detail::fail("load_image: row ", r, " of inactive sequence ", seq, " is not empty (length ",
                     len, ", live ", live, ", seen ", seen, ", peak ", peak, ", hole_head ", head,
                     ")");
      continue;
    }
    if (len < 0 || len > c.max_row_slots)
      detail::fail("load_image: row ", r, " length = ", len, " is outside the valid range [0, ",
                   c.max_row_slots, "] (cache_config.max_row_slots)");
    const int pages = (len + c.page_size - 1) / c.page_size;
    for (int lp = 0; lp < pages; ++lp) {
      const std::int32_t p = img.page_table[ru * ppr + std::size_t(lp)];
      if (p < 0 || p >= c.max_pages)
        detail::fail("load_image: row ", r, " page_table[", lp, "] = ", p,
                     " is outside the valid range [0, ", c.max_pages - 1, "]");
      if (owner[std::size_t(p)] == -2)
        detail::fail("load_image: page ", p, " is held by row ", r, " and on the free list");
      if (owner[std::size_t(p)] >= 0)
        detail::fail("load_image: page ", p, " is held by rows ", owner[std::size_t(p)], " and ",
                     r);
      owner[std::size_t(p)] = r;
    }
    const auto at = [&](int slot) {
      const std::int32_t p = img.page_table[ru * ppr + std::size_t(slot / c.page_size)];
      return std::size_t(p) * std::size_t(c.page_size) + std::size_t(slot % c.page_size);
    };
    // The hole list: at most len links, each a slot below len whose position encodes the next.
    is_hole.assign(std::size_t(len), 0);
    int holes = 0;
    for (std::int32_t slot = head; slot != -1;) {
      if (slot < 0 || slot >= len)
        detail::fail("load_image: row ", r, " hole list names slot ", slot,
                     ", outside the valid range [0, ", len - 1, "]");
      if (is_hole[std::size_t(slot)])
        detail::fail("load_image: row ", r, " hole list visits slot ", slot, " twice");
      is_hole[std::size_t(slot)] = 1;
      ++holes;
      const std::int32_t link = img.position[at(slot)];
      if (link >= 0)
        detail::fail("load_image: row ", r, " hole list reaches slot ", slot,
                     ", which holds position ", link);
      slot = link == -1 ? -1 : -2 - link;
    }
    if (live != len - holes)
      detail::fail("load_image: row ", r, " live = ", live, " but it spans ", len,
                   " slots of which ", holes, " are holes");
    if (seen < live || peak < live || peak > seen)
      detail::fail("load_image: row ", r, " counters disagree: live ", live, ", peak ", peak,
                   ", seen ", seen, " (need live <= peak <= seen)");
    held.clear();
    for (int s = 0; s < len; ++s) {
      if (is_hole[std::size_t(s)]) continue;
      const std::int32_t p = img.position[at(s)];
      if (p < 0 || p >= seen)
        detail::fail("load_image: row ", r, " slot ", s, " position = ", p,
                     " is outside the valid range [0, ", seen - 1,
                     "] and the slot is not on the hole list");
      held.push_back(p);
    }
    std::sort(held.begin(), held.end());
    if (const auto dup = std::adjacent_find(held.begin(), held.end()); dup != held.end())
      detail::fail("load_image: row ", r, " holds position ", *dup, " twice");
    for (std::size_t i = 0; i < ring; ++i) {
      const std::int32_t slot = img.ring_slot[ru * ring + i];
      if (slot != -1 && (slot < 0 || slot >= len || is_hole[std::size_t(slot)]))
        detail::fail("load_image: row ", r, " ring_slot[", i, "] = ", slot,
                     " is neither -1 nor a live slot (row length ", len, ")");
    }
  }
  for (int p = 0; p < c.max_pages; ++p)
    if (owner[std::size_t(p)] == -1)
      detail::fail("load_image: page ", p, " is neither free nor held by a row");
}

}  // namespace step
DMS_NAMESPACE_END
