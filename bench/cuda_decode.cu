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

namespace {

using kv_t = dms::bfloat16;
constexpr int kv_heads = 8, group = 4, head_dim = 128, page = 16;

// A cheap integer hash for synthetic contents.
__device__ __forceinline__ unsigned mix(unsigned x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  return x ^ (x >> 16);
}

__global__ void fill_kv(kv_t* p, std::size_t n, unsigned seed) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    const float x = float(int(mix(unsigned(i) ^ seed) % 2001u) - 1000) * 1e-3f;
    p[i] = kv_t(x);
  }
}

// Row r owns pages [first_page[r], first_page[r] + ceil(len / page)); slot s holds position s.
__global__ void fill_rows(dms::cache_state<kv_t> st, const std::int32_t* lengths,
                          const std::int32_t* first_page) {
  const int r = blockIdx.x;
  const int len = lengths[r];
  if (threadIdx.x == 0) {
    st.row_length[r] = st.live[r] = st.seen[r] = st.peak[r] = len;
    st.hole_head[r] = -1;
  }
  const int pages = (len + page - 1) / page;
  for (int p = threadIdx.x; p < st.max_pages_per_row; p += blockDim.x)
    st.page_entry(r, p) = p < pages ? first_page[r] + p : -1;
  for (int s = threadIdx.x; s < pages * page; s += blockDim.x)
    st.position[std::int64_t{first_page[r] + s / page} * page + s % page] = s < len ? s : -1;
  if (st.score)
    for (int s = threadIdx.x; s < pages * page; s += blockDim.x)
      st.score[std::int64_t{first_page[r] + s / page} * page + s % page] = float(mix(s)) * 1e-9f;
  if (st.page_min)
    for (int i = threadIdx.x; i < pages * head_dim; i += blockDim.x) {
      const std::int64_t at = std::int64_t{first_page[r] + i / head_dim} * head_dim + i % head_dim;
      st.page_min[at] = -float(mix(unsigned(at)) % 1000u) * 1e-3f;
      st.page_max[at] = float(mix(unsigned(at) + 1u) % 1000u) * 1e-3f;
    }
  const std::int64_t ring = std::int64_t{r} * st.ring_length;
  for (int j = threadIdx.x; j < st.ring_length; j += blockDim.x) {
    // Ring entry of position p = len - 1 - j': slot p (positions equal slots), every entry flagged
    // but the newest, so each append reuses a slot (DMS's steady state).
    const int p = len - 1 - j;
    if (p >= 0) {
      st.ring_slot[ring + p % st.ring_length] = p;
      if (st.ring_flag) st.ring_flag[ring + p % st.ring_length] = j > 0;
    }
  }
}

__global__ void fill_free(dms::cache_state<kv_t> st, int used) {
  const int free = st.max_pages - used;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < free; i += gridDim.x * blockDim.x)
    st.free_pages[i] = st.max_pages - 1 - i;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    *st.free_top = free;
    *st.status = 0;
  }
}

// One layer's cache on the device with the given per-row lengths (batch * kv_heads rows), plus
// `spare_pages` free pages for appends.
struct synthetic_cache {
  dms_bench::device_buffer<kv_t> k, v;
  dms_bench::device_buffer<std::int32_t> position, page_table, row_length, live, seen, peak,
      hole_head, free_pages, free_top, ring_slot, status, ids;
  dms_bench::device_buffer<float> score, page_min, page_max;
  dms_bench::device_buffer<std::uint8_t> ring_flag, active;
  dms::cache_state<kv_t> st{};
  std::int64_t live_slots = 0;
  cudaError_t error = cudaSuccess;

  synthetic_cache(const std::vector<std::int32_t>& lengths, int batch, int max_row_slots,
                  int spare_pages, bool scores, bool bounds, int ring_length) {
    const int rows = int(lengths.size());
    std::vector<std::int32_t> first(lengths.size());
    int pages = 0;
    for (int r = 0; r < rows; ++r) {
      first[r] = pages;
      pages += (lengths[r] + page - 1) / page;
      live_slots += lengths[r];
    }
    const int max_pages = pages + spare_pages;
    const int ppr = (max_row_slots + page - 1) / page;
    const auto slots = std::size_t(max_pages) * page;
    k = dms_bench::device_buffer<kv_t>(slots * head_dim);
    v = dms_bench::device_buffer<kv_t>(slots * head_dim);
    position = dms_bench::device_buffer<std::int32_t>(slots);
    page_table = dms_bench::device_buffer<std::int32_t>(std::size_t(rows) * ppr);
    for (auto* b : {&row_length, &live, &seen, &peak, &hole_head})
      *b = dms_bench::device_buffer<std::int32_t>(std::size_t(rows));
    free_pages = dms_bench::device_buffer<std::int32_t>(std::size_t(max_pages));
    free_top = dms_bench::device_buffer<std::int32_t>(1);
    status = dms_bench::device_buffer<std::int32_t>(1);
    if (scores) score = dms_bench::device_buffer<float>(slots);
    if (bounds) {
      page_min = dms_bench::device_buffer<float>(std::size_t(max_pages) * head_dim);
      page_max = dms_bench::device_buffer<float>(std::size_t(max_pages) * head_dim);
    }
    if (ring_length > 0) {
      ring_slot = dms_bench::device_buffer<std::int32_t>(std::size_t(rows) * ring_length);
      ring_flag = dms_bench::device_buffer<std::uint8_t>(std::size_t(rows) * ring_length);
    }
    active = dms_bench::device_buffer<std::uint8_t>(std::size_t(batch));
    ids = dms_bench::device_buffer<std::int32_t>(std::size_t(batch));
    for (cudaError_t e : {k.status(), v.status(), position.status(), page_table.status(),
                          free_pages.status(), score.status(), page_min.status(), page_max.status(),
                          ring_slot.status(), ring_flag.status()})
      if (e != cudaSuccess) error = e;
    if (error != cudaSuccess) return;
    st = {k.get(),
          v.get(),
          position.get(),
          score.get(),
          page_min.get(),
          page_max.get(),
          page_table.get(),
          row_length.get(),
          live.get(),
          seen.get(),
          peak.get(),
          hole_head.get(),
          free_pages.get(),
          free_top.get(),
          ring_slot.get(),
          ring_flag.get(),
          active.get(),
          status.get(),
          kv_heads,
          group,
          head_dim,
          page,
          max_pages,
          ppr,
          batch,
          max_row_slots,
          ring_length};
    std::vector<std::int32_t> seq(static_cast<std::size_t>(batch));
    for (int b = 0; b < batch; ++b) seq[b] = b;
    const auto upload = [&](dms_bench::device_buffer<std::int32_t>& d,
                            const std::vector<std::int32_t>& h) {
      if (error == cudaSuccess)
        error =
            cudaMemcpy(d.get(), h.data(), h.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice);
    };
    dms_bench::device_buffer<std::int32_t> d_len(lengths.size()), d_first(first.size());
    upload(d_len, lengths);
    upload(d_first, first);
    upload(ids, seq);
    if (error != cudaSuccess) return;
    error = cudaMemset(active.get(), 1, std::size_t(batch));
    fill_kv<<<1024, 256>>>(k.get(), k.size(), 1u);
    fill_kv<<<1024, 256>>>(v.get(), v.size(), 2u);
    fill_rows<<<rows, 256>>>(st, d_len.get(), d_first.get());
    fill_free<<<64, 256>>>(st, pages);
    if (error == cudaSuccess) error = cudaDeviceSynchronize();
  }

  [[nodiscard]] dms::cache_view<const kv_t> view() const {
    const auto w = st.view();
    return {w.k,        w.v,          w.position,          w.score,        w.page_min,
            w.page_max, w.page_table, w.row_length,        w.num_kv_heads, w.group_size,
            w.head_dim, w.page_size,  w.max_pages_per_row, w.max_rows};
  }
};

// Bytes of K and V behind `slots` live slots.
double kv_bytes(std::int64_t slots) {
  return double(slots) * head_dim * 2.0 * sizeof(kv_t);
}

// DMS-like lengths with mean ~ context / ratio: even heads hold the window plus a little, odd
// heads the rest, so rows differ by up to an order of magnitude as DMS leaves them.
std::vector<std::int32_t> dms_lengths(int batch, int context, int ratio) {
  const int mean = std::max(1, context / ratio);
  const int shortest = std::min(mean, 513);
  std::vector<std::int32_t> len(static_cast<std::size_t>(batch) * kv_heads);
  for (std::size_t r = 0; r < len.size(); ++r)
    len[r] = r % 2 == 0 ? shortest : std::min(context, 2 * mean - shortest);
  return len;
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
  fill_kv<<<256, 256>>>(q.get(), qn, 3u);
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
  synthetic_cache cache(dms_lengths(batch, context, ratio), batch, context, 0, false, false, 0);
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
  fill_kv<<<256, 256>>>(q.get(), qn, 3u);
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
  fill_kv<<<256, 256>>>(k.get(), kn, 4u);
  fill_kv<<<256, 256>>>(v.get(), kn, 5u);
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
