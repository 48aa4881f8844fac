// SPDX-License-Identifier: Apache-2.0
#pragma once

// The default executor: a fixed pool of std::threads (standard library only; with glibc >= 2.34
// nothing needs linking, older toolchains need -pthread).
//
// A pool of N threads is N - 1 workers plus the thread that calls parallel_for, which takes part.
// Tasks are claimed one at a time from a shared counter, so uneven items balance. Between jobs
// the workers spin briefly (decode calls come back to back, layer after layer) and then sleep on
// an atomic wait (a futex on Linux), so an idle pool costs nothing.
//
// Thread safety: parallel_for may be called from any number of threads; jobs run one at a time
// in the order their callers get the pool's lock. A task that calls parallel_for on the pool it
// runs on gets its job run inline on its own thread (no deadlock, no extra parallelism).

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "dms/config.hpp"
#include "dms/cpu/executor.hpp"
#include "dms/error.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DMS_CPU_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define DMS_CPU_PAUSE() __asm__ __volatile__("yield")
#else
#define DMS_CPU_PAUSE() ((void)0)
#endif

DMS_NAMESPACE_BEGIN
namespace cpu {

class thread_pool final : public executor {
 public:
  /// threads: the pool's concurrency, caller included (1 = no workers; every job runs inline).
  explicit thread_pool(int threads) {
    ::dms::detail::check_range("thread_pool: threads", threads, 1, 1024);
    threads_ = threads;
    workers_.reserve(std::size_t(threads - 1));
    for (int i = 0; i + 1 < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
  }
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;

  ~thread_pool() override {
    stop_.store(true, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    for (auto& t : workers_) t.join();
  }

  [[nodiscard]] int concurrency() const noexcept override { return threads_; }

  void parallel_for(std::size_t n, task_ref task) override {
    if (n == 0) return;
    if (workers_.empty() || n == 1 || current_pool() == this) {
      for (std::size_t i = 0; i < n; ++i) task(i);
      return;
    }
    std::lock_guard<std::mutex> lock(submit_);
    task_ = &task;
    n_ = n;
    error_ = nullptr;
    next_.store(0, std::memory_order_relaxed);
    busy_.store(int(workers_.size()), std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);  // publishes the job
    generation_.notify_all();
    run_tasks();
    // Wait until every worker has checked in for this job, so none still holds `task`.
    for (int spin = 0; busy_.load(std::memory_order_acquire) != 0; ++spin) {
      if (spin < spin_limit) {
        DMS_CPU_PAUSE();
      } else {
        const int b = busy_.load(std::memory_order_acquire);
        if (b != 0) busy_.wait(b, std::memory_order_acquire);
      }
    }
    task_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  // Pause iterations before a waiting thread sleeps: some tens of microseconds, enough to catch
  // the next job of a decode loop without burning a core when the pool is idle.
  static constexpr int spin_limit = 1 << 12;

  static const thread_pool*& current_pool() {
    thread_local const thread_pool* pool = nullptr;
    return pool;
  }

  void run_tasks() noexcept {
    const thread_pool* outer = current_pool();
    current_pool() = this;
    for (;;) {
      const std::size_t i = next_.fetch_add(1, std::memory_order_relaxed);
      if (i >= n_) break;
      try {
        (*task_)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (!error_) error_ = std::current_exception();
      }
    }
    current_pool() = outer;
  }

  void worker_loop() {
    std::uint64_t seen = 0;
    for (;;) {
      std::uint64_t g = generation_.load(std::memory_order_acquire);
      for (int spin = 0; g == seen; ++spin) {
        if (spin < spin_limit) {
          DMS_CPU_PAUSE();
        } else {
          generation_.wait(seen, std::memory_order_acquire);
        }
        g = generation_.load(std::memory_order_acquire);
      }
      seen = g;
      if (stop_.load(std::memory_order_relaxed)) return;
      run_tasks();
      if (busy_.fetch_sub(1, std::memory_order_acq_rel) == 1) busy_.notify_all();
    }
  }

  int threads_ = 1;
  std::vector<std::thread> workers_;
  std::mutex submit_;  // one job at a time
  std::mutex error_mutex_;
  std::exception_ptr error_;
  task_ref* task_ = nullptr;
  std::size_t n_ = 0;
  std::atomic<std::size_t> next_{0};
  std::atomic<int> busy_{0};
  std::atomic<std::uint64_t> generation_{0};
  std::atomic<bool> stop_{false};
};

namespace detail {
/// DMS_CPU_THREADS if set (1 .. 1024), else the hardware's thread count.
inline int default_thread_count() {
  if (const char* env = std::getenv("DMS_CPU_THREADS")) {
    char* end = nullptr;
    const long v = std::strtol(env, &end, 10);
    if (end == env || *end != '\0' || v < 1 || v > 1024)
      ::dms::detail::fail("DMS_CPU_THREADS = \"", env,
                          "\" is outside the valid range [1, 1024] (a thread count)");
    return int(v);
  }
  return int(std::clamp(std::thread::hardware_concurrency(), 1u, 1024u));
}
}  // namespace detail

/// The pool the fast path uses when given no executor: created at first use with
/// DMS_CPU_THREADS or std::thread::hardware_concurrency() threads, joined at exit.
inline executor& default_executor() {
  static thread_pool pool(detail::default_thread_count());
  return pool;
}

}  // namespace cpu
DMS_NAMESPACE_END
