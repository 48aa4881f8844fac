// SPDX-License-Identifier: Apache-2.0
#pragma once

// How the CPU fast path runs its parallel work: one call, parallel_for(n, task), that runs
// task(0) ... task(n - 1) and returns when all have returned. An engine with its own thread pool
// implements `executor` over it (a dozen lines); dms::cpu::thread_pool (thread_pool.hpp) is the
// default, and inline_executor runs everything on the calling thread.
//
// The fast path's results never depend on the executor: work is split into items by a plan that
// only looks at the shapes, each item is computed the same way whichever thread runs it, and
// partial results are merged in a fixed order.

#include <cstddef>
#include <memory>
#include <type_traits>

#include "dms/config.hpp"

DMS_NAMESPACE_BEGIN
namespace cpu {

/// A non-owning reference to a callable `void(std::size_t)`, two pointers wide: the callable must
/// outlive the parallel_for it is passed to (it does when passed as a temporary's lvalue).
class task_ref {
 public:
  template <class F>
  requires(!std::is_same_v<std::remove_cvref_t<F>, task_ref>) task_ref(F& f)
  noexcept
      : obj_(const_cast<void*>(static_cast<const void*>(std::addressof(f)))),
        call_([](void* o, std::size_t i) { (*static_cast<F*>(o))(i); }) {}

  void operator()(std::size_t i) const { call_(obj_, i); }

 private:
  void* obj_;
  void (*call_)(void*, std::size_t);
};

/// The interface the fast path runs on.
class executor {
 public:
  virtual ~executor() = default;

  /// Threads that may run tasks at once (the caller's included); >= 1. No result depends on it:
  /// the decode only caps by it how many work items one task walks together, so that every
  /// thread gets some.
  [[nodiscard]] virtual int concurrency() const noexcept = 0;

  /// Runs task(i) exactly once for every i in [0, n), in any order and on any threads (the
  /// calling thread may take part), and returns when all calls have returned. Every write a task
  /// made must be visible to the caller afterwards. If tasks throw, the first exception is
  /// rethrown here after every task has finished. The fast path's own tasks never throw.
  virtual void parallel_for(std::size_t n, task_ref task) = 0;
};

/// Runs every task on the calling thread, in order.
class inline_executor final : public executor {
 public:
  [[nodiscard]] int concurrency() const noexcept override { return 1; }
  void parallel_for(std::size_t n, task_ref task) override {
    for (std::size_t i = 0; i < n; ++i) task(i);
  }
};

}  // namespace cpu
DMS_NAMESPACE_END
