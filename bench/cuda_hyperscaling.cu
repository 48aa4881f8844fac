// SPDX-License-Identifier: Apache-2.0
//
// Hyper-scaling benchmark (dms_bench_cuda): throughput of a whole decode step over a
// Qwen3-8B-shaped layer stack at a FIXED KV memory budget.
//
//   hyperscaling/<policy>/context:N     policy in {dense, dms4, dms8, tova, quest}, N in {8K, 32K}
//
// The stack: kLayers = 36 layers, each 8 KV heads x G = 4 (32 query heads), head_dim 128, bf16
// K/V/queries, pages of 16 tokens. One timed iteration is ONE decode step of B sequences through
// all 36 layers: per layer, dms::cuda::decode_step (append + [Quest: select_pages] + split-K
// attention + [TOVA: evict]), layer after layer on one stream, with the temporary storage sized
// once (two-phase) and allocated outside the timed loop. The L2 is flushed once per step, before
// the timed region (bench/cuda_bench_util.cuh's timed_loop); one layer's K/V is far larger than
// the 50 MB L2, so later layers of the same step find nothing of their own K/V in L2 either.
//
// Every layer has its own cache (kDistinctLayers = kLayers: 36 caches sharing nothing), built
// directly on the device with synthetic contents (the kernels' speed does not depend on values).
//
// How B is chosen. The budget kKvBudgetBytes (40 GiB by default) counts the K and V bytes of the
// pages every row holds in its steady state, summed over the 36 layers. Per row (one KV head of
// one sequence in one layer) the steady-state slots are:
//
//   dense    N (the context; every token kept and read)
//   dmsR     DMS-like per-head skew with mean ~N/R (dms_bench::dms_row_lengths): half the
//            heads hold the 512-token window + 1, the other half the rest, window 512. The ring is
//            prefilled with every entry but the newest flagged and the decision logits are all
//            positive, so each append overwrites the slot of the token leaving the window: rows
//            keep a constant length, as a DMS model in its steady state does.
//   tova     budget N/8 + 1: after each step's eviction a row holds N/8 tokens plus one hole that
//            the next append fills (the first, untimed step opens that extra slot's page).
//   quest    N: Quest keeps every token (same memory as dense) and reads a token budget of N/8.
//
// rounded up to whole pages, and B = floor(budget / (36 x bytes of one sequence's pages)). With
// the default 40 GiB (kv_gib in brackets; B is an integer, so compare tokens_per_s per kv_gib
// where the fill differs, e.g. dense at 32K uses 36 GiB):
//
//   context   dense        dms4          dms8          tova          quest
//   8192      35 (39.4)    141 (39.8)    282 (40.0)    280 (40.0)    35 (39.4)
//   32768      8 (36.0)     35 (39.4)     70 (39.5)     70 (39.5)     8 (36.0)
//
// The benchmark is pinned to kIterations iterations, so Google Benchmark names the runs
// hyperscaling/<policy>/context:N/iterations:30/manual_time. The counters:
//
//   sequences      B, the concurrent sequences that fit the budget
//   step_ms        time of one step through the 36 layers (= the benchmark's manual time)
//   tokens_per_s   B / step time: decode throughput of the stack (one token per sequence per step)
//   kv_gib         K/V bytes of the steady-state pages of all layers (GiB, <= the budget)
//   alloc_gib      every device byte of the 36 caches: K/V including the spare pages below, slot
//                  positions, page tables, TOVA scores, Quest page bounds (2 x 128 floats per page:
//                  +12.5% over the bf16 K/V), DMS rings. Not counted against the budget.
//   row_slots      mean steady-state slots per row (what attention reads, except Quest: N/8)
//
// The dense/quest rows grow by one token per step, so each row gets spare pages for every
// step a run makes (the benchmark is pinned to kIterations iterations, plus one untimed warm-up
// step): the spare is outside the budget and negligible (a few pages per row). After the loop
// every layer's sticky step status is checked; a failed step (e.g. pool exhausted) skips the
// benchmark with its reason. Ratios (DMS vs dense tokens_per_s at the same memory) are computed
// from the JSON later.
//
// Caveats: inputs (q, new k/v, logits) are the same device buffers in every layer; the step is
// enqueued from the host layer by layer (no CUDA graph), so at very small per-layer work the
// launch rate could show in step_ms; with these budgets every layer reads > 1 GiB of K/V (except
// Quest, which reads about 1/8 of that plus its page bounds), so the step is device-bound.

#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda_bench_util.cuh"
#include "dms/cuda/decode_step.cuh"
#include "dms/numeric.hpp"
#include "dms/policy/dms.hpp"
#include "dms/policy/quest.hpp"
#include "dms/policy/tova.hpp"
#include "dms/step/cache_state.hpp"
#include "synthetic_cache.cuh"

namespace {

using dms_bench::fill_values;
using dms_bench::kv_t;
constexpr int kLayers = 36;          // Qwen3-8B
constexpr int kDistinctLayers = 36;  // caches built; layer l uses cache l % kDistinctLayers
using dms_bench::group;
using dms_bench::head_dim;
using dms_bench::kv_heads;
using dms_bench::page;
constexpr int kDmsWindow = 512;
constexpr double kKvBudgetBytes = 40.0 * double(std::size_t{1} << 30);  // K/V of all 36 layers
constexpr int kIterations = 30;  // timed steps per run (each appends one token to every row)
constexpr int kWarmupSteps = 1;  // untimed steps before the loop (TOVA reaches steady state)
constexpr double kGiB = double(std::size_t{1} << 30);
constexpr double kBytesPerSlot = 2.0 * head_dim * sizeof(kv_t);  // K + V of one token of one row

// ---- the stack's caches (built by bench/synthetic_cache.cuh) ----------------------------------

// What one policy's rows look like: initial lengths (one sequence's kv_heads rows; every sequence
// alike), steady-state slots per row (for the budget), and the cache's extras.
struct layout {
  std::vector<std::int32_t> lengths;  // [kv_heads] initial row lengths
  std::vector<std::int32_t> steady;   // [kv_heads] steady-state slots (budgeted)
  int spare_pages_per_row = 0;        // pages appends may take over a run
  int max_row_slots = 0;
  bool scores = false, bounds = false;
  int ring_length = 0;

  [[nodiscard]] std::int64_t steady_pages_per_sequence() const {
    std::int64_t pages = 0;
    for (const std::int32_t s : steady) pages += (s + page - 1) / page;
    return pages;
  }
  [[nodiscard]] double steady_bytes_per_sequence() const {
    return double(steady_pages_per_sequence()) * page * kBytesPerSlot;
  }
  // The most sequences whose steady-state pages in all layers fit the budget.
  [[nodiscard]] int sequences() const {
    return int(kKvBudgetBytes / (double(kLayers) * steady_bytes_per_sequence()));
  }
};

// One layer's cache on the device: `batch` sequences laid out as `lay`.
struct layer_cache : dms_bench::synthetic_cache {
  layer_cache(const layout& lay, int batch)
      : synthetic_cache(lengths_of(lay, batch), batch, lay.max_row_slots,
                        batch * kv_heads * lay.spare_pages_per_row, lay.scores, lay.bounds,
                        lay.ring_length) {}

 private:
  static std::vector<std::int32_t> lengths_of(const layout& lay, int batch) {
    std::vector<std::int32_t> lengths(static_cast<std::size_t>(batch) * kv_heads);
    for (std::size_t r = 0; r < lengths.size(); ++r) lengths[r] = lay.lengths[r % kv_heads];
    return lengths;
  }
};

// Device bytes of one layer's cache for `batch` sequences, before allocating it.
double estimated_layer_bytes(const layout& lay, int batch) {
  const double rows = double(batch) * kv_heads;
  double pages = 0.0;
  for (const std::int32_t len : lay.lengths) pages += double((len + page - 1) / page) * batch;
  pages += rows * lay.spare_pages_per_row;
  const double slots = pages * page;
  double n = slots * (kBytesPerSlot + sizeof(std::int32_t)) + pages * sizeof(std::int32_t) +
             rows * ((lay.max_row_slots + page - 1) / page) * sizeof(std::int32_t);
  if (lay.scores) n += slots * sizeof(float);
  if (lay.bounds) n += 2.0 * pages * head_dim * sizeof(float);
  n += rows * lay.ring_length * (sizeof(std::int32_t) + 1);
  return n;
}

// ---- the policies' layouts -----------------------------------------------------------------

// Spare pages per row for a row that grows by one slot per step over a whole run.
constexpr int growth_pages = (kIterations + kWarmupSteps + page - 1) / page + 1;

layout dense_layout(int context, bool bounds) {
  layout lay;
  lay.lengths.assign(kv_heads, context);
  lay.steady = lay.lengths;
  lay.spare_pages_per_row = growth_pages;
  lay.max_row_slots = context + growth_pages * page;
  lay.bounds = bounds;
  return lay;
}

// DMS-like per-head skew (bench/synthetic_cache.cuh), one sequence's rows.
layout dms_layout(int context, int ratio) {
  layout lay;
  lay.lengths = dms_bench::dms_row_lengths(1, context, ratio, kDmsWindow);
  lay.steady = lay.lengths;
  lay.spare_pages_per_row = 0;  // every append reuses the slot of the token leaving the window
  lay.max_row_slots = *std::max_element(lay.lengths.begin(), lay.lengths.end()) + page;
  lay.ring_length = kDmsWindow + 1;
  return lay;
}

layout tova_layout(int budget) {
  layout lay;
  lay.lengths.assign(kv_heads, budget);
  lay.steady.assign(kv_heads, budget + 1);  // budget live + the hole the next append refills
  lay.spare_pages_per_row = (budget + 1 + page - 1) / page - (budget + page - 1) / page;
  lay.max_row_slots = budget + 2 * page;
  lay.scores = true;
  return lay;
}

// ---- the benchmark -------------------------------------------------------------------------

template <class DevicePolicy>
void hyperscaling(benchmark::State& state, const layout& lay, const DevicePolicy& policy,
                  bool logits) {
  if (!dms_bench::require_device(state)) return;
  const int batch = lay.sequences();
  if (batch < 1) {
    state.SkipWithError("not one sequence fits the KV budget");
    return;
  }
  // Refuse early, before allocating tens of GiB piecemeal, if the caches cannot fit.
  std::size_t free_bytes = 0, total_bytes = 0;
  if (!dms_bench::cuda_ok(state, cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo"))
    return;
  const double need = kDistinctLayers * estimated_layer_bytes(lay, batch);
  if (need > 0.9 * double(free_bytes)) {
    state.SkipWithError(("the caches need " + std::to_string(need / kGiB) + " GiB, free " +
                         std::to_string(double(free_bytes) / kGiB) + " GiB")
                            .c_str());
    return;
  }

  std::vector<std::unique_ptr<layer_cache>> caches;
  double alloc = 0.0;
  for (int l = 0; l < kDistinctLayers; ++l) {
    caches.push_back(std::make_unique<layer_cache>(lay, batch));
    if (!dms_bench::cuda_ok(state, caches.back()->error, "building a layer cache")) return;
    alloc += caches.back()->bytes();
  }

  const std::size_t qn = std::size_t(batch) * kv_heads * group * head_dim;
  const std::size_t kn = std::size_t(batch) * kv_heads * head_dim;
  dms_bench::device_buffer<kv_t> q(qn), out(qn), k(kn), v(kn);
  dms_bench::device_buffer<float> decision(std::size_t(batch) * kv_heads);
  for (cudaError_t e : {q.status(), out.status(), k.status(), v.status(), decision.status()})
    if (!dms_bench::cuda_ok(state, e, "cudaMalloc (inputs)")) return;
  fill_values<<<256, 256>>>(q.get(), qn, 3u, 0.0f);
  fill_values<<<256, 256>>>(k.get(), kn, 4u, 0.0f);
  fill_values<<<256, 256>>>(v.get(), kn, 5u, 0.0f);
  if (logits) fill_values<<<16, 256>>>(decision.get(), decision.size(), 0u, 1.0f);  // all flag
  if (!dms_bench::cuda_ok(state, cudaGetLastError(), "filling the inputs")) return;

  int device = 0, sms = 0;
  if (!dms_bench::cuda_ok(state, cudaGetDevice(&device), "cudaGetDevice") ||
      !dms_bench::cuda_ok(state,
                          cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
                          "cudaDeviceGetAttribute"))
    return;

  dms::cuda::decode_step_outputs<kv_t> outs;
  outs.out = out.get();
  outs.num_sms = sms;
  const auto inputs = [&](const layer_cache& c) {
    dms::cuda::decode_step_inputs<kv_t, kv_t> in;
    in.seq_ids = c.ids.get();
    in.batch = batch;
    in.k = k.get();
    in.v = v.get();
    in.decision_logits = logits ? decision.get() : nullptr;
    in.q = q.get();
    return in;
  };

  // Two-phase temporary storage: every layer has the same shapes, one buffer serves them all
  // (the layers run one after another on one stream).
  std::size_t temp_bytes = 0;
  for (const auto& c : caches) {
    std::size_t b = 0;
    if (!dms_bench::cuda_ok(state,
                            dms::cuda::decode_step(nullptr, b, c->st, policy, inputs(*c), outs),
                            "decode_step (sizing)"))
      return;
    temp_bytes = std::max(temp_bytes, b);
  }
  dms_bench::device_buffer<unsigned char> temp(std::max<std::size_t>(temp_bytes, 1));
  if (!dms_bench::cuda_ok(state, temp.status(), "cudaMalloc (temp)")) return;

  const auto step = [&](cudaStream_t s) {
    for (int l = 0; l < kLayers; ++l) {
      const layer_cache& c = *caches[std::size_t(l % kDistinctLayers)];
      std::size_t bytes = temp.bytes();
      const cudaError_t e =
          dms::cuda::decode_step(temp.get(), bytes, c.st, policy, inputs(c), outs, s);
      if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
  };
  const auto check_status = [&](const char* when) {
    for (const auto& c : caches)
      if (const int s = c->read_status(); s != 0) {
        const std::string msg =
            std::string("decode step failed ") + when + ": " +
            (s < 0 ? "cannot read the status" : dms::step_status_name(dms::step_status(s)));
        state.SkipWithError(msg.c_str());
        return false;
      }
    return true;
  };

  for (int w = 0; w < kWarmupSteps; ++w)
    if (!dms_bench::cuda_ok(state, step(nullptr), "warm-up step")) return;
  if (!dms_bench::cuda_ok(state, cudaDeviceSynchronize(), "warm-up step") ||
      !check_status("in the warm-up"))
    return;

  dms_bench::l2_flusher flush;
  if (!dms_bench::timed_loop(state, flush, step)) return;
  if (!dms_bench::cuda_ok(state, cudaDeviceSynchronize(), "timed steps") ||
      !check_status("in the timed loop"))
    return;

  const double steady_bytes = double(kLayers) * batch * lay.steady_bytes_per_sequence();
  double row_slots = 0.0;
  for (const std::int32_t s : lay.steady) row_slots += s;
  const double iterations = double(state.iterations());
  state.counters["sequences"] = batch;
  state.counters["step_ms"] = benchmark::Counter(
      iterations * 1e-3, benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
  state.counters["tokens_per_s"] =
      benchmark::Counter(double(batch) * iterations, benchmark::Counter::kIsRate);
  state.counters["kv_gib"] = steady_bytes / kGiB;
  state.counters["alloc_gib"] = alloc * double(kLayers) / double(kDistinctLayers) / kGiB;
  state.counters["row_slots"] = row_slots / kv_heads;
}

void bm_dense(benchmark::State& state) {
  const int context = int(state.range(0));
  hyperscaling(state, dense_layout(context, false), dms::dense_device_policy{}, false);
}
void bm_dms4(benchmark::State& state) {
  const int context = int(state.range(0));
  hyperscaling(state, dms_layout(context, 4), dms::dms_device_policy{{}, kDmsWindow}, true);
}
void bm_dms8(benchmark::State& state) {
  const int context = int(state.range(0));
  hyperscaling(state, dms_layout(context, 8), dms::dms_device_policy{{}, kDmsWindow}, true);
}
void bm_tova(benchmark::State& state) {
  const int budget = int(state.range(0)) / 8;
  hyperscaling(state, tova_layout(budget), dms::tova_device_policy{{}, budget}, false);
}
void bm_quest(benchmark::State& state) {
  const int context = int(state.range(0));
  hyperscaling(state, dense_layout(context, true), dms::quest_device_policy{{}, context / 8, false},
               false);
}

void contexts(benchmark::internal::Benchmark* b) {
  b->ArgName("context")
      ->Arg(8192)
      ->Arg(32768)
      ->Iterations(kIterations)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
}

}  // namespace

BENCHMARK(bm_dense)->Name("hyperscaling/dense")->Apply(contexts);
BENCHMARK(bm_dms4)->Name("hyperscaling/dms4")->Apply(contexts);
BENCHMARK(bm_dms8)->Name("hyperscaling/dms8")->Apply(contexts);
BENCHMARK(bm_tova)->Name("hyperscaling/tova")->Apply(contexts);
BENCHMARK(bm_quest)->Name("hyperscaling/quest")->Apply(contexts);
