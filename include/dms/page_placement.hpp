// SPDX-License-Identifier: Apache-2.0
#pragma once

// Where a row's next page comes from. Every engine appends a token to all KV heads of a sequence
// at once, so the rows of a batch cross their page boundaries in the same step and, taking pages
// off one LIFO stack in turn, a row's consecutive pages lie (heads x batch) pages apart in the
// pool. A CPU reader then starts a new stream every page (4 KiB of bf16 K at 16 slots x 128
// channels), which costs a plain read of the pages about a third of the bandwidth
// (docs/performance/cpu_fast_path.md). `adjacent` places a row's next page right after its
// previous one instead, so that a row is read in runs of many pages.
//
// The choice belongs to the host pool alone. It changes which page ids a row gets, never what a
// row holds: attention, eviction and every counter are the same under both
// (tests/test_page_placement.cpp checks it bit for bit). The batched decode step (dms/step/)
// and the device caches implement `stack`, the order the batched step's prefix sum reproduces;
// an image of a cache of either placement is a valid image for both, since it records the free
// pages, not how they are chosen.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "dms/config.hpp"

DMS_NAMESPACE_BEGIN

enum class page_placement {
  /// LIFO: the most recently freed page first, so a freed page is reused while it is still warm
  /// in cache. What the batched step and the device caches do.
  stack,
  /// A row's next page is the one after its previous page when that is free; else a new run
  /// starts in the middle of the longest run of free pages (at its start if it begins the pool),
  /// which leaves the row before that run and the new one the same room to grow: on an empty pool
  /// the rows of a batch spread out evenly and each reads as one run. A deterministic function of
  /// the set of free pages, and any free page can be handed out, so capacity is exactly that of
  /// `stack`.
  adjacent,
};

[[nodiscard]] constexpr const char* page_placement_name(page_placement p) {
  return p == page_placement::stack ? "stack" : "adjacent";
}

namespace detail {

/// The free pages of a pool under page_placement::adjacent, as a bitmap. Sized once; no
/// operation allocates or throws, so the cache's undo path (noexcept) can release pages into it.
/// A new run costs a scan of the bitmap, 64 pages per word where they are all free or all used.
class adjacent_free_set {
 public:
  adjacent_free_set() = default;
  /// All `pages` pages free.
  explicit adjacent_free_set(int pages) : pages_(pages), free_((std::size_t(pages) + 63) / 64, 0) {
    for (int p = 0; p < pages; ++p) insert(p);
  }

  [[nodiscard]] int size() const noexcept { return count_; }
  [[nodiscard]] bool contains(std::int32_t p) const noexcept {
    return p >= 0 && p < pages_ && (free_[std::size_t(p) / 64] >> (p % 64) & 1u);
  }

  /// Adds a page that is not in the set.
  void insert(std::int32_t p) noexcept {
    free_[std::size_t(p) / 64] |= std::uint64_t{1} << (p % 64);
    ++count_;
  }
  /// Removes a page that is in the set.
  void erase(std::int32_t p) noexcept {
    free_[std::size_t(p) / 64] &= ~(std::uint64_t{1} << (p % 64));
    --count_;
  }

  /// The page the adjacent rule hands to a row whose last page is `after` (-1: the row has
  /// none). The set must not be empty.
  [[nodiscard]] std::int32_t pick(std::int32_t after) const noexcept {
    if (after >= 0 && contains(after + 1)) return after + 1;
    // The longest run of free pages, the lowest of equal ones.
    int best = 0, best_length = 0, open = -1;
    const auto close = [&](int end) {
      if (open >= 0 && end - open > best_length) {
        best = open;
        best_length = end - open;
      }
      open = -1;
    };
    for (std::size_t w = 0; w < free_.size(); ++w) {
      const std::uint64_t bits = free_[w];
      const int base = int(w * 64);
      if (bits == ~std::uint64_t{0}) {
        if (open < 0) open = base;
      } else if (bits == 0) {
        close(base);
      } else {
        for (int b = 0; b < 64; ++b)
          if (bits >> b & 1u) {
            if (open < 0) open = base + b;
          } else {
            close(base + b);
          }
      }
    }
    close(pages_);  // bits past the last page are 0, so only a run that ends the pool is open
    return best == 0 ? 0 : best + best_length / 2;
  }

  /// The free pages, highest first (so that back(), the lowest, is what a LIFO reader of an
  /// image pops first).
  [[nodiscard]] std::vector<std::int32_t> to_list() const {
    std::vector<std::int32_t> list;
    list.reserve(std::size_t(count_));
    for (int p = pages_ - 1; p >= 0; --p)
      if (contains(p)) list.push_back(p);
    return list;
  }
  /// Replaces the contents with `list` (distinct page ids in range, as image checks ensure).
  void assign(const std::vector<std::int32_t>& list) noexcept {
    std::fill(free_.begin(), free_.end(), 0);
    count_ = 0;
    for (const std::int32_t p : list) insert(p);
  }

 private:
  int pages_ = 0;
  int count_ = 0;
  std::vector<std::uint64_t> free_;  // bit p: page p is free
};

}  // namespace detail

DMS_NAMESPACE_END
