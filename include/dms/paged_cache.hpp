// SPDX-License-Identifier: Apache-2.0
#pragma once

// One layer's KV cache on the host: rows of (sequence, KV head), each with its own page table,
// length and free-slot list, over a shared page pool. The policy decides evictions through the
// hooks of dms::policy; the cache owns the mechanics (slot reuse, paging, compaction, accounting)
// and guarantees that a call which throws leaves it unchanged.
//
// Three layers, one header each: this one is the interface and its protocol (argument checks,
// when the policy's hooks run, the journal that undoes a failed call); dms/cache_rows.hpp holds
// the rows and changes them a slot or a page at a time; dms/cache_handles.hpp is what the hooks
// see of a row and a sequence. Images (to_image, load_image) live in dms/cache_images.hpp.
//
// A decode step for one sequence is:   append(seq, k, v, logits)  -> attention -> finish_step(seq)
// A prompt is:                         prefill chunks (append with in_prompt) -> finish_prompt(seq)
// dms::reference::decode_step and dms::reference::prefill wrap both.
//
// Thread safety (the contract README.md "Threads" states for integrators):
//  * Calls that name a sequence -- append, finish_step, finish_prompt, reserve_pages,
//    release_reserved_pages, row, sequence, live_positions, the row accessors of that
//    sequence's rows, the handles they return, and dms::reference::decode_attention /
//    decode_step / prefill_chunk / prefill -- may run concurrently on different threads as long
//    as the threads name DIFFERENT sequences. The cache has no shared scratch; the page pool's
//    free list and the sequence table are guarded by internal mutexes, the read and slot
//    counters are atomic.
//  * add_sequence and remove_sequence may run concurrently with each other and with calls on
//    other sequences.
//  * Calls on the SAME sequence need external synchronization (one thread at a time).
//  * Whole-cache calls -- stats, sequences, to_image, load_image, view (and reading other
//    sequences' rows through a view), policy() mutation, move -- need exclusive access: no other
//    call may run on the cache meanwhile.
//
// A moved-from cache throws dms::error ("moved from") from every call but config() and policy()
// until a cache is moved into it.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "dms/cache_config.hpp"
#include "dms/cache_handles.hpp"
#include "dms/cache_images.hpp"
#include "dms/cache_journal.hpp"
#include "dms/cache_rows.hpp"
#include "dms/cache_view.hpp"
#include "dms/error.hpp"
#include "dms/numeric.hpp"
#include "dms/page_placement.hpp"
#include "dms/policy/dense.hpp"
#include "dms/policy/device_policy.hpp"
#include "dms/policy/policy.hpp"
#include "dms/step/cache_image.hpp"
#include "dms/sync.hpp"

DMS_NAMESPACE_BEGIN

/// Counters of a cache, summed over its rows. See the spec's "equal-footing comparison".
struct cache_stats {
  std::int64_t tokens_seen = 0;      // tokens appended, summed over live rows
  std::int64_t live_slots = 0;       // slots holding a token now
  std::int64_t peak_live_slots = 0;  // maximum of live_slots over the cache's life
  std::int64_t kv_token_reads = 0;   // slots read by decode attention, summed over steps and rows
  int pages_in_use = 0;
  /// 1 / mean over rows of (live slots / tokens seen), as the DMS reference reports it; 1 if empty.
  double compression_ratio = 1.0;
};

template <storage_type T, class Policy = dense_policy>
class paged_cache {
 public:
  using value_type = T;
  using policy_type = Policy;
  using row_state = typename Policy::row_state;

 private:
  using journal = detail::cache_journal<T, row_state>;
  friend struct detail::image_io;

 public:
  /// Handles given to policy hooks: one row, the rows of one sequence (dms/cache_handles.hpp).
  using row_ref = detail::cache_row_ref<paged_cache>;
  using sequence_ref = detail::cache_sequence_ref<paged_cache>;

  /// Validates cfg (and the policy against it: a DMS window or a budget that cannot fit in a row
  /// is an error here, not at the first full row) before anything is allocated. Per-sequence
  /// storage (hole lists, policy row state) is allocated by add_sequence, so an unused sequence
  /// slot costs a few bytes per row. `placement` chooses which free page a growing row gets
  /// (dms/page_placement.hpp): `adjacent` is for CPU readers, `stack` (the default) is what the
  /// batched step and the device caches reproduce page for page.
  explicit paged_cache(const cache_config& cfg, Policy policy = Policy{},
                       page_placement placement = page_placement::stack)
      : policy_((cfg.validate(sizeof(T), Policy::keeps_scores, Policy::needs_page_bounds),
                 policy.derived().check_config(cfg), std::move(policy))),
        rows_(cfg, placement) {}

  paged_cache(paged_cache&&) noexcept = default;
  paged_cache& operator=(paged_cache&&) noexcept = default;
  /// Move-only: a cache owns a layer's memory. to_image() / load_image() copy one.
  paged_cache(const paged_cache&) = delete;
  paged_cache& operator=(const paged_cache&) = delete;

  [[nodiscard]] const cache_config& config() const { return rows_.cfg; }
  [[nodiscard]] page_placement placement() const { return rows_.pool.placement(); }
  [[nodiscard]] Policy& policy() { return policy_; }
  [[nodiscard]] const Policy& policy() const { return policy_; }

  // ---- sequences -------------------------------------------------------------------------

  /// Adds an empty sequence and returns its id, the lowest free one in [0, max_sequences).
  int add_sequence() {
    check_usable();
    std::lock_guard lock(table_mutex_.m);
    const auto it = std::find(rows_.active.begin(), rows_.active.end(), std::uint8_t{0});
    if (it == rows_.active.end())
      detail::fail("cannot add a sequence: all ", rows_.cfg.max_sequences,
                   " sequence slots (cache_config.max_sequences) are in use");
    const int seq = int(it - rows_.active.begin());
    auto& st = rows_.seqs[std::size_t(seq)];
    if (!st) {
      auto fresh = std::make_unique<sequence_storage>();
      fresh->holes.resize(std::size_t(rows_.cfg.num_kv_heads));
      fresh->state.resize(std::size_t(rows_.cfg.num_kv_heads));
      st = std::move(fresh);
    }
    for (auto& s : st->state) {
      s = row_state{};
      policy_.derived().init_row(s);
    }
    *it = 1;
    return seq;
  }

  /// Frees every page of the sequence (and its reservation); its id may be handed out again.
  void remove_sequence(int seq) {
    check_sequence(seq);
    for (int h = 0; h < rows_.cfg.num_kv_heads; ++h) rows_.reset_row(row_index(seq, h));
    auto& st = *rows_.seqs[std::size_t(seq)];
    rows_.pool.unreserve(st.reserved_pages);
    st.reserved_pages = 0;
    std::lock_guard lock(table_mutex_.m);
    rows_.active[std::size_t(seq)] = 0;
  }

  [[nodiscard]] bool contains(int seq) const {
    check_usable();
    return seq >= 0 && seq < rows_.cfg.max_sequences && rows_.active[std::size_t(seq)] != 0;
  }
  [[nodiscard]] std::vector<int> sequences() const {
    check_usable();
    std::vector<int> ids;
    for (int s = 0; s < rows_.cfg.max_sequences; ++s)
      if (rows_.active[std::size_t(s)]) ids.push_back(s);
    return ids;
  }

  // ---- bookkeeping -----------------------------------------------------------------------

  /// Appends one token to every row of `seq`. k and v are [num_kv_heads][head_dim];
  /// decision_logits is [num_kv_heads] (required by policies that use them; others accept it
  /// empty or ignore it, so one driver can feed every policy).
  /// The policy may first name a slot to overwrite (DMS's delayed eviction, StreamingLLM).
  /// Throws, leaving the cache unchanged, on an unknown sequence, wrong sizes, a non-finite
  /// k, v or decision logit (one pass over them), a full row, a row that has seen 2^31 - 1
  /// tokens, or an exhausted page pool.
  template <class In>
  void append(int seq, std::span<const In> k, std::span<const In> v,
              std::span<const float> decision_logits = {}, bool in_prompt = false) {
    check_sequence(seq);
    const int H = rows_.cfg.num_kv_heads;
    const auto n = std::size_t(H) * rows_.cfg.head_dim;
    detail::check_size("append: k", k.size(), n);
    detail::check_size("append: v", v.size(), n);
    const auto as_float = [](In x) { return to_float(x); };
    detail::check_finite("append: k", k, 0, std::size_t(rows_.cfg.head_dim), 0, "sequence", seq,
                         as_float);
    detail::check_finite("append: v", v, 0, std::size_t(rows_.cfg.head_dim), 0, "sequence", seq,
                         as_float);
    if constexpr (Policy::uses_decision_logits) {
      detail::check_size("append: decision_logits", decision_logits.size(), std::size_t(H));
      for (int h = 0; h < H; ++h)
        if (!std::isfinite(decision_logits[h]))
          detail::fail("append: decision_logits[", h, "] = ", decision_logits[h],
                       " is not finite (sequence ", seq, ")");
    } else if (!decision_logits.empty()) {
      detail::check_size("append: decision_logits", decision_logits.size(), std::size_t(H));
    }

    // Phase 1: ask the policy and check capacity without touching anything. The victims live on
    // the stack: nothing in the cache is shared scratch (concurrent appends to other sequences).
    constexpr int small = 16;
    int victims_small[small];
    std::vector<int> victims_large;
    int* victims = victims_small;
    if (H > small) {
      victims_large.resize(std::size_t(H));
      victims = victims_large.data();
    }
    int pages_needed = 0;
    for (int h = 0; h < H; ++h) {
      const int r = row_index(seq, h);
      if (rows_.seen[r] == std::numeric_limits<std::int32_t>::max())
        detail::fail("append: row of sequence ", seq, ", kv head ", h, " has seen ", rows_.seen[r],
                     " tokens, the most a row can take (positions are int32, in [0, 2^31 - 2])");
      const token_info tok = token(r, decision_logits, h, in_prompt);
      const row_ref ref(this, r);
      const int victim = policy_.derived().choose_victim(ref, tok);
      if (victim != -1 &&
          (victim < 0 || victim >= rows_.length[r] || rows_.slot_position(r, victim) < 0))
        detail::fail("policy ", policy_.derived().name(), " chose victim slot ", victim,
                     " which is not a live slot of row ", r, " (length ", rows_.length[r], ")");
      victims[h] = victim;
      if (victim == -1 && rows_.holes(r).empty()) {
        if (rows_.length[r] >= rows_.cfg.max_row_slots)
          detail::fail("append: row of sequence ", seq, ", kv head ", h,
                       " is full: ", rows_.length[r],
                       " slots (cache_config.max_row_slots = ", rows_.cfg.max_row_slots, ")");
        if (rows_.length[r] % rows_.cfg.page_size == 0) ++pages_needed;
      }
    }
    // Pages: the sequence's reservation first, then the pool's unreserved pages, set aside now so
    // that no other thread can take them before phase 2.
    auto& st = *rows_.seqs[std::size_t(seq)];
    const int from_reservation = std::min(pages_needed, st.reserved_pages);
    if (!rows_.pool.try_reserve(pages_needed - from_reservation))
      detail::fail("page pool exhausted: append to sequence ", seq, " needs ", pages_needed,
                   " new pages, ", rows_.pool.available_pages() + from_reservation,
                   " of cache_config.max_pages = ", rows_.cfg.max_pages, " are free");
    st.reserved_pages -= from_reservation;

    // Phase 2: commit. Library policies' hooks cannot throw; a user policy's run under a journal
    // that restores the cache if one does.
    const auto commit = [&](journal* j) {
      for (int h = 0; h < H; ++h) {
        const int r = row_index(seq, h);
        if (j) rows_.journal_touch(*j, r);
        const token_info tok = token(r, decision_logits, h, in_prompt);
        if (victims[h] >= 0) evict(r, victims[h], j);
        const int slot = rows_.take_slot(r, j);
        rows_.write_slot(r, slot, tok.position,
                         k.subspan(std::size_t(h) * rows_.cfg.head_dim, rows_.cfg.head_dim),
                         v.subspan(std::size_t(h) * rows_.cfg.head_dim, rows_.cfg.head_dim), j);
        ++rows_.seen[r];
        ++rows_.live[r];
        rows_.peak[r] = std::max(rows_.peak[r], rows_.live[r]);
        row_ref ref(this, r, j);
        policy_.derived().on_append(ref, tok, slot);
      }
    };
    if constexpr (Policy::hooks_never_throw) {
      commit(nullptr);
    } else {
      journal j;
      j.from_reservation = from_reservation;
      try {
        commit(&j);
      } catch (...) {
        rows_.undo(j);
        rows_.pool.unreserve(pages_needed - from_reservation - j.fresh_from_pool());
        st.reserved_pages += from_reservation;
        throw;
      }
      rows_.commit_journal(j);
    }
    rows_.live_total.add(H);
    rows_.peak_total.raise_to(rows_.live_total.load());
  }

  template <class In>
  requires(!std::is_const_v<In>) void append(int seq, std::span<In> k, std::span<In> v,
                                             std::span<const float> decision_logits = {},
                                             bool in_prompt = false) {
    append(seq, std::span<const In>(k), std::span<const In>(v), decision_logits, in_prompt);
  }
  template <class In>
  void append(int seq, const std::vector<In>& k, const std::vector<In>& v,
              std::span<const float> decision_logits = {}, bool in_prompt = false) {
    append(seq, std::span<const In>(k), std::span<const In>(v), decision_logits, in_prompt);
  }

  /// Ends a decode step: the policy evicts with what attention left in the scores. If a user
  /// policy's hook throws, every eviction and compaction it made (and the row state it touched)
  /// is undone before the exception propagates.
  void finish_step(int seq) {
    check_sequence(seq);
    run_sequence_hook(seq, [&](sequence_ref& s) { policy_.derived().after_attention(s); });
  }

  /// Ends a prompt: training-free policies reduce it to their budget in one shot. Same guarantee
  /// as finish_step for a throwing hook.
  void finish_prompt(int seq) {
    check_sequence(seq);
    run_sequence_hook(seq, [&](sequence_ref& s) { policy_.derived().compress_prompt(s); });
  }

  /// Sets `pages` free pages aside for `seq`'s next appends, so that appends of other sequences
  /// on other threads cannot take them (a prefill reserves its chunk's pages up front). Adds to
  /// what the sequence holds already; throws, reserving nothing, if fewer pages are available.
  void reserve_pages(int seq, int pages) {
    check_sequence(seq);
    detail::check_range("reserve_pages: pages", pages, 0, rows_.cfg.max_pages);
    if (!rows_.pool.try_reserve(pages))
      detail::fail("page pool exhausted: sequence ", seq, " asks to reserve ", pages, " pages, ",
                   rows_.pool.available_pages(),
                   " of cache_config.max_pages = ", rows_.cfg.max_pages,
                   " are free and unreserved");
    rows_.seqs[std::size_t(seq)]->reserved_pages += pages;
  }
  /// Pages reserved for `seq` and not yet used.
  [[nodiscard]] int reserved_pages(int seq) const {
    check_sequence(seq);
    return rows_.seqs[std::size_t(seq)]->reserved_pages;
  }
  /// Gives the pages still reserved for `seq` back to the pool.
  void release_reserved_pages(int seq) { release_reserved_pages(seq, reserved_pages(seq)); }
  /// Gives `pages` of them back, in [0, reserved_pages(seq)].
  void release_reserved_pages(int seq, int pages) {
    check_sequence(seq);
    auto& st = *rows_.seqs[std::size_t(seq)];
    detail::check_range("release_reserved_pages: pages", pages, 0, st.reserved_pages);
    rows_.pool.unreserve(pages);
    st.reserved_pages -= pages;
  }
  /// Free pages nobody has reserved.
  [[nodiscard]] int available_pages() const {
    check_usable();
    return rows_.pool.available_pages();
  }

  // ---- rows ------------------------------------------------------------------------------

  [[nodiscard]] int row_index(int seq, int kv_head) const {
    detail::check_range("kv_head", kv_head, 0, rows_.cfg.num_kv_heads - 1);
    return seq * rows_.cfg.num_kv_heads + kv_head;
  }
  row_ref row(int seq, int kv_head) {
    check_sequence(seq);
    return row_ref(this, row_index(seq, kv_head));
  }
  sequence_ref sequence(int seq) {
    check_sequence(seq);
    return sequence_ref(this, seq);
  }
  // Raw row indices r = seq * num_kv_heads + kv_head, checked against [0, max_rows); a row of a
  // sequence that is not active reads as empty.
  [[nodiscard]] int row_length(int row) const { return rows_.length[check_row(row)]; }
  [[nodiscard]] int row_live(int row) const { return rows_.live[check_row(row)]; }
  [[nodiscard]] int row_peak(int row) const { return rows_.peak[check_row(row)]; }
  [[nodiscard]] std::int32_t tokens_seen(int row) const { return rows_.seen[check_row(row)]; }
  [[nodiscard]] const row_state& state(int row) const {
    check_row(row);
    const auto& st = rows_.seqs[std::size_t(row / rows_.cfg.num_kv_heads)];
    if (!st || !rows_.active[std::size_t(row / rows_.cfg.num_kv_heads)]) {
      static const row_state empty{};
      return empty;
    }
    return st->state[std::size_t(row % rows_.cfg.num_kv_heads)];
  }

  /// Positions held by a row, in slot order (-1 for holes): for tests and debugging.
  [[nodiscard]] std::vector<std::int32_t> positions(int row) const {
    check_row(row);
    std::vector<std::int32_t> out(static_cast<std::size_t>(rows_.length[row]));
    for (int s = 0; s < rows_.length[row]; ++s) out[std::size_t(s)] = rows_.slot_position(row, s);
    return out;
  }

  /// The positions a row of `seq` holds, ascending (holes left out).
  [[nodiscard]] std::vector<std::int32_t> live_positions(int seq, int kv_head) const {
    check_sequence(seq);
    const int r = row_index(seq, kv_head);
    std::vector<std::int32_t> out;
    out.reserve(std::size_t(rows_.live[r]));
    for (int s = 0; s < rows_.length[r]; ++s)
      if (const std::int32_t p = rows_.slot_position(r, s); p >= 0) out.push_back(p);
    std::sort(out.begin(), out.end());
    return out;
  }

  /// Attention reports how many slots it read (the paper's "KV-cache token reads"); >= 0.
  void record_reads(std::int64_t slots) {
    check_usable();
    detail::check_range("record_reads: slots", slots, std::int64_t{0},
                        std::numeric_limits<std::int64_t>::max() - reads_.load());
    reads_.add(slots);
  }

  // ---- images: the flat interchange format of the device cache ---------------------------

  /// A copy of the whole cache in the flat layout of dms/step/cache_state.hpp.
  [[nodiscard]] cache_image<T> to_image() const { return detail::image_io::to_image(*this); }

  /// Replaces the whole cache by an image of the same configuration and policy (a device
  /// cache's download, say). The image is checked first (array sizes, page ids, every page
  /// either in exactly one row or free, hole lists, counters, positions, ring slots; see
  /// dms/step/image_check.hpp); a bad one throws dms::error naming what is wrong and leaves the
  /// cache unchanged. Reservations are dropped.
  void load_image(const cache_image<T>& img) { detail::image_io::load_image(*this, img); }

  // ---- views and accounting --------------------------------------------------------------

  cache_view<T> view() {
    check_usable();
    return rows_.view();
  }
  cache_view<const T> view() const {
    check_usable();
    return rows_.view();
  }

  [[nodiscard]] cache_stats stats() const {
    check_usable();
    cache_stats st;
    double ratio_sum = 0;
    int rows = 0;
    for (int s = 0; s < rows_.cfg.max_sequences; ++s) {
      if (!rows_.active[std::size_t(s)]) continue;
      for (int h = 0; h < rows_.cfg.num_kv_heads; ++h) {
        const int r = s * rows_.cfg.num_kv_heads + h;
        st.tokens_seen += rows_.seen[r];
        st.live_slots += rows_.live[r];
        if (rows_.seen[r] > 0) {
          ratio_sum += double(rows_.live[r]) / rows_.seen[r];
          ++rows;
        }
      }
    }
    st.peak_live_slots = rows_.peak_total.load();
    st.kv_token_reads = reads_.load();
    st.pages_in_use = rows_.pool.pages_in_use();
    st.compression_ratio = (rows > 0 && ratio_sum > 0) ? rows / ratio_sum : 1.0;
    return st;
  }

 private:
  using rows_type = detail::cache_rows<T, Policy>;
  using sequence_storage = typename rows_type::sequence_storage;
  friend row_ref;
  friend sequence_ref;

  template <class Hook>
  void run_sequence_hook(int seq, Hook hook) {
    if constexpr (Policy::hooks_never_throw) {
      sequence_ref s(this, seq, nullptr);
      hook(s);
    } else {
      journal j;
      sequence_ref s(this, seq, &j);
      try {
        hook(s);
      } catch (...) {
        rows_.undo(j);
        throw;
      }
      rows_.commit_journal(j);
    }
  }

  // Whether images carry the row state: only a policy with a device form packs it into a ring.
  static constexpr bool packs_row_state =
      has_device_form<Policy> && !std::is_same_v<row_state, no_row_state>;
  // Per-row ring of the policy's device form (0 for policies without one, or without state).
  int ring_length() const {
    if constexpr (packs_row_state) return policy_.device_form().ring_length();
    return 0;
  }
  static constexpr bool ring_has_flags() {
    if constexpr (has_device_form<Policy>) return device_form_t<Policy>::ring_flags;
    return false;
  }

  void check_usable() const {
    if (moved_.moved)
      detail::fail("this paged_cache was moved from; move or construct a cache into it first");
  }
  void check_sequence(int seq) const {
    check_usable();
    if (!(seq >= 0 && seq < rows_.cfg.max_sequences && rows_.active[std::size_t(seq)] != 0))
      detail::fail("unknown sequence id ", seq, " (valid: ids returned by add_sequence, in [0, ",
                   rows_.cfg.max_sequences - 1, "])");
  }
  int check_row(int row) const {
    check_usable();
    detail::check_range("row", row, 0, rows_.cfg.max_rows() - 1);
    return row;
  }
  void check_slot(int r, int slot, const char* what) const {
    if (slot < 0 || slot >= rows_.length[r])
      detail::fail(what, ": slot = ", slot, " is outside the valid range [0, ", rows_.length[r] - 1,
                   "] of row ", r);
  }

  token_info token(int r, std::span<const float> logits, int h, bool in_prompt) const {
    return {rows_.seen[r], logits.empty() ? 0.0f : logits[h], in_prompt};
  }

  // The policy hears about the eviction first (on_evict: DMS and StreamingLLM forget the slot,
  // so a user eviction cannot leave them pointing at a hole).
  void evict(int r, int slot, journal* j) {
    check_usable();
    if (slot < 0 || slot >= rows_.length[r] || rows_.slot_position(r, slot) < 0)
      detail::fail("evict: slot ", slot, " of row ", r, " is not live (row length ",
                   rows_.length[r], ")");
    if (j) {
      rows_.journal_touch(*j, r);
      rows_.journal_slot(*j, r, slot, false);
    }
    row_ref ref(this, r, j);
    policy_.derived().on_evict(ref, slot);
    rows_.clear_slot(r, slot, j);
  }

  // Makes the row dense and gives back the pages past its end; the policy hears about every
  // slot that moves (DMS keeps slot ids).
  void compact(int r, journal* j) {
    check_usable();
    row_ref ref(this, r, j);
    rows_.compact(r, j, [&](int from, int to) { policy_.derived().on_slot_moved(ref, from, to); });
  }

  Policy policy_;
  rows_type rows_;                     // the rows, their pages and their counters
  detail::movable_mutex table_mutex_;  // add_sequence / remove_sequence
  detail::shared_counter reads_;
  detail::moved_flag moved_;
};

DMS_NAMESPACE_END
