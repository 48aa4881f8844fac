// SPDX-License-Identifier: Apache-2.0
#pragma once

// One layer's KV cache on the host: rows of (sequence, KV head), each with its own page table,
// length and free-slot list, over a shared page pool. The policy decides evictions through the
// hooks of dms::policy; the cache owns the mechanics (slot reuse, paging, compaction, accounting)
// and guarantees that a call which throws leaves it unchanged.
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
#include <atomic>
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
#include "dms/cache_images.hpp"
#include "dms/cache_journal.hpp"
#include "dms/cache_view.hpp"
#include "dms/error.hpp"
#include "dms/numeric.hpp"
#include "dms/page_pool.hpp"
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
  /// Handle to one row, given to policy hooks. Cheap to copy; valid while the sequence lives.
  /// Slot and page arguments are checked (dms::error naming the value and the valid range).
  class row_ref {
   public:
    row_ref(paged_cache* cache, int row) : c_(cache), r_(row) {}
    [[nodiscard]] int index() const { return r_; }
    [[nodiscard]] int kv_head() const { return r_ % c_->cfg_.num_kv_heads; }
    [[nodiscard]] int length() const { return c_->length_[r_]; }
    [[nodiscard]] int live() const { return c_->live_[r_]; }
    [[nodiscard]] std::int32_t tokens_seen() const { return c_->seen_[r_]; }
    [[nodiscard]] int num_pages() const { return c_->view().num_pages(r_); }
    [[nodiscard]] int page_size() const { return c_->cfg_.page_size; }
    [[nodiscard]] int head_dim() const { return c_->cfg_.head_dim; }
    /// Token index held by `slot` in [0, length()), -1 for a hole.
    [[nodiscard]] std::int32_t position(int slot) const {
      c_->check_slot(r_, slot, "position");
      return c_->slot_position(r_, slot);
    }
    [[nodiscard]] float score(int slot) const {
      c_->check_slot(r_, slot, "score");
      return c_->slot_score(r_, slot);
    }
    /// The key / value stored in `slot` ([head_dim], storage type; dms::to_float converts).
    /// Keys are stored after RoPE. A hole's are leftovers.
    [[nodiscard]] std::span<const T> key(int slot) const {
      c_->check_slot(r_, slot, "key");
      return {c_->pool_.k() + c_->view().slot_index(r_, slot) * c_->cfg_.head_dim,
              std::size_t(c_->cfg_.head_dim)};
    }
    [[nodiscard]] std::span<const T> value(int slot) const {
      c_->check_slot(r_, slot, "value");
      return {c_->pool_.v() + c_->view().slot_index(r_, slot) * c_->cfg_.head_dim,
              std::size_t(c_->cfg_.head_dim)};
    }
    [[nodiscard]] const float* page_min(int page) const { return c_->page_bound(r_, page, false); }
    [[nodiscard]] const float* page_max(int page) const { return c_->page_bound(r_, page, true); }
    row_state& state() const {
      if (j_) c_->journal_touch(*j_, r_);
      return c_->state_of(r_);
    }
    void evict(int slot) const { c_->evict(r_, slot, j_); }
    void compact() const { c_->compact(r_, j_); }

   private:
    friend class paged_cache;
    row_ref(paged_cache* cache, int row, journal* j) : c_(cache), r_(row), j_(j) {}
    paged_cache* c_;
    int r_;
    journal* j_ = nullptr;  // set while a hook runs under finish_step / finish_prompt / append
  };

  /// Handle to the rows of one sequence (one per KV head), for sequence-level hooks.
  class sequence_ref {
   public:
    sequence_ref(paged_cache* cache, int seq) : sequence_ref(cache, seq, nullptr) {}
    [[nodiscard]] int id() const { return s_; }
    [[nodiscard]] int num_rows() const { return int(rows_.size()); }
    [[nodiscard]] int group_size() const { return c_->cfg_.group_size; }
    row_ref& row(int kv_head) {
      detail::check_range("kv_head", kv_head, 0, num_rows() - 1);
      return rows_[kv_head];
    }

   private:
    friend class paged_cache;
    sequence_ref(paged_cache* cache, int seq, journal* j) : c_(cache), s_(seq) {
      rows_.reserve(c_->cfg_.num_kv_heads);
      for (int h = 0; h < c_->cfg_.num_kv_heads; ++h)
        rows_.push_back(row_ref(c_, c_->row_index(s_, h), j));
    }
    paged_cache* c_;
    int s_;
    std::vector<row_ref> rows_;
  };

  /// Validates cfg (and the policy against it: a DMS window or a budget that cannot fit in a row
  /// is an error here, not at the first full row) before anything is allocated. Per-sequence
  /// storage (hole lists, policy row state) is allocated by add_sequence, so an unused sequence
  /// slot costs a few bytes per row. `placement` chooses which free page a growing row gets
  /// (dms/page_placement.hpp): `adjacent` is for CPU readers, `stack` (the default) is what the
  /// batched step and the device caches reproduce page for page.
  explicit paged_cache(const cache_config& cfg, Policy policy = Policy{},
                       page_placement placement = page_placement::stack)
      : cfg_((cfg.validate(sizeof(T), Policy::keeps_scores, Policy::needs_page_bounds), cfg)),
        policy_((policy.derived().check_config(cfg), std::move(policy))),
        pool_(cfg_, Policy::keeps_scores, Policy::needs_page_bounds, placement) {
    const auto rows = std::size_t(cfg_.max_rows());
    try {
      page_table_.assign(rows * cfg_.max_pages_per_row(), -1);
      length_.assign(rows, 0);
      live_.assign(rows, 0);
      seen_.assign(rows, 0);
      peak_.assign(rows, 0);
      seqs_.resize(std::size_t(cfg_.max_sequences));
      active_.assign(std::size_t(cfg_.max_sequences), 0);
    } catch (const std::bad_alloc&) {
      detail::fail("cannot allocate the page tables of ", rows, " rows (cache_config.max_sequences",
                   " = ", cfg_.max_sequences, ", num_kv_heads = ", cfg_.num_kv_heads, ")");
    }
  }

  paged_cache(paged_cache&&) noexcept = default;
  paged_cache& operator=(paged_cache&&) noexcept = default;
  /// Move-only: a cache owns a layer's memory. to_image() / load_image() copy one.
  paged_cache(const paged_cache&) = delete;
  paged_cache& operator=(const paged_cache&) = delete;

  [[nodiscard]] const cache_config& config() const { return cfg_; }
  [[nodiscard]] page_placement placement() const { return pool_.placement(); }
  [[nodiscard]] Policy& policy() { return policy_; }
  [[nodiscard]] const Policy& policy() const { return policy_; }

  // ---- sequences -------------------------------------------------------------------------

  /// Adds an empty sequence and returns its id, the lowest free one in [0, max_sequences).
  int add_sequence() {
    check_usable();
    std::lock_guard lock(table_mutex_.m);
    const auto it = std::find(active_.begin(), active_.end(), std::uint8_t{0});
    if (it == active_.end())
      detail::fail("cannot add a sequence: all ", cfg_.max_sequences,
                   " sequence slots (cache_config.max_sequences) are in use");
    const int seq = int(it - active_.begin());
    auto& st = seqs_[std::size_t(seq)];
    if (!st) {
      auto fresh = std::make_unique<sequence_storage>();
      fresh->holes.resize(std::size_t(cfg_.num_kv_heads));
      fresh->state.resize(std::size_t(cfg_.num_kv_heads));
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
    for (int h = 0; h < cfg_.num_kv_heads; ++h) reset_row(row_index(seq, h));
    auto& st = *seqs_[std::size_t(seq)];
    pool_.unreserve(st.reserved_pages);
    st.reserved_pages = 0;
    std::lock_guard lock(table_mutex_.m);
    active_[std::size_t(seq)] = 0;
  }

  [[nodiscard]] bool contains(int seq) const {
    check_usable();
    return seq >= 0 && seq < cfg_.max_sequences && active_[std::size_t(seq)] != 0;
  }
  [[nodiscard]] std::vector<int> sequences() const {
    check_usable();
    std::vector<int> ids;
    for (int s = 0; s < cfg_.max_sequences; ++s)
      if (active_[std::size_t(s)]) ids.push_back(s);
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
    const int H = cfg_.num_kv_heads;
    const auto n = std::size_t(H) * cfg_.head_dim;
    detail::check_size("append: k", k.size(), n);
    detail::check_size("append: v", v.size(), n);
    const auto as_float = [](In x) { return to_float(x); };
    detail::check_finite("append: k", k, 0, std::size_t(cfg_.head_dim), 0, "sequence", seq,
                         as_float);
    detail::check_finite("append: v", v, 0, std::size_t(cfg_.head_dim), 0, "sequence", seq,
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
      if (seen_[r] == std::numeric_limits<std::int32_t>::max())
        detail::fail("append: row of sequence ", seq, ", kv head ", h, " has seen ", seen_[r],
                     " tokens, the most a row can take (positions are int32, in [0, 2^31 - 2])");
      const token_info tok = token(r, decision_logits, h, in_prompt);
      const row_ref ref(this, r);
      const int victim = policy_.derived().choose_victim(ref, tok);
      if (victim != -1 && (victim < 0 || victim >= length_[r] || slot_position(r, victim) < 0))
        detail::fail("policy ", policy_.derived().name(), " chose victim slot ", victim,
                     " which is not a live slot of row ", r, " (length ", length_[r], ")");
      victims[h] = victim;
      if (victim == -1 && holes(r).empty()) {
        if (length_[r] >= cfg_.max_row_slots)
          detail::fail("append: row of sequence ", seq, ", kv head ", h, " is full: ", length_[r],
                       " slots (cache_config.max_row_slots = ", cfg_.max_row_slots, ")");
        if (length_[r] % cfg_.page_size == 0) ++pages_needed;
      }
    }
    // Pages: the sequence's reservation first, then the pool's unreserved pages, set aside now so
    // that no other thread can take them before phase 2.
    auto& st = *seqs_[std::size_t(seq)];
    const int from_reservation = std::min(pages_needed, st.reserved_pages);
    if (!pool_.try_reserve(pages_needed - from_reservation))
      detail::fail("page pool exhausted: append to sequence ", seq, " needs ", pages_needed,
                   " new pages, ", pool_.available_pages() + from_reservation,
                   " of cache_config.max_pages = ", cfg_.max_pages, " are free");
    st.reserved_pages -= from_reservation;

    // Phase 2: commit. Library policies' hooks cannot throw; a user policy's run under a journal
    // that restores the cache if one does.
    const auto commit = [&](journal* j) {
      for (int h = 0; h < H; ++h) {
        const int r = row_index(seq, h);
        if (j) journal_touch(*j, r);
        const token_info tok = token(r, decision_logits, h, in_prompt);
        if (victims[h] >= 0) evict(r, victims[h], j);
        const int slot = take_slot(r, j);
        write_slot(r, slot, tok.position, k.subspan(std::size_t(h) * cfg_.head_dim, cfg_.head_dim),
                   v.subspan(std::size_t(h) * cfg_.head_dim, cfg_.head_dim), j);
        ++seen_[r];
        ++live_[r];
        peak_[r] = std::max(peak_[r], live_[r]);
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
        undo(j);
        pool_.unreserve(pages_needed - from_reservation - j.fresh_from_pool());
        st.reserved_pages += from_reservation;
        throw;
      }
      commit_journal(j);
    }
    live_total_.add(H);
    peak_total_.raise_to(live_total_.load());
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
    detail::check_range("reserve_pages: pages", pages, 0, cfg_.max_pages);
    if (!pool_.try_reserve(pages))
      detail::fail("page pool exhausted: sequence ", seq, " asks to reserve ", pages, " pages, ",
                   pool_.available_pages(), " of cache_config.max_pages = ", cfg_.max_pages,
                   " are free and unreserved");
    seqs_[std::size_t(seq)]->reserved_pages += pages;
  }
  /// Pages reserved for `seq` and not yet used.
  [[nodiscard]] int reserved_pages(int seq) const {
    check_sequence(seq);
    return seqs_[std::size_t(seq)]->reserved_pages;
  }
  /// Gives the pages still reserved for `seq` back to the pool.
  void release_reserved_pages(int seq) { release_reserved_pages(seq, reserved_pages(seq)); }
  /// Gives `pages` of them back, in [0, reserved_pages(seq)].
  void release_reserved_pages(int seq, int pages) {
    check_sequence(seq);
    auto& st = *seqs_[std::size_t(seq)];
    detail::check_range("release_reserved_pages: pages", pages, 0, st.reserved_pages);
    pool_.unreserve(pages);
    st.reserved_pages -= pages;
  }
  /// Free pages nobody has reserved.
  [[nodiscard]] int available_pages() const {
    check_usable();
    return pool_.available_pages();
  }

  // ---- rows ------------------------------------------------------------------------------

  [[nodiscard]] int row_index(int seq, int kv_head) const {
    detail::check_range("kv_head", kv_head, 0, cfg_.num_kv_heads - 1);
    return seq * cfg_.num_kv_heads + kv_head;
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
  [[nodiscard]] int row_length(int row) const { return length_[check_row(row)]; }
  [[nodiscard]] int row_live(int row) const { return live_[check_row(row)]; }
  [[nodiscard]] int row_peak(int row) const { return peak_[check_row(row)]; }
  [[nodiscard]] std::int32_t tokens_seen(int row) const { return seen_[check_row(row)]; }
  [[nodiscard]] const row_state& state(int row) const {
    check_row(row);
    const auto& st = seqs_[std::size_t(row / cfg_.num_kv_heads)];
    if (!st || !active_[std::size_t(row / cfg_.num_kv_heads)]) {
      static const row_state empty{};
      return empty;
    }
    return st->state[std::size_t(row % cfg_.num_kv_heads)];
  }

  /// Positions held by a row, in slot order (-1 for holes): for tests and debugging.
  [[nodiscard]] std::vector<std::int32_t> positions(int row) const {
    check_row(row);
    std::vector<std::int32_t> out(static_cast<std::size_t>(length_[row]));
    for (int s = 0; s < length_[row]; ++s) out[std::size_t(s)] = slot_position(row, s);
    return out;
  }

  /// The positions a row of `seq` holds, ascending (holes left out).
  [[nodiscard]] std::vector<std::int32_t> live_positions(int seq, int kv_head) const {
    check_sequence(seq);
    const int r = row_index(seq, kv_head);
    std::vector<std::int32_t> out;
    out.reserve(std::size_t(live_[r]));
    for (int s = 0; s < length_[r]; ++s)
      if (const std::int32_t p = slot_position(r, s); p >= 0) out.push_back(p);
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
    return make_view<T>(*this);
  }
  cache_view<const T> view() const {
    check_usable();
    return make_view<const T>(*this);
  }

  [[nodiscard]] cache_stats stats() const {
    check_usable();
    cache_stats st;
    double ratio_sum = 0;
    int rows = 0;
    for (int s = 0; s < cfg_.max_sequences; ++s) {
      if (!active_[std::size_t(s)]) continue;
      for (int h = 0; h < cfg_.num_kv_heads; ++h) {
        const int r = s * cfg_.num_kv_heads + h;
        st.tokens_seen += seen_[r];
        st.live_slots += live_[r];
        if (seen_[r] > 0) {
          ratio_sum += double(live_[r]) / seen_[r];
          ++rows;
        }
      }
    }
    st.peak_live_slots = peak_total_.load();
    st.kv_token_reads = reads_.load();
    st.pages_in_use = pool_.pages_in_use();
    st.compression_ratio = (rows > 0 && ratio_sum > 0) ? rows / ratio_sum : 1.0;
    return st;
  }

 private:
  /// What add_sequence allocates for a sequence id (kept for reuse after remove_sequence).
  struct sequence_storage {
    std::vector<std::vector<int>> holes;  // [num_kv_heads] free slots, refilled LIFO
    std::vector<row_state> state;         // [num_kv_heads] the policy's row state
    int reserved_pages = 0;               // pages the pool holds for this sequence
  };

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
        undo(j);
        throw;
      }
      commit_journal(j);
    }
  }

  void journal_touch(journal& j, int r) {
    if (j.has_row(r)) return;
    const int pages = make_view<const T>(*this).num_pages(r);
    const auto* table = page_table_.data() + std::size_t(r) * cfg_.max_pages_per_row();
    j.rows.push_back({r, length_[r], live_[r], seen_[r], peak_[r], holes(r),
                      std::vector<std::int32_t>(table, table + pages), state_of(r)});
  }
  void journal_slot(journal& j, int r, int slot, bool with_kv) {
    j.save_slot(make_view<T>(*this).slot_index(r, slot), pool_.position(), pool_.score(), pool_.k(),
                pool_.v(), cfg_.head_dim, with_kv);
  }

  // Restores what the journal recorded. Pages compaction wanted to free were never released.
  void undo(journal& j) noexcept {
    j.restore_slots(pool_.position(), pool_.score(), pool_.k(), pool_.v(), pool_.page_min(),
                    pool_.page_max(), cfg_.head_dim);
    for (auto& b : j.rows) {
      auto* table = page_table_.data() + std::size_t(b.row) * cfg_.max_pages_per_row();
      const int now = make_view<const T>(*this).num_pages(b.row);
      for (int p = int(b.table.size()); p < now; ++p) table[p] = -1;
      std::copy(b.table.begin(), b.table.end(), table);
      length_[b.row] = b.length;
      live_[b.row] = b.live;
      seen_[b.row] = b.seen;
      peak_[b.row] = b.peak;
      holes(b.row) = std::move(b.holes);
      state_of(b.row) = std::move(b.state);
    }
    // Newest first, so the free list ends as it was; pages from the sequence's reservation go
    // back to it.
    for (int i = int(j.allocated.size()) - 1; i >= 0; --i)
      pool_.release(j.allocated[std::size_t(i)], i < j.from_reservation);
    live_total_.add(-j.live_delta);
  }
  void commit_journal(journal& j) {
    for (const std::int32_t page : j.released) pool_.release(page);
  }

  // One body for both views; Self's constness picks the pool's const or mutable accessors.
  template <class V, class Self>
  static cache_view<V> make_view(Self& self) {
    const cache_config& c = self.cfg_;
    return {self.pool_.k(),
            self.pool_.v(),
            self.pool_.position(),
            self.pool_.score(),
            self.pool_.page_min(),
            self.pool_.page_max(),
            self.page_table_.data(),
            self.length_.data(),
            c.num_kv_heads,
            c.group_size,
            c.head_dim,
            c.page_size,
            c.max_pages_per_row(),
            c.max_rows()};
  }

  static std::int64_t image_slot_index(const cache_image<T>& img, int r, int slot) {
    const auto& c = img.config;
    const std::int32_t page =
        img.page_table[std::size_t(r) * c.max_pages_per_row() + std::size_t(slot / c.page_size)];
    return std::int64_t{page} * c.page_size + slot % c.page_size;
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
    if (!(seq >= 0 && seq < cfg_.max_sequences && active_[std::size_t(seq)] != 0))
      detail::fail("unknown sequence id ", seq, " (valid: ids returned by add_sequence, in [0, ",
                   cfg_.max_sequences - 1, "])");
  }
  int check_row(int row) const {
    check_usable();
    detail::check_range("row", row, 0, cfg_.max_rows() - 1);
    return row;
  }
  void check_slot(int r, int slot, const char* what) const {
    if (slot < 0 || slot >= length_[r])
      detail::fail(what, ": slot = ", slot, " is outside the valid range [0, ", length_[r] - 1,
                   "] of row ", r);
  }

  std::vector<int>& holes(int r) {
    return seqs_[std::size_t(r / cfg_.num_kv_heads)]->holes[std::size_t(r % cfg_.num_kv_heads)];
  }
  const std::vector<int>& holes(int r) const {
    return seqs_[std::size_t(r / cfg_.num_kv_heads)]->holes[std::size_t(r % cfg_.num_kv_heads)];
  }
  row_state& state_of(int r) {
    return seqs_[std::size_t(r / cfg_.num_kv_heads)]->state[std::size_t(r % cfg_.num_kv_heads)];
  }
  const row_state& state_of(int r) const {
    return seqs_[std::size_t(r / cfg_.num_kv_heads)]->state[std::size_t(r % cfg_.num_kv_heads)];
  }

  token_info token(int r, std::span<const float> logits, int h, bool in_prompt) const {
    return {seen_[r], logits.empty() ? 0.0f : logits[h], in_prompt};
  }

  std::int32_t slot_position(int r, int slot) const {
    return pool_.position()[make_view<const T>(*this).slot_index(r, slot)];
  }
  float slot_score(int r, int slot) const {
    const float* sc = pool_.score();
    return sc ? sc[make_view<const T>(*this).slot_index(r, slot)] : 0.0f;
  }
  const float* page_bound(int r, int logical_page, bool upper) const {
    const float* base = upper ? pool_.page_max() : pool_.page_min();
    if (!base) return nullptr;
    const auto vw = make_view<const T>(*this);
    detail::check_range("page", logical_page, 0, vw.num_pages(r) - 1);
    return base + std::size_t(vw.page(r, logical_page)) * cfg_.head_dim;
  }

  // A hole is refilled before the row grows, so rows stay dense in steady-state decode. A new
  // page comes out of what append reserved.
  int take_slot(int r, journal* j) {
    auto& hl = holes(r);
    if (!hl.empty()) {
      const int slot = hl.back();
      hl.pop_back();
      return slot;
    }
    const int slot = length_[r];
    if (slot % cfg_.page_size == 0) {
      auto* table = page_table_.data() + std::size_t(r) * cfg_.max_pages_per_row();
      const int p = slot / cfg_.page_size;
      const std::int32_t page = pool_.allocate(true, p > 0 ? table[p - 1] : -1);
      if (j) j->allocated.push_back(page);
      table[p] = page;
    }
    ++length_[r];
    return slot;
  }

  template <class In>
  void write_slot(int r, int slot, std::int32_t position, std::span<const In> k,
                  std::span<const In> v, journal* j) {
    if (j) journal_slot(*j, r, slot, true);
    auto vw = make_view<T>(*this);
    const std::int64_t at = vw.slot_index(r, slot);
    T* kd = vw.k + at * cfg_.head_dim;
    T* vd = vw.v + at * cfg_.head_dim;
    for (int c = 0; c < cfg_.head_dim; ++c) {
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
      auto vw = make_view<T>(*this);
      const std::int32_t page = vw.page(r, slot / cfg_.page_size);
      if (j) j->save_bounds(page, pool_.page_min(), pool_.page_max(), cfg_.head_dim);
      float* lo = vw.page_min + std::int64_t{page} * cfg_.head_dim;
      float* hi = vw.page_max + std::int64_t{page} * cfg_.head_dim;
      for (int c = 0; c < cfg_.head_dim; ++c) {
        const float x = to_float(key[c]);
        lo[c] = std::min(lo[c], x);
        hi[c] = std::max(hi[c], x);
      }
    } else {
      (void)r, (void)slot, (void)key, (void)j;
    }
  }

  // The policy hears about the eviction first (on_evict: DMS and StreamingLLM forget the slot,
  // so a user eviction cannot leave them pointing at a hole).
  void evict(int r, int slot, journal* j) {
    check_usable();
    if (slot < 0 || slot >= length_[r] || slot_position(r, slot) < 0)
      detail::fail("evict: slot ", slot, " of row ", r, " is not live (row length ", length_[r],
                   ")");
    if (j) {
      journal_touch(*j, r);
      journal_slot(*j, r, slot, false);
    }
    row_ref ref(this, r, j);
    policy_.derived().on_evict(ref, slot);
    auto vw = make_view<T>(*this);
    const std::int64_t at = vw.slot_index(r, slot);
    vw.position[at] = -1;
    if (vw.score) vw.score[at] = 0.0f;
    holes(r).push_back(slot);
    --live_[r];
    live_total_.add(-1);
    if (j) --j->live_delta;
  }

  // Moves the highest live slots into the lowest holes until the row is dense, then returns
  // the pages past its end to the pool. The policy hears about every move (DMS keeps slot ids).
  void compact(int r, journal* j) {
    check_usable();
    if (j) journal_touch(*j, r);
    auto& hl = holes(r);
    std::sort(hl.begin(), hl.end());
    auto vw = make_view<T>(*this);
    int hi = length_[r] - 1;
    row_ref ref(this, r, j);
    for (const int hole : hl) {
      while (hi > hole && slot_position(r, hi) < 0) --hi;
      if (hi <= hole) break;
      if (j) {
        journal_slot(*j, r, hole, true);
        journal_slot(*j, r, hi, false);
      }
      const std::int64_t from = vw.slot_index(r, hi), to = vw.slot_index(r, hole);
      std::copy_n(vw.k + from * cfg_.head_dim, cfg_.head_dim, vw.k + to * cfg_.head_dim);
      std::copy_n(vw.v + from * cfg_.head_dim, cfg_.head_dim, vw.v + to * cfg_.head_dim);
      vw.position[to] = vw.position[from];
      vw.position[from] = -1;
      if (vw.score) {
        vw.score[to] = vw.score[from];
        vw.score[from] = 0.0f;
      }
      widen_bounds(r, hole, vw.k + to * cfg_.head_dim, j);
      policy_.derived().on_slot_moved(ref, hi, hole);
      --hi;
    }
    hl.clear();
    shrink_to(r, live_[r], j);
  }

  void shrink_to(int r, int new_length, journal* j) {
    const int keep_pages = (new_length + cfg_.page_size - 1) / cfg_.page_size;
    const int had_pages = (length_[r] + cfg_.page_size - 1) / cfg_.page_size;
    auto* table = page_table_.data() + std::size_t(r) * cfg_.max_pages_per_row();
    for (int p = keep_pages; p < had_pages; ++p) {
      if (j)
        j->released.push_back(table[p]);  // only once the call has succeeded
      else
        pool_.release(table[p]);
      table[p] = -1;
    }
    length_[r] = new_length;
  }

  void reset_row(int r) {
    // Positions of released pages are cleared when the pages are allocated again.
    holes(r).clear();
    live_total_.add(-live_[r]);
    shrink_to(r, 0, nullptr);
    live_[r] = seen_[r] = peak_[r] = 0;
    state_of(r) = row_state{};
  }

  cache_config cfg_;
  Policy policy_;
  page_pool<T> pool_;                                    // its free list is locked inside
  std::vector<std::int32_t> page_table_;                 // [max_rows][max_pages_per_row]
  std::vector<std::int32_t> length_;                     // [max_rows]
  std::vector<std::int32_t> live_;                       // [max_rows]
  std::vector<std::int32_t> seen_;                       // [max_rows]
  std::vector<std::int32_t> peak_;                       // [max_rows]
  std::vector<std::unique_ptr<sequence_storage>> seqs_;  // [max_sequences], on first use
  std::vector<std::uint8_t> active_;                     // [max_sequences]; bytes, not bits, so
                                                         // threads write distinct memory
  detail::movable_mutex table_mutex_;                    // add_sequence / remove_sequence
  detail::shared_counter live_total_;
  detail::shared_counter peak_total_;
  detail::shared_counter reads_;
  detail::moved_flag moved_;
};

DMS_NAMESPACE_END
