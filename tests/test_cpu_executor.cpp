// SPDX-License-Identifier: Apache-2.0
// The executors of the CPU fast path: every index runs exactly once, writes are visible after
// parallel_for, exceptions come back to the caller, nested calls and concurrent callers work.
#include <atomic>
#include <catch2/catch.hpp>
#include <stdexcept>
#include <thread>
#include <vector>

#include "dms/cpu/executor.hpp"
#include "dms/cpu/thread_pool.hpp"

TEST_CASE("cpu executor: every task runs exactly once", "[cpu][executor]") {
  dms::cpu::inline_executor inl;
  dms::cpu::thread_pool p1(1), p2(2), p7(7);
  for (dms::cpu::executor* e : std::vector<dms::cpu::executor*>{&inl, &p1, &p2, &p7}) {
    INFO("concurrency " << e->concurrency());
    for (const std::size_t n : {0u, 1u, 2u, 7u, 1000u}) {
      std::vector<int> hits(n, 0);  // plain ints: parallel_for must publish the writes
      auto task = [&](std::size_t i) { hits[i] += 1; };
      for (int round = 0; round < 20; ++round) e->parallel_for(n, dms::cpu::task_ref(task));
      for (std::size_t i = 0; i < n; ++i) REQUIRE(hits[i] == 20);
    }
  }
  CHECK(p7.concurrency() == 7);
  CHECK(inl.concurrency() == 1);
  CHECK(dms::cpu::default_executor().concurrency() >= 1);
  CHECK_THROWS_WITH(dms::cpu::thread_pool(0), Catch::Contains("thread_pool: threads = 0"));
}

TEST_CASE("cpu executor: an exception reaches the caller after all tasks ran", "[cpu][executor]") {
  dms::cpu::thread_pool pool(4);
  std::atomic<int> ran{0};
  auto task = [&](std::size_t i) {
    ran.fetch_add(1);
    if (i == 13) throw std::runtime_error("task 13 failed");
  };
  CHECK_THROWS_WITH(pool.parallel_for(100, dms::cpu::task_ref(task)), "task 13 failed");
  CHECK(ran.load() == 100);
  // The pool is still usable.
  std::atomic<int> again{0};
  auto count = [&](std::size_t) { again.fetch_add(1); };
  pool.parallel_for(50, dms::cpu::task_ref(count));
  CHECK(again.load() == 50);
}

TEST_CASE("cpu executor: nested and concurrent parallel_for", "[cpu][executor]") {
  dms::cpu::thread_pool pool(3);
  std::atomic<int> total{0};
  auto inner = [&](std::size_t) { total.fetch_add(1); };
  auto outer = [&](std::size_t) { pool.parallel_for(10, dms::cpu::task_ref(inner)); };
  pool.parallel_for(8, dms::cpu::task_ref(outer));  // runs the inner jobs inline
  CHECK(total.load() == 80);

  std::atomic<int> sum{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 4; ++c)
    callers.emplace_back([&] {
      auto add = [&](std::size_t i) { sum.fetch_add(int(i)); };
      for (int r = 0; r < 50; ++r) pool.parallel_for(20, dms::cpu::task_ref(add));
    });
  for (auto& t : callers) t.join();
  CHECK(sum.load() == 4 * 50 * 190);
}
