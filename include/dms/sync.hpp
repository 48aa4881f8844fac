// SPDX-License-Identifier: Apache-2.0
#pragma once

// Small members that let the cache be shared by threads and still be moved (paged_cache.hpp,
// page_pool.hpp): a mutex, a relaxed atomic counter, and the flag a move leaves in its source.
// Moving an object while another thread uses it is a data race anyway, so a move that hands the
// target a fresh mutex (or a plain copy of a counter) loses nothing.

#include <atomic>
#include <cstdint>
#include <mutex>

#include "dms/config.hpp"

DMS_NAMESPACE_BEGIN
namespace detail {

/// A mutex member that lets its owner be moved: the moved-to object gets a fresh mutex.
struct movable_mutex {
  std::mutex m;
  movable_mutex() = default;
  movable_mutex(movable_mutex&&) noexcept {}
  movable_mutex& operator=(movable_mutex&&) noexcept { return *this; }
};

/// An int64 counter that several threads bump. Relaxed: it is a statistic, nothing is ordered by
/// it.
struct shared_counter {
  std::atomic<std::int64_t> value{0};
  shared_counter() = default;
  shared_counter(shared_counter&& o) noexcept : value(o.load()) {}
  shared_counter& operator=(shared_counter&& o) noexcept {
    store(o.load());
    return *this;
  }
  [[nodiscard]] std::int64_t load() const { return value.load(std::memory_order_relaxed); }
  void store(std::int64_t x) { value.store(x, std::memory_order_relaxed); }
  void add(std::int64_t d) { value.fetch_add(d, std::memory_order_relaxed); }
  /// value = max(value, x), atomically.
  void raise_to(std::int64_t x) {
    std::int64_t cur = load();
    while (cur < x && !value.compare_exchange_weak(cur, x, std::memory_order_relaxed)) {
    }
  }
};

/// Set in the source of a move, so a moved-from object can say so instead of crashing.
struct moved_flag {
  bool moved = false;
  moved_flag() = default;
  moved_flag(moved_flag&& o) noexcept : moved(o.moved) { o.moved = true; }
  moved_flag& operator=(moved_flag&& o) noexcept {
    if (this != &o) {
      moved = o.moved;
      o.moved = true;
    }
    return *this;
  }
};

}  // namespace detail
DMS_NAMESPACE_END
