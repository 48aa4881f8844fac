// SPDX-License-Identifier: Apache-2.0
#pragma once

// The page pool of one layer: fixed-size pages of K/V storage plus the per-slot and per-page
// metadata that policies need, and a free list. Which free page a row gets is the pool's
// page_placement (dms/page_placement.hpp): LIFO by default, so a freed page is reused while it is
// still warm in cache, or next to the row's previous page. Exhaustion throws; nothing is ever
// overwritten.
//
// Thread safety: the free list is the one piece of state that every sequence of a cache shares,
// so allocate, release, reserve and the counts lock an internal mutex and may be called from any
// number of threads. A page's storage belongs to whoever holds the page. free_list() and
// assign_free_list() (cache images) need exclusive access to the pool.
//
// Reservations: reserve(n) sets n free pages aside (they stay on the free list, but only
// allocate(true) hands them out), so that a caller which has checked its capacity cannot lose the
// pages to another thread before it allocates them.

#include <cstddef>
#include <cstdint>
#include <limits>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

#include "dms/cache_config.hpp"
#include "dms/error.hpp"
#include "dms/numeric.hpp"
#include "dms/page_memory.hpp"
#include "dms/page_placement.hpp"
#include "dms/sync.hpp"

DMS_NAMESPACE_BEGIN

template <storage_type T>
class page_pool {
 public:
  /// with_scores: allocate one float score per slot; with_bounds: per-page key min/max (Quest).
  /// Checks the byte count against cache_config::max_pool_bytes first and turns an allocation
  /// failure into dms::error, so a too-large pool never surfaces as std::bad_alloc.
  page_pool(const cache_config& cfg, bool with_scores, bool with_bounds,
            page_placement placement = page_placement::stack)
      : page_size_(cfg.page_size),
        head_dim_(cfg.head_dim),
        max_pages_(cfg.max_pages),
        placement_(placement) {
    const std::int64_t bytes = cfg.pool_bytes(sizeof(T), with_scores, with_bounds);
    try {
      const auto slots = std::size_t(max_pages_) * page_size_;
      k_.resize(slots * head_dim_);
      v_.resize(slots * head_dim_);
      position_.assign(slots, -1);
      if (with_scores) score_.assign(slots, 0.0f);
      if (with_bounds) {
        page_min_.resize(std::size_t(max_pages_) * head_dim_);
        page_max_.resize(std::size_t(max_pages_) * head_dim_);
      }
      if (placement_ == page_placement::stack)
        free_.reserve(max_pages_);
      else
        free_set_ = detail::adjacent_free_set(max_pages_);
    } catch (const std::bad_alloc&) {
      detail::fail("cannot allocate the page pool: ", bytes,
                   " bytes (cache_config.max_pages = ", cfg.max_pages,
                   ", page_size = ", cfg.page_size, ", head_dim = ", cfg.head_dim, ")");
    }
    if (placement_ == page_placement::stack)
      for (int p = max_pages_ - 1; p >= 0; --p) free_.push_back(p);
  }

  page_pool(page_pool&&) noexcept = default;
  page_pool& operator=(page_pool&&) noexcept = default;

  [[nodiscard]] int capacity() const { return max_pages_; }
  [[nodiscard]] page_placement placement() const { return placement_; }
  /// Pages on the free list, reserved ones included.
  [[nodiscard]] int free_pages() const {
    std::lock_guard lock(mutex_.m);
    return free_count();
  }
  /// Free pages nobody has reserved: what allocate(false) can still hand out.
  [[nodiscard]] int available_pages() const {
    std::lock_guard lock(mutex_.m);
    return free_count() - reserved_;
  }
  [[nodiscard]] int pages_in_use() const { return max_pages_ - free_pages(); }

  /// Sets n free pages aside for allocate(true). False (and nothing reserved) if fewer than n are
  /// available.
  [[nodiscard]] bool try_reserve(int n) {
    std::lock_guard lock(mutex_.m);
    if (n < 0 || free_count() - reserved_ < n) return false;
    reserved_ += n;
    return true;
  }
  /// Returns n reserved pages to the unreserved free pages.
  void unreserve(int n) {
    std::lock_guard lock(mutex_.m);
    reserved_ -= n;
  }

  /// Takes a page off the free list (a reserved one if `reserved`); its slots are empty and its
  /// key bounds reset. `after` is the row's last page (-1: none), which page_placement::adjacent
  /// places the new one next to.
  [[nodiscard]] std::int32_t allocate(bool reserved = false, std::int32_t after = -1) {
    std::int32_t page;
    {
      std::lock_guard lock(mutex_.m);
      if (reserved ? reserved_ == 0 : free_count() - reserved_ == 0)
        detail::fail("page pool exhausted: all ", max_pages_,
                     " pages (cache_config.max_pages) are in use or reserved");
      if (placement_ == page_placement::stack) {
        page = free_.back();
        free_.pop_back();
      } else {
        page = free_set_.pick(after);
        free_set_.erase(page);
      }
      if (reserved) --reserved_;
    }
    const auto first = std::size_t(page) * page_size_;
    for (int s = 0; s < page_size_; ++s) position_[first + s] = -1;
    if (!page_min_.empty()) {
      const auto b = std::size_t(page) * head_dim_;
      for (int c = 0; c < head_dim_; ++c) {
        page_min_[b + c] = std::numeric_limits<float>::infinity();
        page_max_[b + c] = -std::numeric_limits<float>::infinity();
      }
    }
    return page;
  }

  /// Puts a page back on top of the free list; `reserved` keeps it set aside (undoing an
  /// allocate(true)).
  void release(std::int32_t page, bool reserved = false) {
    detail::check_range("page id", page, 0, max_pages_ - 1);
    std::lock_guard lock(mutex_.m);
    if (placement_ == page_placement::stack) {
      free_.push_back(page);
    } else {
      if (free_set_.contains(page)) detail::fail("page ", page, " is released twice");
      free_set_.insert(page);
    }
    if (reserved) ++reserved_;
  }

  /// The free list, bottom first: under page_placement::stack back() is the next page
  /// allocate() hands out; under adjacent it is the free pages, highest first.
  [[nodiscard]] std::vector<std::int32_t> free_list() const {
    return placement_ == page_placement::stack ? free_ : free_set_.to_list();
  }
  /// Replaces the free list (loading a cache image) and drops every reservation; the caller
  /// keeps it consistent (distinct pages in range, as step::check_image ensures). Does not throw.
  void assign_free_list(std::vector<std::int32_t>&& pages) noexcept {
    if (placement_ == page_placement::stack)
      free_ = std::move(pages);
    else
      free_set_.assign(pages);
    reserved_ = 0;
  }

  // Raw storage, laid out as documented on cache_view.
  T* k() { return k_.data(); }
  T* v() { return v_.data(); }
  std::int32_t* position() { return position_.data(); }
  float* score() { return score_.empty() ? nullptr : score_.data(); }
  float* page_min() { return page_min_.empty() ? nullptr : page_min_.data(); }
  float* page_max() { return page_max_.empty() ? nullptr : page_max_.data(); }
  const T* k() const { return k_.data(); }
  const T* v() const { return v_.data(); }
  const std::int32_t* position() const { return position_.data(); }
  const float* score() const { return score_.empty() ? nullptr : score_.data(); }
  const float* page_min() const { return page_min_.empty() ? nullptr : page_min_.data(); }
  const float* page_max() const { return page_max_.empty() ? nullptr : page_max_.data(); }

 private:
  int page_size_;
  int head_dim_;
  int max_pages_;
  page_placement placement_;
  std::vector<T, page_memory_allocator<T>> k_;  // huge pages where the OS gives them
  std::vector<T, page_memory_allocator<T>> v_;
  std::vector<std::int32_t> position_;
  std::vector<float> score_;
  std::vector<float> page_min_;
  std::vector<float> page_max_;
  [[nodiscard]] int free_count() const {
    return placement_ == page_placement::stack ? int(free_.size()) : free_set_.size();
  }

  std::vector<std::int32_t> free_;      // stack placement; guarded by mutex_
  detail::adjacent_free_set free_set_;  // adjacent placement; guarded by mutex_
  int reserved_ = 0;                    // guarded by mutex_
  mutable detail::movable_mutex mutex_;
};

DMS_NAMESPACE_END
