// SPDX-License-Identifier: Apache-2.0
//
// GPU decode benchmarks (dms_bench_cuda). The shape of the issues' targets: one decode layer of a
// Qwen3-8B-like model, 8 KV heads x G = 4 (32 query heads), head_dim 128, bf16 K/V and queries,
// pages of 16 tokens. Every timed iteration starts with a flushed L2 (bench/cuda_bench_util.cuh).
//
//   decode/dense/batch:B/context:N     decode_attention over B sequences whose rows all hold N
//                                      tokens. kv_bytes_per_s counts the K and V bytes of the
//                                      live slots read; frac_of_read_roofline divides it by the
//                                      device's read roofline measured in the same run.
//   decode/dms/ratio:R/batch:B/context:N
//                                      the same with DMS-like rows: a row keeps N / R tokens on
//                                      average, but lengths are skewed per (sequence, head) the
//                                      way DMS leaves them (half the heads near the 512-token
//                                      window, the rest longer). Compare its time with
//                                      decode/dense at context N / R: the same kept tokens.
//   decode/quest/budget:K/batch:B/context:N
//                                      Quest: page selection (select_pages) + attention over the
//                                      selected pages. Bytes: the selected slots' K/V plus the
//                                      page bounds read for scoring.
//   decode/tova_scores/batch:B/context:N
//                                      decode_attention with the TOVA score fold (assign).
//   step_bookkeeping/<policy>/batch:B  append + score eviction for one step (DMS: ring victims;
//                                      H2O: arg-min over the row), no attention.
//
// The caches are built directly on the device (synthetic contents; the kernels' speed does not
// depend on the values), so shapes up to tens of GB need no host copies.

#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "cuda_bench_util.cuh"
#include "dms/cuda/bookkeeping.cuh"
#include "dms/cuda/decode_attention.cuh"
#include "dms/cuda/quest_select.cuh"
#include "dms/numeric.hpp"
#include "dms/policy/dms.hpp"
#include "dms/policy/h2o.hpp"
#include "dms/policy/quest.hpp"
#include "dms/step/cache_state.hpp"
#include "synthetic_cache.cuh"

namespace {

using dms_bench::fill_values;
using dms_bench::group;
using dms_bench::head_dim;
using dms_bench::kv_heads;
using dms_bench::kv_t;
using dms_bench::page;
using dms_bench::synthetic_cache;

// Bytes of K and V behind `slots` live slots.
double kv_bytes(std::int64_t slots) {
  return double(slots) * head_dim * 2.0 * sizeof(kv_t);
}

bool fits(int batch, int context, double ratio = 1.0) {
  // Stay well inside the H200's memory: K+V of every row, plus the scratch.
  return kv_bytes(std::int64_t(batch) * kv_heads * std::int64_t(context / ratio)) < 48e9;
}

void report(benchmark::State& state, double bytes, std::int64_t slots, int batch) {
  state.counters["kv_bytes_per_s"] = dms_bench::device_bytes_per_second(state, bytes);
  const double roof = dms_bench::device_read_roofline();
  if (roof > 0.0)
    state.counters["frac_of_read_roofline"] =
        benchmark::Counter(bytes * double(state.iterations()) / roof, benchmark::Counter::kIsRate);
  state.counters["live_slots"] = double(slots);
  state.counters["tokens_per_s"] =
      benchmark::Counter(double(batch) * double(state.iterations()), benchmark::Counter::kIsRate);
}

// Attention over `cache` with random bf16 queries; fold/page options as given.
void run_attention(benchmark::State& state, synthetic_cache& cache, int batch,
                   dms::cuda::decode_options opt, double bytes) {
  if (!dms_bench::cuda_ok(state, cache.error, "building the cache")) return;
  const std::size_t qn = std::size_t(batch) * kv_heads * group * head_dim;
  dms_bench::device_buffer<kv_t> q(qn), out(qn);
  fill_values<<<256, 256>>>(q.get(), qn, 3u, 0.0f);
  std::size_t temp_bytes = 0;
  if (!dms_bench::cuda_ok(
          state,
          dms::cuda::decode_attention(nullptr, temp_bytes, cache.view(), cache.ids.get(), batch,
                                      q.get(), out.get(), opt),
          "decode_attention (sizing)"))
    return;
  dms_bench::device_buffer<unsigned char> temp(std::max<std::size_t>(temp_bytes, 1));
  dms_bench::l2_flusher flush;
  const bool ok = dms_bench::timed_loop(state, flush, [&](cudaStream_t s) {
    return dms::cuda::decode_attention(temp.get(), temp_bytes, cache.view(), cache.ids.get(), batch,
                                       q.get(), out.get(), opt, s);
  });
  if (ok) report(state, bytes, cache.live_slots, batch);
}

void bm_dense(benchmark::State& state) {
  if (!dms_bench::require_device(state)) return;
  const int batch = int(state.range(0)), context = int(state.range(1));
  synthetic_cache cache(std::vector<std::int32_t>(std::size_t(batch) * kv_heads, context), batch,
                        context, 0, false, false, 0);
  run_attention(state, cache, batch, {}, kv_bytes(cache.live_slots));
}

void bm_dms(benchmark::State& state) {
  if (!dms_bench::require_device(state)) return;
  const int ratio = int(state.range(0)), batch = int(state.range(1)), context = int(state.range(2));
  synthetic_cache cache(dms_bench::dms_row_lengths(batch, context, ratio), batch, context, 0, false,
                        false, 0);
  run_attention(state, cache, batch, {}, kv_bytes(cache.live_slots));
}

void bm_tova_scores(benchmark::State& state) {
  if (!dms_bench::require_device(state)) return;
  const int batch = int(state.range(0)), context = int(state.range(1));
  synthetic_cache cache(std::vector<std::int32_t>(std::size_t(batch) * kv_heads, context), batch,
                        context, 0, true, false, 0);
  dms::cuda::decode_options opt;
  opt.fold = dms::score_update::assign;
  opt.score = cache.score.get();
  opt.max_pages = cache.st.max_pages;
  run_attention(state, cache, batch, opt, kv_bytes(cache.live_slots));
}

void bm_quest(benchmark::State& state) {
  if (!dms_bench::require_device(state)) return;
  const int budget = int(state.range(0)), batch = int(state.range(1)),
            context = int(state.range(2));
  synthetic_cache cache(std::vector<std::int32_t>(std::size_t(batch) * kv_heads, context), batch,
                        context, 0, false, true, 0);
  if (!dms_bench::cuda_ok(state, cache.error, "building the cache")) return;
  const dms::quest_device_policy policy{{}, budget, false};
  const int stride = std::min(policy.page_budget(page), cache.st.max_pages_per_row);
  const int rows = batch * kv_heads;
  const std::size_t qn = std::size_t(rows) * group * head_dim;
  dms_bench::device_buffer<kv_t> q(qn), out(qn);
  dms_bench::device_buffer<std::int32_t> pages(std::size_t(rows) * stride), counts(rows);
  fill_values<<<256, 256>>>(q.get(), qn, 3u, 0.0f);
  dms::cuda::decode_options opt;
  opt.pages = pages.get();
  opt.page_counts = counts.get();
  opt.page_stride = stride;
  std::size_t select_bytes = 0, attend_bytes = 0;
  if (!dms_bench::cuda_ok(
          state,
          dms::cuda::select_pages(nullptr, select_bytes, cache.view(), cache.ids.get(), batch,
                                  q.get(), policy, pages.get(), counts.get(), stride),
          "select_pages (sizing)") ||
      !dms_bench::cuda_ok(
          state,
          dms::cuda::decode_attention(nullptr, attend_bytes, cache.view(), cache.ids.get(), batch,
                                      q.get(), out.get(), opt),
          "decode_attention (sizing)"))
    return;
  dms_bench::device_buffer<unsigned char> t1(std::max<std::size_t>(select_bytes, 1)),
      t2(std::max<std::size_t>(attend_bytes, 1));
  dms_bench::l2_flusher flush;
  const bool ok = dms_bench::timed_loop(state, flush, [&](cudaStream_t s) {
    const cudaError_t e =
        dms::cuda::select_pages(t1.get(), select_bytes, cache.view(), cache.ids.get(), batch,
                                q.get(), policy, pages.get(), counts.get(), stride, s);
    if (e != cudaSuccess) return e;
    return dms::cuda::decode_attention(t2.get(), attend_bytes, cache.view(), cache.ids.get(), batch,
                                       q.get(), out.get(), opt, s);
  });
  const int read_pages = std::min(stride, (context + page - 1) / page);
  const double bytes = kv_bytes(std::int64_t(rows) * read_pages * page) +
                       double(rows) * ((context + page - 1) / page) * head_dim * 2.0 * 4.0;
  if (ok) report(state, bytes, cache.live_slots, batch);
}

template <class DevicePolicy>
void bookkeeping(benchmark::State& state, DevicePolicy policy, bool scores, int ring) {
  if (!dms_bench::require_device(state)) return;
  const int batch = int(state.range(0)), context = 4096;
  const int iterations_cap = 1 << 14;  // appends per benchmark: spare capacity for each
  synthetic_cache cache(std::vector<std::int32_t>(std::size_t(batch) * kv_heads, context), batch,
                        context + iterations_cap, batch * kv_heads * (iterations_cap / page + 1),
                        scores, false, ring);
  if (!dms_bench::cuda_ok(state, cache.error, "building the cache")) return;
  const std::size_t kn = std::size_t(batch) * kv_heads * head_dim;
  dms_bench::device_buffer<kv_t> k(kn), v(kn);
  dms_bench::device_buffer<float> logits(std::size_t(batch) * kv_heads);
  fill_values<<<256, 256>>>(k.get(), kn, 4u, 0.0f);
  fill_values<<<256, 256>>>(v.get(), kn, 5u, 0.0f);
  (void)cudaMemset(logits.get(), 0, logits.bytes());
  std::size_t temp_bytes = 0;
  (void)dms::cuda::append(nullptr, temp_bytes, cache.st, policy, cache.ids.get(), batch, k.get(),
                          v.get(), logits.get(), false);
  dms_bench::device_buffer<unsigned char> temp(temp_bytes);
  dms_bench::l2_flusher flush;
  const bool ok = dms_bench::timed_loop(state, flush, [&](cudaStream_t s) {
    const cudaError_t e =
        dms::cuda::append(temp.get(), temp_bytes, cache.st, policy, cache.ids.get(), batch, k.get(),
                          v.get(), logits.get(), false, s);
    if (e != cudaSuccess) return e;
    return dms::cuda::evict_after_attention(cache.st, policy, cache.ids.get(), batch, s);
  });
  state.counters["rows"] = double(batch) * kv_heads;
  (void)ok;
}

void bm_bookkeeping_dms(benchmark::State& state) {
  bookkeeping(state, dms::dms_device_policy{{}, 512}, false, 513);
}
void bm_bookkeeping_h2o(benchmark::State& state) {
  bookkeeping(state, dms::h2o_device_policy{{}, 4096, 256}, true, 0);
}

void dense_args(benchmark::internal::Benchmark* b) {
  for (const int batch : {1, 4, 16, 64})
    for (const int context : {1024, 4096, 16384, 32768, 131072})
      if (fits(batch, context)) b->Args({batch, context});
}
void dms_args(benchmark::internal::Benchmark* b) {
  for (const int ratio : {2, 4, 8})
    for (const int batch : {1, 4, 16, 64})
      for (const int context : {4096, 16384, 32768, 131072})
        if (fits(batch, context, ratio)) b->Args({ratio, batch, context});
}
void quest_args(benchmark::internal::Benchmark* b) {
  for (const int budget : {1024, 2048, 4096})
    for (const int batch : {1, 16})
      for (const int context : {16384, 32768})
        if (fits(batch, context)) b->Args({budget, batch, context});
}

}  // namespace

BENCHMARK(bm_dense)
    ->Name("decode/dense")
    ->ArgNames({"batch", "context"})
    ->Apply(dense_args)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(bm_dms)
    ->Name("decode/dms")
    ->ArgNames({"ratio", "batch", "context"})
    ->Apply(dms_args)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(bm_quest)
    ->Name("decode/quest")
    ->ArgNames({"budget", "batch", "context"})
    ->Apply(quest_args)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(bm_tova_scores)
    ->Name("decode/tova_scores")
    ->ArgNames({"batch", "context"})
    ->Args({16, 4096})
    ->Args({16, 16384})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(bm_bookkeeping_dms)
    ->Name("step_bookkeeping/dms")
    ->ArgNames({"batch"})
    ->Arg(1)
    ->Arg(16)
    ->Arg(64)
    ->Iterations(2000)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(bm_bookkeeping_h2o)
    ->Name("step_bookkeeping/h2o")
    ->ArgNames({"batch"})
    ->Arg(1)
    ->Arg(16)
    ->Arg(64)
    ->Iterations(2000)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
