// SPDX-License-Identifier: Apache-2.0
#pragma once

// What a policy's hooks see of a paged_cache: a handle to one row and a handle to the rows of
// one sequence (paged_cache<T, P>::row_ref and ::sequence_ref are these). Cheap to copy; valid
// while the sequence lives. Slot and page arguments are checked (dms::error naming the value and
// the valid range). While a hook runs under a call that journals (a policy whose hooks may
// throw), the handle carries the call's journal, so that what the hook changes through it -- its
// row state, an eviction, a compaction -- is undone if the call fails.

#include <cstdint>
#include <span>
#include <vector>

#include "dms/cache_journal.hpp"
#include "dms/config.hpp"
#include "dms/error.hpp"

DMS_NAMESPACE_BEGIN
namespace detail {

template <class Cache>
class cache_sequence_ref;

template <class Cache>
class cache_row_ref {
  using T = typename Cache::value_type;
  using row_state = typename Cache::row_state;
  using journal = cache_journal<T, row_state>;

 public:
  cache_row_ref(Cache* cache, int row) : c_(cache), r_(row) {}
  [[nodiscard]] int index() const { return r_; }
  [[nodiscard]] int kv_head() const { return r_ % rows().cfg.num_kv_heads; }
  [[nodiscard]] int length() const { return rows().length[r_]; }
  [[nodiscard]] int live() const { return rows().live[r_]; }
  [[nodiscard]] std::int32_t tokens_seen() const { return rows().seen[r_]; }
  [[nodiscard]] int num_pages() const { return rows().view().num_pages(r_); }
  [[nodiscard]] int page_size() const { return rows().cfg.page_size; }
  [[nodiscard]] int head_dim() const { return rows().cfg.head_dim; }
  /// Token index held by `slot` in [0, length()), -1 for a hole.
  [[nodiscard]] std::int32_t position(int slot) const {
    c_->check_slot(r_, slot, "position");
    return rows().slot_position(r_, slot);
  }
  [[nodiscard]] float score(int slot) const {
    c_->check_slot(r_, slot, "score");
    return rows().slot_score(r_, slot);
  }
  /// The key / value stored in `slot` ([head_dim], storage type; dms::to_float converts).
  /// Keys are stored after RoPE. A hole's are leftovers.
  [[nodiscard]] std::span<const T> key(int slot) const {
    c_->check_slot(r_, slot, "key");
    const int d = rows().cfg.head_dim;
    return {rows().pool.k() + rows().view().slot_index(r_, slot) * d, std::size_t(d)};
  }
  [[nodiscard]] std::span<const T> value(int slot) const {
    c_->check_slot(r_, slot, "value");
    const int d = rows().cfg.head_dim;
    return {rows().pool.v() + rows().view().slot_index(r_, slot) * d, std::size_t(d)};
  }
  [[nodiscard]] const float* page_min(int page) const { return rows().page_bound(r_, page, false); }
  [[nodiscard]] const float* page_max(int page) const { return rows().page_bound(r_, page, true); }
  row_state& state() const {
    if (j_) rows().journal_touch(*j_, r_);
    return rows().state_of(r_);
  }
  void evict(int slot) const { c_->evict(r_, slot, j_); }
  void compact() const { c_->compact(r_, j_); }

 private:
  friend Cache;
  friend class cache_sequence_ref<Cache>;
  cache_row_ref(Cache* cache, int row, journal* j) : c_(cache), r_(row), j_(j) {}
  auto& rows() const { return c_->rows_; }
  Cache* c_;
  int r_;
  journal* j_ = nullptr;  // set while a hook runs under finish_step / finish_prompt / append
};

template <class Cache>
class cache_sequence_ref {
  using row_ref = cache_row_ref<Cache>;
  using journal = cache_journal<typename Cache::value_type, typename Cache::row_state>;

 public:
  cache_sequence_ref(Cache* cache, int seq) : cache_sequence_ref(cache, seq, nullptr) {}
  [[nodiscard]] int id() const { return s_; }
  [[nodiscard]] int num_rows() const { return int(rows_.size()); }
  [[nodiscard]] int group_size() const { return c_->config().group_size; }
  row_ref& row(int kv_head) {
    check_range("kv_head", kv_head, 0, num_rows() - 1);
    return rows_[std::size_t(kv_head)];
  }

 private:
  friend Cache;
  cache_sequence_ref(Cache* cache, int seq, journal* j) : c_(cache), s_(seq) {
    const int heads = c_->config().num_kv_heads;
    rows_.reserve(std::size_t(heads));
    for (int h = 0; h < heads; ++h) rows_.push_back(row_ref(c_, c_->row_index(s_, h), j));
  }
  Cache* c_;
  int s_;
  std::vector<row_ref> rows_;
};

}  // namespace detail
DMS_NAMESPACE_END
