// SPDX-License-Identifier: Apache-2.0
#pragma once

// paged_cache <-> cache_image, the flat interchange layout of dms/step/cache_state.hpp (what a
// device cache uploads and downloads). The bodies of paged_cache::to_image and load_image live
// here so the cache's own header stays about its bookkeeping; image_io is a friend of the cache.

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "dms/config.hpp"
#include "dms/error.hpp"
#include "dms/step/cache_image.hpp"
#include "dms/step/image_check.hpp"

DMS_NAMESPACE_BEGIN
namespace detail {

struct image_io {
  template <class Cache>
  static auto to_image(const Cache& c) {
    using T = typename Cache::value_type;
    using P = typename Cache::policy_type;
    c.check_usable();
    const auto& rows = c.rows_;
    const int ring = c.ring_length();
    cache_image<T> img(rows.cfg, P::keeps_scores, P::needs_page_bounds, ring, c.ring_has_flags());
    img.k.assign(rows.pool.k(), rows.pool.k() + img.k.size());
    img.v.assign(rows.pool.v(), rows.pool.v() + img.v.size());
    img.position.assign(rows.pool.position(), rows.pool.position() + img.position.size());
    if (rows.pool.score())
      img.score.assign(rows.pool.score(), rows.pool.score() + img.score.size());
    if (rows.pool.page_min()) {
      img.page_min.assign(rows.pool.page_min(), rows.pool.page_min() + img.page_min.size());
      img.page_max.assign(rows.pool.page_max(), rows.pool.page_max() + img.page_max.size());
    }
    img.page_table = rows.page_table;
    img.row_length = rows.length;
    img.live = rows.live;
    img.seen = rows.seen;
    img.peak = rows.peak;
    auto st = img.state();
    for (int r = 0; r < rows.cfg.max_rows(); ++r) {
      // Thread the holes through `position`, bottom of the host stack first, so the image pops
      // them in the host's order.
      st.hole_head[r] = -1;
      if (!rows.active[std::size_t(r / rows.cfg.num_kv_heads)]) continue;
      for (const int slot : rows.holes(r)) {
        ++st.live[r];  // push_hole counts a live slot going away
        st.push_hole(r, slot);
      }
    }
    const auto& free = rows.pool.free_list();
    std::copy(free.begin(), free.end(), img.free_pages.begin());
    img.free_top = std::int32_t(free.size());
    for (int s = 0; s < rows.cfg.max_sequences; ++s) {
      img.active[std::size_t(s)] = rows.active[std::size_t(s)] ? 1 : 0;
      if constexpr (Cache::packs_row_state) {
        if (!rows.active[std::size_t(s)]) continue;
        for (int h = 0; h < rows.cfg.num_kv_heads; ++h) {
          const std::size_t r = std::size_t(c.row_index(s, h));
          c.policy_.pack_row_state(
              rows.state_of(int(r)), img.ring_slot.data() + r * ring,
              img.ring_flag.empty() ? nullptr : img.ring_flag.data() + r * ring);
        }
      }
    }
    return img;
  }

  template <class Cache, class T>
  static void load_image(Cache& c, const cache_image<T>& img) {
    using P = typename Cache::policy_type;
    c.check_usable();
    auto& rows = c.rows_;
    if (!(img.config == rows.cfg))
      detail::fail("load_image: the image's cache_config differs from this cache's");
    if (img.ring_length != c.ring_length())
      detail::fail("load_image: image c.ring_length = ", img.ring_length, ", this policy needs ",
                   c.ring_length());
    step::check_image(img, P::keeps_scores, P::needs_page_bounds, c.ring_has_flags());

    // Build every new container first (allocation may throw); then nothing below throws.
    std::vector<std::int32_t> free(img.free_pages.begin(), img.free_pages.begin() + img.free_top);
    std::vector<std::unique_ptr<typename Cache::sequence_storage>> seqs(
        std::size_t(rows.cfg.max_sequences));
    std::vector<std::int32_t> positions = img.position;
    const int H = rows.cfg.num_kv_heads, ring = c.ring_length();
    for (int s = 0; s < rows.cfg.max_sequences; ++s) {
      if (!img.active[std::size_t(s)]) continue;
      auto st = std::make_unique<typename Cache::sequence_storage>();
      st->holes.resize(std::size_t(H));
      st->state.resize(std::size_t(H));
      for (int h = 0; h < H; ++h) {
        const int r = s * H + h;
        // Walk the hole list top-down; the host stack wants it bottom first.
        auto& hl = st->holes[std::size_t(h)];
        for (int slot = img.hole_head[std::size_t(r)]; slot >= 0;) {
          hl.push_back(slot);
          const std::int64_t at = rows.image_slot_index(img, r, slot);
          const std::int32_t p = positions[std::size_t(at)];
          slot = p == -1 ? -1 : -2 - p;
          positions[std::size_t(at)] = -1;
        }
        std::reverse(hl.begin(), hl.end());
        auto& rs = st->state[std::size_t(h)];
        c.policy_.derived().init_row(rs);
        if constexpr (Cache::packs_row_state)
          c.policy_.unpack_row_state(
              rs, img.ring_slot.data() + std::size_t(r) * ring,
              img.ring_flag.empty() ? nullptr : img.ring_flag.data() + std::size_t(r) * ring);
      }
      seqs[std::size_t(s)] = std::move(st);
    }
    std::vector<std::int32_t> page_table = img.page_table, length = img.row_length, live = img.live,
                              seen = img.seen, peak = img.peak;

    // Commit: copies and moves only.
    rows.pool.assign_free_list(std::move(free));
    std::copy(img.k.begin(), img.k.end(), rows.pool.k());
    std::copy(img.v.begin(), img.v.end(), rows.pool.v());
    std::copy(positions.begin(), positions.end(), rows.pool.position());
    if (rows.pool.score()) std::copy(img.score.begin(), img.score.end(), rows.pool.score());
    if (rows.pool.page_min()) {
      std::copy(img.page_min.begin(), img.page_min.end(), rows.pool.page_min());
      std::copy(img.page_max.begin(), img.page_max.end(), rows.pool.page_max());
    }
    rows.page_table.swap(page_table);
    rows.length.swap(length);
    rows.live.swap(live);
    rows.seen.swap(seen);
    rows.peak.swap(peak);
    rows.seqs.swap(seqs);
    std::int64_t total = 0;
    for (int s = 0; s < rows.cfg.max_sequences; ++s) {
      rows.active[std::size_t(s)] = img.active[std::size_t(s)] ? 1 : 0;
      if (rows.active[std::size_t(s)])
        for (int h = 0; h < H; ++h) total += rows.live[std::size_t(s * H + h)];
    }
    rows.live_total.store(total);
    rows.peak_total.raise_to(total);
  }
};

}  // namespace detail
DMS_NAMESPACE_END
