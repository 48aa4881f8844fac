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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "dms/cache_config.hpp"
#include "dms/cache_view.hpp"
#include "dms/error.hpp"
#include "dms/numeric.hpp"
#include "dms/page_pool.hpp"
#include "dms/policy/dense.hpp"
#include "dms/policy/device_policy.hpp"
#include "dms/policy/policy.hpp"
#include "dms/step/cache_image.hpp"

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

  /// Handle to one row, given to policy hooks. Cheap to copy; valid while the sequence lives.
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
    [[nodiscard]] std::int32_t position(int slot) const { return c_->slot_position(r_, slot); }
    [[nodiscard]] float score(int slot) const { return c_->slot_score(r_, slot); }
    [[nodiscard]] const float* page_min(int page) const { return c_->page_bound(r_, page, false); }
    [[nodiscard]] const float* page_max(int page) const { return c_->page_bound(r_, page, true); }
    row_state& state() const { return c_->state_[r_]; }
    void evict(int slot) const { c_->evict(r_, slot); }
    void compact() const { c_->compact(r_); }

   private:
    paged_cache* c_;
    int r_;
  };

  /// Handle to the rows of one sequence (one per KV head), for sequence-level hooks.
  class sequence_ref {
   public:
    sequence_ref(paged_cache* cache, int seq) : c_(cache), s_(seq) {
      rows_.reserve(c_->cfg_.num_kv_heads);
      for (int h = 0; h < c_->cfg_.num_kv_heads; ++h) rows_.emplace_back(c_, c_->row_index(s_, h));
    }
    [[nodiscard]] int id() const { return s_; }
    [[nodiscard]] int num_rows() const { return int(rows_.size()); }
    [[nodiscard]] int group_size() const { return c_->cfg_.group_size; }
    row_ref& row(int kv_head) { return rows_[kv_head]; }

   private:
    paged_cache* c_;
    int s_;
    std::vector<row_ref> rows_;
  };

  explicit paged_cache(const cache_config& cfg, Policy policy = Policy{})
      : cfg_((cfg.validate(), cfg)),
        policy_(std::move(policy)),
        pool_(cfg_, Policy::keeps_scores, Policy::needs_page_bounds) {
    (void)policy_.derived();  // checks the policy's required hooks at compile time
    const auto rows = std::size_t(cfg_.max_rows());
    page_table_.assign(rows * cfg_.max_pages_per_row(), -1);
    length_.assign(rows, 0);
    live_.assign(rows, 0);
    seen_.assign(rows, 0);
    peak_.assign(rows, 0);
    free_slots_.resize(rows);
    state_.resize(rows);
    active_.assign(cfg_.max_sequences, false);
  }

  [[nodiscard]] const cache_config& config() const { return cfg_; }
  [[nodiscard]] Policy& policy() { return policy_; }
  [[nodiscard]] const Policy& policy() const { return policy_; }

  // ---- sequences -------------------------------------------------------------------------

  /// Adds an empty sequence and returns its id, the lowest free one in [0, max_sequences).
  int add_sequence() {
    const auto it = std::find(active_.begin(), active_.end(), false);
    if (it == active_.end())
      detail::fail("cannot add a sequence: all ", cfg_.max_sequences,
                   " sequence slots (cache_config.max_sequences) are in use");
    const int seq = int(it - active_.begin());
    *it = true;
    for (int h = 0; h < cfg_.num_kv_heads; ++h) {
      const int r = row_index(seq, h);
      state_[r] = row_state{};
      policy_.derived().init_row(state_[r]);
    }
    return seq;
  }

  /// Frees every page of the sequence; its id may be handed out again.
  void remove_sequence(int seq) {
    check_sequence(seq);
    for (int h = 0; h < cfg_.num_kv_heads; ++h) reset_row(row_index(seq, h));
    active_[seq] = false;
  }

  [[nodiscard]] bool contains(int seq) const {
    return seq >= 0 && seq < cfg_.max_sequences && active_[seq];
  }
  [[nodiscard]] std::vector<int> sequences() const {
    std::vector<int> ids;
    for (int s = 0; s < cfg_.max_sequences; ++s)
      if (active_[s]) ids.push_back(s);
    return ids;
  }

  // ---- bookkeeping -----------------------------------------------------------------------

  /// Appends one token to every row of `seq`. k and v are [num_kv_heads][head_dim];
  /// decision_logits is [num_kv_heads] (required by policies that use them; others accept it
  /// empty or ignore it, so one driver can feed every policy).
  /// The policy may first name a slot to overwrite (DMS's delayed eviction, StreamingLLM).
  /// Throws, leaving the cache unchanged, on an unknown sequence, wrong sizes, a non-finite
  /// decision logit, a full row, or an exhausted page pool.
  template <class In>
  void append(int seq, std::span<const In> k, std::span<const In> v,
              std::span<const float> decision_logits = {}, bool in_prompt = false) {
    check_sequence(seq);
    const auto n = std::size_t(cfg_.num_kv_heads) * cfg_.head_dim;
    detail::check_size("append: k", k.size(), n);
    detail::check_size("append: v", v.size(), n);
    if constexpr (Policy::uses_decision_logits) {
      detail::check_size("append: decision_logits", decision_logits.size(),
                         std::size_t(cfg_.num_kv_heads));
      for (int h = 0; h < cfg_.num_kv_heads; ++h)
        if (!std::isfinite(decision_logits[h]))
          detail::fail("append: decision_logits[", h, "] = ", decision_logits[h],
                       " is not finite (sequence ", seq, ")");
    } else if (!decision_logits.empty()) {
      detail::check_size("append: decision_logits", decision_logits.size(),
                         std::size_t(cfg_.num_kv_heads));
    }

    // Phase 1: ask the policy and check capacity without touching anything.
    std::vector<int>& victims = scratch_;
    victims.assign(cfg_.num_kv_heads, -1);
    int pages_needed = 0;
    for (int h = 0; h < cfg_.num_kv_heads; ++h) {
      const int r = row_index(seq, h);
      const token_info tok = token(r, decision_logits, h, in_prompt);
      const row_ref ref(this, r);
      const int victim = policy_.derived().choose_victim(ref, tok);
      if (victim != -1 && (victim < 0 || victim >= length_[r] || slot_position(r, victim) < 0))
        detail::fail("policy ", policy_.derived().name(), " chose victim slot ", victim,
                     " which is not a live slot of row ", r, " (length ", length_[r], ")");
      victims[h] = victim;
      if (victim == -1 && free_slots_[r].empty()) {
        if (length_[r] >= cfg_.max_row_slots)
          detail::fail("append: row of sequence ", seq, ", kv head ", h, " is full: ", length_[r],
                       " slots (cache_config.max_row_slots = ", cfg_.max_row_slots, ")");
        if (length_[r] % cfg_.page_size == 0) ++pages_needed;
      }
    }
    if (pages_needed > pool_.free_pages())
      detail::fail("page pool exhausted: append to sequence ", seq, " needs ", pages_needed,
                   " new pages, ", pool_.free_pages(),
                   " of cache_config.max_pages = ", cfg_.max_pages, " are free");

    // Phase 2: commit.
    for (int h = 0; h < cfg_.num_kv_heads; ++h) {
      const int r = row_index(seq, h);
      const token_info tok = token(r, decision_logits, h, in_prompt);
      if (victims[h] >= 0) evict(r, victims[h]);
      const int slot = take_slot(r);
      write_slot(r, slot, tok.position, k.subspan(std::size_t(h) * cfg_.head_dim, cfg_.head_dim),
                 v.subspan(std::size_t(h) * cfg_.head_dim, cfg_.head_dim));
      ++seen_[r];
      ++live_[r];
      peak_[r] = std::max(peak_[r], live_[r]);
      row_ref ref(this, r);
      policy_.derived().on_append(ref, tok, slot);
    }
    live_total_ += cfg_.num_kv_heads;
    peak_total_ = std::max(peak_total_, live_total_);
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

  /// Ends a decode step: the policy evicts with what attention left in the scores.
  void finish_step(int seq) {
    check_sequence(seq);
    sequence_ref s(this, seq);
    policy_.derived().after_attention(s);
  }

  /// Ends a prompt: training-free policies reduce it to their budget in one shot.
  void finish_prompt(int seq) {
    check_sequence(seq);
    sequence_ref s(this, seq);
    policy_.derived().compress_prompt(s);
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
  [[nodiscard]] int row_length(int row) const { return length_[row]; }
  [[nodiscard]] int row_live(int row) const { return live_[row]; }
  [[nodiscard]] int row_peak(int row) const { return peak_[row]; }
  [[nodiscard]] std::int32_t tokens_seen(int row) const { return seen_[row]; }
  [[nodiscard]] const row_state& state(int row) const { return state_[row]; }

  /// Positions held by a row, in slot order (-1 for holes): for tests and debugging.
  [[nodiscard]] std::vector<std::int32_t> positions(int row) const {
    std::vector<std::int32_t> out(length_[row]);
    for (int s = 0; s < length_[row]; ++s) out[s] = slot_position(row, s);
    return out;
  }

  /// Attention reports how many slots it read (the paper's "KV-cache token reads").
  void record_reads(std::int64_t slots) { reads_ += slots; }

  // ---- images: the flat interchange format of the device cache ---------------------------

  /// A copy of the whole cache in the flat layout of dms/step/cache_state.hpp.
  [[nodiscard]] cache_image<T> to_image() const {
    const int ring = ring_length();
    cache_image<T> img(cfg_, Policy::keeps_scores, Policy::needs_page_bounds, ring,
                       ring_has_flags());
    img.k.assign(pool_.k(), pool_.k() + img.k.size());
    img.v.assign(pool_.v(), pool_.v() + img.v.size());
    img.position.assign(pool_.position(), pool_.position() + img.position.size());
    if (pool_.score()) img.score.assign(pool_.score(), pool_.score() + img.score.size());
    if (pool_.page_min()) {
      img.page_min.assign(pool_.page_min(), pool_.page_min() + img.page_min.size());
      img.page_max.assign(pool_.page_max(), pool_.page_max() + img.page_max.size());
    }
    img.page_table = page_table_;
    img.row_length = length_;
    img.live = live_;
    img.seen = seen_;
    img.peak = peak_;
    auto st = img.state();
    for (int r = 0; r < cfg_.max_rows(); ++r) {
      // Thread the holes through `position`, bottom of the host stack first, so the image pops
      // them in the host's order.
      st.hole_head[r] = -1;
      for (const int slot : free_slots_[r]) {
        ++st.live[r];  // push_hole counts a live slot going away
        st.push_hole(r, slot);
      }
    }
    const auto& free = pool_.free_list();
    std::copy(free.begin(), free.end(), img.free_pages.begin());
    img.free_top = std::int32_t(free.size());
    for (int s = 0; s < cfg_.max_sequences; ++s) {
      img.active[s] = active_[s] ? 1 : 0;
      if constexpr (!std::is_same_v<row_state, no_row_state>) {
        if (!active_[s]) continue;
        for (int h = 0; h < cfg_.num_kv_heads; ++h) {
          const std::size_t r = std::size_t(row_index(s, h));
          policy_.pack_row_state(state_[r], img.ring_slot.data() + r * ring,
                                 img.ring_flag.empty() ? nullptr : img.ring_flag.data() + r * ring);
        }
      }
    }
    return img;
  }

  /// Replaces the whole cache by an image of the same configuration and policy (a device
  /// cache's download, say). Throws, leaving the cache unchanged, if the shapes differ.
  void load_image(const cache_image<T>& img) {
    if (!(img.config == cfg_))
      detail::fail("load_image: the image's cache_config differs from this cache's");
    if (img.ring_length != ring_length())
      detail::fail("load_image: image ring_length = ", img.ring_length, ", this policy needs ",
                   ring_length());
    if (img.free_top < 0 || img.free_top > cfg_.max_pages)
      detail::fail("load_image: free_top = ", img.free_top, " is outside [0, ", cfg_.max_pages,
                   "]");
    std::vector<std::int32_t> free(img.free_pages.begin(), img.free_pages.begin() + img.free_top);
    pool_.assign_free_list(std::move(free));
    std::copy(img.k.begin(), img.k.end(), pool_.k());
    std::copy(img.v.begin(), img.v.end(), pool_.v());
    std::copy(img.position.begin(), img.position.end(), pool_.position());
    if (pool_.score()) std::copy(img.score.begin(), img.score.end(), pool_.score());
    if (pool_.page_min()) {
      std::copy(img.page_min.begin(), img.page_min.end(), pool_.page_min());
      std::copy(img.page_max.begin(), img.page_max.end(), pool_.page_max());
    }
    page_table_ = img.page_table;
    length_ = img.row_length;
    live_ = img.live;
    seen_ = img.seen;
    peak_ = img.peak;
    live_total_ = 0;
    auto vw = view();
    for (int r = 0; r < cfg_.max_rows(); ++r) {
      // Walk the hole list top-down; the host stack wants it bottom first.
      auto& holes = free_slots_[r];
      holes.clear();
      for (int slot = img.hole_head[r]; slot >= 0;) {
        holes.push_back(slot);
        std::int32_t& p = vw.position[vw.slot_index(r, slot)];
        slot = p == -1 ? -1 : -2 - p;
        p = -1;
      }
      std::reverse(holes.begin(), holes.end());
      live_total_ += live_[r];
    }
    peak_total_ = std::max(peak_total_, live_total_);
    const int ring = ring_length();
    for (int s = 0; s < cfg_.max_sequences; ++s) {
      active_[s] = img.active[s] != 0;
      for (int h = 0; h < cfg_.num_kv_heads; ++h) {
        const std::size_t r = std::size_t(s) * cfg_.num_kv_heads + h;
        state_[r] = row_state{};
        if (!active_[s]) continue;
        policy_.derived().init_row(state_[r]);
        if constexpr (!std::is_same_v<row_state, no_row_state>)
          policy_.unpack_row_state(
              state_[r], img.ring_slot.data() + r * ring,
              img.ring_flag.empty() ? nullptr : img.ring_flag.data() + r * ring);
      }
    }
  }

  // ---- views and accounting --------------------------------------------------------------

  cache_view<T> view() { return make_view<T>(*this); }
  cache_view<const T> view() const { return make_view<const T>(*this); }

  [[nodiscard]] cache_stats stats() const {
    cache_stats st;
    double ratio_sum = 0;
    int rows = 0;
    for (int s = 0; s < cfg_.max_sequences; ++s) {
      if (!active_[s]) continue;
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
    st.peak_live_slots = peak_total_;
    st.kv_token_reads = reads_;
    st.pages_in_use = pool_.pages_in_use();
    st.compression_ratio = (rows > 0 && ratio_sum > 0) ? rows / ratio_sum : 1.0;
    return st;
  }

 private:
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

  // Per-row ring of the policy's device form (0 for policies without one, or without state).
  int ring_length() const {
    if constexpr (has_device_form<Policy> && !std::is_same_v<row_state, no_row_state>)
      return policy_.device_form().ring_length();
    return 0;
  }
  static constexpr bool ring_has_flags() {
    if constexpr (has_device_form<Policy>) return device_form_t<Policy>::ring_flags;
    return false;
  }

  void check_sequence(int seq) const {
    if (!contains(seq))
      detail::fail("unknown sequence id ", seq, " (valid: ids returned by add_sequence, in [0, ",
                   cfg_.max_sequences - 1, "])");
  }

  token_info token(int r, std::span<const float> logits, int h, bool in_prompt) const {
    return {seen_[r], logits.empty() ? 0.0f : logits[h], in_prompt};
  }

  std::int32_t slot_position(int r, int slot) const {
    return pool_.position()[view().slot_index(r, slot)];
  }
  float slot_score(int r, int slot) const {
    const float* sc = pool_.score();
    return sc ? sc[view().slot_index(r, slot)] : 0.0f;
  }
  const float* page_bound(int r, int logical_page, bool upper) const {
    const float* base = upper ? pool_.page_max() : pool_.page_min();
    if (!base) return nullptr;
    return base + std::size_t(view().page(r, logical_page)) * cfg_.head_dim;
  }

  // A hole is refilled before the row grows, so rows stay dense in steady-state decode.
  int take_slot(int r) {
    if (!free_slots_[r].empty()) {
      const int slot = free_slots_[r].back();
      free_slots_[r].pop_back();
      return slot;
    }
    const int slot = length_[r];
    if (slot % cfg_.page_size == 0)
      page_table_[std::size_t(r) * cfg_.max_pages_per_row() + slot / cfg_.page_size] =
          pool_.allocate();
    ++length_[r];
    return slot;
  }

  template <class In>
  void write_slot(int r, int slot, std::int32_t position, std::span<const In> k,
                  std::span<const In> v) {
    auto vw = view();
    const std::int64_t at = vw.slot_index(r, slot);
    T* kd = vw.k + at * cfg_.head_dim;
    T* vd = vw.v + at * cfg_.head_dim;
    for (int c = 0; c < cfg_.head_dim; ++c) {
      kd[c] = from_float<T>(to_float(k[c]));
      vd[c] = from_float<T>(to_float(v[c]));
    }
    vw.position[at] = position;
    if (vw.score) vw.score[at] = 0.0f;
    widen_bounds(r, slot, kd);
  }

  // Bounds only ever widen, so they stay valid upper/lower bounds for every key in the page,
  // also after a slot is overwritten or moved in.
  void widen_bounds(int r, int slot, const T* key) {
    if constexpr (Policy::needs_page_bounds) {
      auto vw = view();
      const std::int64_t page = vw.page(r, slot / cfg_.page_size);
      float* lo = vw.page_min + page * cfg_.head_dim;
      float* hi = vw.page_max + page * cfg_.head_dim;
      for (int c = 0; c < cfg_.head_dim; ++c) {
        const float x = to_float(key[c]);
        lo[c] = std::min(lo[c], x);
        hi[c] = std::max(hi[c], x);
      }
    } else {
      (void)r, (void)slot, (void)key;
    }
  }

  void evict(int r, int slot) {
    if (slot < 0 || slot >= length_[r] || slot_position(r, slot) < 0)
      detail::fail("evict: slot ", slot, " of row ", r, " is not live (row length ", length_[r],
                   ")");
    auto vw = view();
    const std::int64_t at = vw.slot_index(r, slot);
    vw.position[at] = -1;
    if (vw.score) vw.score[at] = 0.0f;
    free_slots_[r].push_back(slot);
    --live_[r];
    --live_total_;
  }

  // Moves the highest live slots into the lowest holes until the row is dense, then returns
  // the pages past its end to the pool. The policy hears about every move (DMS keeps slot ids).
  void compact(int r) {
    auto& holes = free_slots_[r];
    std::sort(holes.begin(), holes.end());
    auto vw = view();
    int hi = length_[r] - 1;
    row_ref ref(this, r);
    for (const int hole : holes) {
      while (hi > hole && slot_position(r, hi) < 0) --hi;
      if (hi <= hole) break;
      const std::int64_t from = vw.slot_index(r, hi), to = vw.slot_index(r, hole);
      std::copy_n(vw.k + from * cfg_.head_dim, cfg_.head_dim, vw.k + to * cfg_.head_dim);
      std::copy_n(vw.v + from * cfg_.head_dim, cfg_.head_dim, vw.v + to * cfg_.head_dim);
      vw.position[to] = vw.position[from];
      vw.position[from] = -1;
      if (vw.score) {
        vw.score[to] = vw.score[from];
        vw.score[from] = 0.0f;
      }
      widen_bounds(r, hole, vw.k + to * cfg_.head_dim);
      policy_.derived().on_slot_moved(ref, hi, hole);
      --hi;
    }
    holes.clear();
    shrink_to(r, live_[r]);
  }

  void shrink_to(int r, int new_length) {
    const int keep_pages = (new_length + cfg_.page_size - 1) / cfg_.page_size;
    const int had_pages = (length_[r] + cfg_.page_size - 1) / cfg_.page_size;
    auto* table = page_table_.data() + std::size_t(r) * cfg_.max_pages_per_row();
    for (int p = keep_pages; p < had_pages; ++p) {
      pool_.release(table[p]);
      table[p] = -1;
    }
    length_[r] = new_length;
  }

  void reset_row(int r) {
    // Positions of released pages are cleared when the pages are allocated again.
    free_slots_[r].clear();
    live_total_ -= live_[r];
    shrink_to(r, 0);
    live_[r] = seen_[r] = peak_[r] = 0;
    state_[r] = row_state{};
  }

  cache_config cfg_;
  Policy policy_;
  page_pool<T> pool_;
  std::vector<std::int32_t> page_table_;      // [max_rows][max_pages_per_row]
  std::vector<std::int32_t> length_;          // [max_rows]
  std::vector<std::int32_t> live_;            // [max_rows]
  std::vector<std::int32_t> seen_;            // [max_rows]
  std::vector<std::int32_t> peak_;            // [max_rows]
  std::vector<std::vector<int>> free_slots_;  // [max_rows] holes, refilled LIFO
  std::vector<row_state> state_;              // [max_rows]
  std::vector<bool> active_;                  // [max_sequences]
  std::vector<int> scratch_;
  std::int64_t live_total_ = 0;
  std::int64_t peak_total_ = 0;
  std::int64_t reads_ = 0;
};

DMS_NAMESPACE_END
