// SPDX-License-Identifier: Apache-2.0
#pragma once

// The storage layer of paged_cache: the rows of (sequence, KV head) over the page pool -- page
// tables, lengths, the live / seen / peak counters, free-slot lists and the policy's state per
// row -- and the mechanics that change them a slot or a page at a time: take a slot, write it,
// free it, compact a row, give its pages back. Each mechanic records what it changes into an
// undo journal when it gets one (dms/cache_journal.hpp), and undo() replays it.
//
// It knows what a policy stores per row and whether the policy keeps key bounds, never when the
// policy's hooks run: that protocol and the argument checks (all but page_bound's page) belong
// to paged_cache (dms/paged_cache.hpp), which holds one of these privately. Its members are public
// for that reason: paged_cache, its row handles (dms/cache_handles.hpp) and detail::image_io
// (dms/cache_images.hpp) are its only users.

#include <algorithm>
#include <cstdint>
#include <memory>
#include <new>
#include <span>
#include <vector>

#include "dms/cache_config.hpp"
#include "dms/cache_journal.hpp"
#include "dms/cache_view.hpp"
#include "dms/config.hpp"
#include "dms/error.hpp"
#include "dms/numeric.hpp"
#include "dms/page_placement.hpp"
#include "dms/page_pool.hpp"
#include "dms/step/cache_image.hpp"
#include "dms/sync.hpp"

DMS_NAMESPACE_BEGIN
namespace detail {

template <storage_type T, class Policy>
struct cache_rows {
  using row_state = typename Policy::row_state;
  using journal = cache_journal<T, row_state>;

  /// What add_sequence allocates for a sequence id (kept for reuse after remove_sequence).
  struct sequence_storage {
    std::vector<std::vector<int>> holes;  // [num_kv_heads] free slots, refilled LIFO
    std::vector<row_state> state;         // [num_kv_heads] the policy's row state
    int reserved_pages = 0;               // pages the pool holds for this sequence
  };

  /// `config` must be valid for T and Policy (paged_cache validates it first). Allocates the pool
  /// and the per-row tables; a sequence's hole lists and row state wait for add_sequence.
  cache_rows(const cache_config& config, page_placement placement)
      : cfg(config), pool(cfg, Policy::keeps_scores, Policy::needs_page_bounds, placement) {
    const auto rows = std::size_t(cfg.max_rows());
    try {
      page_table.assign(rows * cfg.max_pages_per_row(), -1);
      length.assign(rows, 0);
      live.assign(rows, 0);
      seen.assign(rows, 0);
      peak.assign(rows, 0);
      seqs.resize(std::size_t(cfg.max_sequences));
      active.assign(std::size_t(cfg.max_sequences), 0);
    } catch (const std::bad_alloc&) {
      fail("cannot allocate the page tables of ", rows, " rows (cache_config.max_sequences", " = ",
           cfg.max_sequences, ", num_kv_heads = ", cfg.num_kv_heads, ")");
    }
  }

  cache_config cfg;
  page_pool<T> pool;                                    // its free list is locked inside
  std::vector<std::int32_t> page_table;                 // [max_rows][max_pages_per_row]
  std::vector<std::int32_t> length;                     // [max_rows]
  std::vector<std::int32_t> live;                       // [max_rows]
  std::vector<std::int32_t> seen;                       // [max_rows]
  std::vector<std::int32_t> peak;                       // [max_rows]
  std::vector<std::unique_ptr<sequence_storage>> seqs;  // [max_sequences], on first use
  std::vector<std::uint8_t> active;                     // [max_sequences]; bytes, not bits, so
                                                        // threads write distinct memory
  shared_counter live_total;                            // live slots of all rows
  shared_counter peak_total;                            // the maximum live_total has reached

  // ---- reading -------------------------------------------------------------------------

  cache_view<T> view() { return make_view<T>(*this); }
  cache_view<const T> view() const { return make_view<const T>(*this); }

  std::int32_t* table(int r) {
    return page_table.data() + std::size_t(r) * cfg.max_pages_per_row();
  }

  std::vector<int>& holes(int r) {
    return seqs[std::size_t(r / cfg.num_kv_heads)]->holes[std::size_t(r % cfg.num_kv_heads)];
  }
  const std::vector<int>& holes(int r) const {
    return seqs[std::size_t(r / cfg.num_kv_heads)]->holes[std::size_t(r % cfg.num_kv_heads)];
  }
  row_state& state_of(int r) {
    return seqs[std::size_t(r / cfg.num_kv_heads)]->state[std::size_t(r % cfg.num_kv_heads)];
  }
  const row_state& state_of(int r) const {
    return seqs[std::size_t(r / cfg.num_kv_heads)]->state[std::size_t(r % cfg.num_kv_heads)];
  }

  std::int32_t slot_position(int r, int slot) const {
    return pool.position()[view().slot_index(r, slot)];
  }
  float slot_score(int r, int slot) const {
    const float* sc = pool.score();
    return sc ? sc[view().slot_index(r, slot)] : 0.0f;
  }
  /// The key bounds of a row's page (null without them); the page is checked.
  const float* page_bound(int r, int logical_page, bool upper) const {
    const float* base = upper ? pool.page_max() : pool.page_min();
    if (!base) return nullptr;
    const auto vw = view();
    check_range("page", logical_page, 0, vw.num_pages(r) - 1);
    return base + std::size_t(vw.page(r, logical_page)) * cfg.head_dim;
  }

  /// Flat pool index of a row's slot in an image (the image's own page table).
  static std::int64_t image_slot_index(const cache_image<T>& img, int r, int slot) {
    const auto& c = img.config;
    const std::int32_t page =
        img.page_table[std::size_t(r) * c.max_pages_per_row() + std::size_t(slot / c.page_size)];
    return std::int64_t{page} * c.page_size + slot % c.page_size;
  }

  // ---- changing, one slot or page at a time ----------------------------------------------

  // A hole is refilled before the row grows, so rows stay dense in steady-state decode. A new
  // page comes out of what the caller reserved.
  int take_slot(int r, journal* j) {
    auto& hl = holes(r);
    if (!hl.empty()) {
      const int slot = hl.back();
      hl.pop_back();
      return slot;
    }
    const int slot = length[r];
    if (slot % cfg.page_size == 0) {
      auto* tbl = table(r);
      const int p = slot / cfg.page_size;
      const std::int32_t page = pool.allocate(true, p > 0 ? tbl[p - 1] : -1);
      if (j) j->allocated.push_back(page);
      tbl[p] = page;
    }
    ++length[r];
    return slot;
  }

  template <class In>
  void write_slot(int r, int slot, std::int32_t position, std::span<const In> k,
                  std::span<const In> v, journal* j) {
    if (j) journal_slot(*j, r, slot, true);
    auto vw = view();
    const std::int64_t at = vw.slot_index(r, slot);
    T* kd = vw.k + at * cfg.head_dim;
    T* vd = vw.v + at * cfg.head_dim;
    for (int c = 0; c < cfg.head_dim; ++c) {
      kd[c] = from_float<T>(to_float(k[c]));
      vd[c] = from_float<T>(to_float(v[c]));
    }
    vw.position[at] = position;
    if (vw.score) vw.score[at] = 0.0f;
    widen_bounds(r, slot, kd, j);
  }

  // Bounds only ever widen, so they stay valid upper/lower bounds for every key in the page,
  // also after a slot is overwritten or moved in.
  void widen_bounds(int r, int slot, const T* key, journal* j) {
    if constexpr (Policy::needs_page_bounds) {
      auto vw = view();
      const std::int32_t page = vw.page(r, slot / cfg.page_size);
      if (j) j->save_bounds(page, pool.page_min(), pool.page_max(), cfg.head_dim);
      float* lo = vw.page_min + std::int64_t{page} * cfg.head_dim;
      float* hi = vw.page_max + std::int64_t{page} * cfg.head_dim;
      for (int c = 0; c < cfg.head_dim; ++c) {
        const float x = to_float(key[c]);
        lo[c] = std::min(lo[c], x);
        hi[c] = std::max(hi[c], x);
      }
    } else {
      (void)r, (void)slot, (void)key, (void)j;
    }
  }

  /// Turns a live slot into a hole (the caller has checked that it is live and told the policy).
  void clear_slot(int r, int slot, journal* j) {
    auto vw = view();
    const std::int64_t at = vw.slot_index(r, slot);
    vw.position[at] = -1;
    if (vw.score) vw.score[at] = 0.0f;
    holes(r).push_back(slot);
    --live[r];
    live_total.add(-1);
    if (j) --j->live_delta;
  }

  /// Moves the highest live slots into the lowest holes until the row is dense, then returns
  /// the pages past its end to the pool. on_move(from, to) hears about every move (DMS keeps
  /// slot ids).
  template <class OnMove>
  void compact(int r, journal* j, OnMove&& on_move) {
    if (j) journal_touch(*j, r);
    auto& hl = holes(r);
    std::sort(hl.begin(), hl.end());
    auto vw = view();
    int hi = length[r] - 1;
    for (const int hole : hl) {
      while (hi > hole && slot_position(r, hi) < 0) --hi;
      if (hi <= hole) break;
      if (j) {
        journal_slot(*j, r, hole, true);
        journal_slot(*j, r, hi, false);
      }
      const std::int64_t from = vw.slot_index(r, hi), to = vw.slot_index(r, hole);
      std::copy_n(vw.k + from * cfg.head_dim, cfg.head_dim, vw.k + to * cfg.head_dim);
      std::copy_n(vw.v + from * cfg.head_dim, cfg.head_dim, vw.v + to * cfg.head_dim);
      vw.position[to] = vw.position[from];
      vw.position[from] = -1;
      if (vw.score) {
        vw.score[to] = vw.score[from];
        vw.score[from] = 0.0f;
      }
      widen_bounds(r, hole, vw.k + to * cfg.head_dim, j);
      on_move(hi, hole);
      --hi;
    }
    hl.clear();
    shrink_to(r, live[r], j);
  }

  /// Cuts a row to new_length slots; the pages past it go back to the pool, or, under a
  /// journal, once the call has succeeded (commit_journal).
  void shrink_to(int r, int new_length, journal* j) {
    const int keep_pages = (new_length + cfg.page_size - 1) / cfg.page_size;
    const int had_pages = (length[r] + cfg.page_size - 1) / cfg.page_size;
    auto* tbl = table(r);
    for (int p = keep_pages; p < had_pages; ++p) {
      if (j)
        j->released.push_back(tbl[p]);
      else
        pool.release(tbl[p]);
      tbl[p] = -1;
    }
    length[r] = new_length;
  }

  /// Empties a row for a sequence id's next use.
  void reset_row(int r) {
    // Positions of released pages are cleared when the pages are allocated again.
    holes(r).clear();
    live_total.add(-live[r]);
    shrink_to(r, 0, nullptr);
    live[r] = seen[r] = peak[r] = 0;
    state_of(r) = row_state{};
  }

  // ---- the undo journal ----------------------------------------------------------------

  /// Records a row at its first touch in the call: counters, holes, page-table entries, state.
  void journal_touch(journal& j, int r) {
    if (j.has_row(r)) return;
    const int pages = view().num_pages(r);
    const auto* tbl = table(r);
    j.rows.push_back({r, length[r], live[r], seen[r], peak[r], holes(r),
                      std::vector<std::int32_t>(tbl, tbl + pages), state_of(r)});
  }
  void journal_slot(journal& j, int r, int slot, bool with_kv) {
    j.save_slot(view().slot_index(r, slot), pool.position(), pool.score(), pool.k(), pool.v(),
                cfg.head_dim, with_kv);
  }

  /// Restores what the journal recorded. Pages compaction wanted to free were never released.
  void undo(journal& j) noexcept {
    j.restore_slots(pool.position(), pool.score(), pool.k(), pool.v(), pool.page_min(),
                    pool.page_max(), cfg.head_dim);
    for (auto& b : j.rows) {
      auto* tbl = table(b.row);
      const int now = view().num_pages(b.row);
      for (int p = int(b.table.size()); p < now; ++p) tbl[p] = -1;
      std::copy(b.table.begin(), b.table.end(), tbl);
      length[b.row] = b.length;
      live[b.row] = b.live;
      seen[b.row] = b.seen;
      peak[b.row] = b.peak;
      holes(b.row) = std::move(b.holes);
      state_of(b.row) = std::move(b.state);
    }
    // Newest first, so the free list ends as it was; pages from the sequence's reservation go
    // back to it.
    for (int i = int(j.allocated.size()) - 1; i >= 0; --i)
      pool.release(j.allocated[std::size_t(i)], i < j.from_reservation);
    live_total.add(-j.live_delta);
  }
  /// The call succeeded: the pages it freed go back to the pool.
  void commit_journal(journal& j) {
    for (const std::int32_t page : j.released) pool.release(page);
  }

 private:
  // One body for both views; Self's constness picks the pool's const or mutable accessors.
  template <class V, class Self>
  static cache_view<V> make_view(Self& self) {
    const cache_config& c = self.cfg;
    return {self.pool.k(),          self.pool.v(),        self.pool.position(),
            self.pool.score(),      self.pool.page_min(), self.pool.page_max(),
            self.page_table.data(), self.length.data(),   c.num_kv_heads,
            c.group_size,           c.head_dim,           c.page_size,
            c.max_pages_per_row(),  c.max_rows()};
  }
};

}  // namespace detail
DMS_NAMESPACE_END
