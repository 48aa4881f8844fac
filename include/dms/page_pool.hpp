// SPDX-License-Identifier: Apache-2.0
#pragma once

// The page pool of one layer: fixed-size pages of K/V storage plus the per-slot and per-page
// metadata that policies need, and a free list. Allocation order is LIFO so a freed page is
// reused while it is still warm in cache. Exhaustion throws; nothing is ever overwritten.

#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "dms/cache_config.hpp"
#include "dms/error.hpp"
#include "dms/numeric.hpp"

DMS_NAMESPACE_BEGIN

template <storage_type T>
class page_pool {
 public:
  /// with_scores: allocate one float score per slot; with_bounds: per-page key min/max (Quest).
  page_pool(const cache_config& cfg, bool with_scores, bool with_bounds)
      : page_size_(cfg.page_size), head_dim_(cfg.head_dim), max_pages_(cfg.max_pages) {
    const auto slots = std::size_t(max_pages_) * page_size_;
    k_.resize(slots * head_dim_);
    v_.resize(slots * head_dim_);
    position_.assign(slots, -1);
    if (with_scores) score_.assign(slots, 0.0f);
    if (with_bounds) {
      page_min_.resize(std::size_t(max_pages_) * head_dim_);
      page_max_.resize(std::size_t(max_pages_) * head_dim_);
    }
    free_.reserve(max_pages_);
    for (int p = max_pages_ - 1; p >= 0; --p) free_.push_back(p);
  }

  [[nodiscard]] int capacity() const { return max_pages_; }
  [[nodiscard]] int free_pages() const { return int(free_.size()); }
  [[nodiscard]] int pages_in_use() const { return max_pages_ - free_pages(); }

  /// Takes a page off the free list; its slots are empty and its key bounds reset.
  [[nodiscard]] std::int32_t allocate() {
    if (free_.empty())
      detail::fail("page pool exhausted: all ", max_pages_,
                   " pages (cache_config.max_pages) are in use");
    const std::int32_t page = free_.back();
    free_.pop_back();
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

  void release(std::int32_t page) {
    detail::check_range("page id", page, 0, max_pages_ - 1);
    free_.push_back(page);
  }

  /// The free list, bottom first: back() is the next page allocate() hands out.
  [[nodiscard]] const std::vector<std::int32_t>& free_list() const { return free_; }
  /// Replaces the free list (loading a cache image); the caller keeps it consistent.
  void assign_free_list(std::vector<std::int32_t> pages) {
    for (const auto p : pages) detail::check_range("free page id", p, 0, max_pages_ - 1);
    free_ = std::move(pages);
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
  std::vector<T> k_;
  std::vector<T> v_;
  std::vector<std::int32_t> position_;
  std::vector<float> score_;
  std::vector<float> page_min_;
  std::vector<float> page_max_;
  std::vector<std::int32_t> free_;
};

DMS_NAMESPACE_END
