// SPDX-License-Identifier: Apache-2.0
#pragma once

// A layer's cache built directly on the device for the GPU benchmarks: one Qwen3-8B-like decode
// layer (8 KV heads x G = 4, head_dim 128, bf16, pages of 16), rows of given lengths, synthetic
// contents (the kernels' speed does not depend on the values), so shapes of tens of GB need no
// host copies. Row r owns consecutive pages; slot s holds position s; a DMS ring, if any, is
// flagged everywhere but at the newest entry, so every append reuses a slot (DMS's steady state).
// Everything is a template or inline: several bench/*.cu files include this header.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "cuda_bench_util.cuh"
#include "dms/cache_view.hpp"
#include "dms/numeric.hpp"
#include "dms/step/cache_state.hpp"

namespace dms_bench {

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

/// p[i] = a hash-derived value in [-1, 1], or `scale` when it is not 0.
template <class T>
__global__ void fill_values(T* p, std::size_t n, unsigned seed, float scale) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    const float x = float(int(mix(unsigned(i) ^ seed) % 2001u) - 1000) * 1e-3f;
    p[i] = T(scale == 0.0f ? x : scale);
  }
}

// One block per row: row r owns pages [first_page[r], first_page[r] + ceil(len / page)).
template <class T>
__global__ void fill_rows(dms::cache_state<T> st, const std::int32_t* lengths,
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
    const int p = len - 1 - j;
    if (p >= 0) {
      st.ring_slot[ring + p % st.ring_length] = p;
      if (st.ring_flag) st.ring_flag[ring + p % st.ring_length] = j > 0;
    }
  }
}

// The pages after the first `used` are free; the status is cleared.
template <class T>
__global__ void fill_free(dms::cache_state<T> st, int used) {
  const int free = st.max_pages - used;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < free; i += gridDim.x * blockDim.x)
    st.free_pages[i] = st.max_pages - 1 - i;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    *st.free_top = free;
    *st.status = 0;
  }
}

/// DMS-like row lengths for `batch` sequences, mean ~ context / ratio: even heads hold the window
/// plus the newest token, odd heads the rest, so rows differ by up to an order of magnitude the
/// way DMS leaves them.
inline std::vector<std::int32_t> dms_row_lengths(int batch, int context, int ratio,
                                                 int window = 512) {
  const int mean = context / ratio > 1 ? context / ratio : 1;
  const int shortest = mean < window + 1 ? mean : window + 1;
  const int longest = context < 2 * mean - shortest ? context : 2 * mean - shortest;
  std::vector<std::int32_t> len(static_cast<std::size_t>(batch) * kv_heads);
  for (std::size_t r = 0; r < len.size(); ++r) len[r] = r % 2 == 0 ? shortest : longest;
  return len;
}

/// The cache: lengths[batch * kv_heads] per row (sequence b is id b), rows of up to
/// max_row_slots slots, spare_pages free pages for appends, scores / Quest bounds / a ring of
/// ring_length entries as the policy needs. Check `error` after construction.
struct synthetic_cache {
  device_buffer<kv_t> k, v;
  device_buffer<std::int32_t> position, page_table, row_length, live, seen, peak, hole_head,
      free_pages, free_top, ring_slot, status, ids;
  device_buffer<float> score, page_min, page_max;
  device_buffer<std::uint8_t> ring_flag, active;
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
    k = device_buffer<kv_t>(slots * head_dim);
    v = device_buffer<kv_t>(slots * head_dim);
    position = device_buffer<std::int32_t>(slots);
    page_table = device_buffer<std::int32_t>(std::size_t(rows) * ppr);
    for (auto* b : {&row_length, &live, &seen, &peak, &hole_head})
      *b = device_buffer<std::int32_t>(std::size_t(rows));
    free_pages = device_buffer<std::int32_t>(std::size_t(max_pages));
    free_top = device_buffer<std::int32_t>(1);
    status = device_buffer<std::int32_t>(1);
    if (scores) score = device_buffer<float>(slots);
    if (bounds) {
      page_min = device_buffer<float>(std::size_t(max_pages) * head_dim);
      page_max = device_buffer<float>(std::size_t(max_pages) * head_dim);
    }
    if (ring_length > 0) {
      ring_slot = device_buffer<std::int32_t>(std::size_t(rows) * ring_length);
      ring_flag = device_buffer<std::uint8_t>(std::size_t(rows) * ring_length);
    }
    active = device_buffer<std::uint8_t>(std::size_t(batch));
    ids = device_buffer<std::int32_t>(std::size_t(batch));
    for (cudaError_t e :
         {k.status(), v.status(), position.status(), page_table.status(), row_length.status(),
          live.status(), seen.status(), peak.status(), hole_head.status(), free_pages.status(),
          free_top.status(), status.status(), score.status(), page_min.status(), page_max.status(),
          ring_slot.status(), ring_flag.status(), active.status(), ids.status()})
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
    device_buffer<std::int32_t> d_len(lengths.size()), d_first(first.size());
    const auto upload = [&](device_buffer<std::int32_t>& d, const std::vector<std::int32_t>& h) {
      if (error == cudaSuccess) error = d.status();
      if (error == cudaSuccess)
        error =
            cudaMemcpy(d.get(), h.data(), h.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice);
    };
    upload(d_len, lengths);
    upload(d_first, first);
    upload(ids, seq);
    if (error != cudaSuccess) return;
    error = cudaMemset(active.get(), 1, std::size_t(batch));
    fill_values<<<1024, 256>>>(k.get(), k.size(), 1u, 0.0f);
    fill_values<<<1024, 256>>>(v.get(), v.size(), 2u, 0.0f);
    fill_rows<<<rows, 256>>>(st, d_len.get(), d_first.get());
    fill_free<<<64, 256>>>(st, pages);
    if (error == cudaSuccess) error = cudaGetLastError();
    if (error == cudaSuccess) error = cudaDeviceSynchronize();
  }

  [[nodiscard]] dms::cache_view<const kv_t> view() const { return st.view().read_only(); }

  /// Every device byte this cache holds.
  [[nodiscard]] double bytes() const {
    double n = double(k.bytes()) + double(v.bytes()) + double(score.bytes()) +
               double(page_min.bytes()) + double(page_max.bytes()) + double(ring_flag.bytes()) +
               double(active.bytes());
    for (const auto* b : {&position, &page_table, &row_length, &live, &seen, &peak, &hole_head,
                          &free_pages, &free_top, &ring_slot, &status, &ids})
      n += double(b->bytes());
    return n;
  }

  /// The sticky step status (0 = ok), or -1 if it could not be read.
  [[nodiscard]] int read_status() const {
    std::int32_t s = 0;
    return cudaMemcpy(&s, status.get(), sizeof s, cudaMemcpyDeviceToHost) == cudaSuccess ? s : -1;
  }
};

}  // namespace dms_bench
