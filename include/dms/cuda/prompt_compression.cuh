// SPDX-License-Identifier: Apache-2.0
#pragma once

// Prompt compression on the GPU: paged_cache::finish_prompt for a batch of sequences. The
// training-free policies reduce each row of a finished prompt to their budget in one shot (TOVA,
// H2O and SnapKV by score, StreamingLLM to sinks + window) and compact it, so decode reads a
// dense row and the pages past its end go back to the pool. The algorithm and its pieces are
// dms/step/prompt_compression.hpp's, which the CPU tests pin against the host policies; here:
//   plan     one block: an unknown or repeated sequence id fails the step before anything moves;
//            else each row gets a segment as long as the row (a scan of the row lengths, so the
//            segments together take at most the pool's slots);
//   gather   one block per row: the candidates, as (key, slot) pairs in the row's segment;
//   [pool    SnapKV: segments sorted by position, then pooled keys]
//   sort     cub::DeviceSegmentedRadixSort, one segment per row, by eviction_key;
//   compact  one block per row: evict the first n of the segment, pair holes (ascending) with
//            live slots (descending) by two block scans, move the tokens (a warp per token);
//   release  one block: the rows' freed pages onto the free stack in batch-row order (a scan).
// No host synchronization; the status word sticks like every other device step's.

#if !defined(__CUDACC__)
#error \
    "dms/cuda/prompt_compression.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cuda_runtime_api.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include "dms/config.hpp"
#include "dms/cuda/bookkeeping.cuh"
#include "dms/cuda/check.cuh"
#include "dms/cuda/device_cache.cuh"
#include "dms/policy/device_policy.hpp"
#include "dms/step/batch_step.hpp"
#include "dms/step/cache_state.hpp"
#include "dms/step/prompt_compression.hpp"

DMS_NAMESPACE_BEGIN
namespace cuda {

/// Launch shapes, as plain data.
struct prompt_compression_tuning {
  static constexpr int threads = 256;  // per row: gather, pool, compact; one block: check, release
};

namespace detail {

// Temporary storage: two (key, slot) buffers (the sort's input and output) in which row r owns
// the segment [offset[r], offset[r] + row length), the sort's segment bounds, and per row its
// eviction count and the pages it frees (-1: row left as it is).
struct compression_temp {
  std::uint64_t* keys[2];  // [items]
  std::int32_t* slots[2];  // [items]
  std::int32_t* offset;    // [rows] start of the row's segment
  std::int32_t* begin;     // [rows] candidates of the row, for the sort
  std::int32_t* end;       // [rows]
  std::int32_t* evict;     // [rows] evictions; < 0: row left as it is
  std::int32_t* released;  // [rows] pages freed; < 0: row left as it is
  void* sort_temp;
  std::size_t sort_bytes;

  static std::size_t bytes(int rows, int items, std::size_t sort_bytes) {
    const auto cells = std::size_t(items);
    return 2 * align_up(sizeof(std::uint64_t) * cells) +
           2 * align_up(sizeof(std::int32_t) * cells) +
           5 * align_up(sizeof(std::int32_t) * std::size_t(rows)) + align_up(sort_bytes);
  }
  static compression_temp carve(void* d_temp, int rows, int items, std::size_t sort_bytes) {
    auto* p = static_cast<unsigned char*>(d_temp);
    const auto cells = std::size_t(items);
    const auto take = [&p](std::size_t n) {
      auto* out = p;
      p += align_up(n);
      return out;
    };
    compression_temp t{};
    for (auto*& k : t.keys)
      k = reinterpret_cast<std::uint64_t*>(take(sizeof(std::uint64_t) * cells));
    for (auto*& s : t.slots)
      s = reinterpret_cast<std::int32_t*>(take(sizeof(std::int32_t) * cells));
    t.offset = reinterpret_cast<std::int32_t*>(take(sizeof(std::int32_t) * rows));
    t.begin = reinterpret_cast<std::int32_t*>(take(sizeof(std::int32_t) * rows));
    t.end = reinterpret_cast<std::int32_t*>(take(sizeof(std::int32_t) * rows));
    t.evict = reinterpret_cast<std::int32_t*>(take(sizeof(std::int32_t) * rows));
    t.released = reinterpret_cast<std::int32_t*>(take(sizeof(std::int32_t) * rows));
    t.sort_temp = take(sort_bytes);
    t.sort_bytes = sort_bytes;
    return t;
  }
};

// Segment entries a batch of `rows` rows can need: the rows' slots, which the pool bounds.
template <class T>
std::int64_t compression_items(const cache_state<T>& st, int rows) {
  return std::max<std::int64_t>(1, std::min(std::int64_t{rows} * st.max_row_slots,
                                            std::int64_t{st.max_pages} * st.page_size));
}

inline std::size_t segmented_sort_bytes(int items, int segments) {
  std::size_t bytes = 0;
  (void)cub::DeviceSegmentedRadixSort::SortPairs(
      nullptr, bytes, static_cast<const std::uint64_t*>(nullptr),
      static_cast<std::uint64_t*>(nullptr), static_cast<const std::int32_t*>(nullptr),
      static_cast<std::int32_t*>(nullptr), items, segments,
      static_cast<const std::int32_t*>(nullptr), static_cast<const std::int32_t*>(nullptr));
  return bytes;
}

// One block: the serial driver's validation (so the same batch fails with the same status),
// then the rows' segments.
template <int Threads, class T>
__global__ void __launch_bounds__(Threads)
    compression_plan_kernel(cache_state<T> st, const std::int32_t* seq_ids, int batch,
                            compression_temp tmp) {
  using block_scan = cub::BlockScan<int, Threads>;
  __shared__ typename block_scan::TempStorage scan_storage;
  __shared__ int first_bad, first_duplicate, before;
  if (threadIdx.x == 0) {
    first_bad = first_duplicate = INT_MAX;
    before = 0;
  }
  __syncthreads();
  if (*st.status != 0) return;
  for (int i = int(threadIdx.x); i < batch; i += Threads) {
    const int seq = seq_ids[i];
    if (!step::valid_sequence(st.active, st.max_sequences, seq)) {
      atomicMin(&first_bad, i);
      continue;
    }
    for (int j = 0; j < i; ++j)
      if (seq_ids[j] == seq) {
        atomicMin(&first_duplicate, i);
        break;
      }
  }
  __syncthreads();
  if (first_bad < INT_MAX || first_duplicate < INT_MAX) {
    if (threadIdx.x == 0)
      *st.status = std::int32_t(first_bad < first_duplicate ? step_status::bad_sequence
                                                            : step_status::duplicate_sequence);
    return;
  }
  const int H = st.num_kv_heads, rows = batch * H;
  for (int r0 = 0; r0 < rows; r0 += Threads) {
    const int r = r0 + int(threadIdx.x);
    const int length = r < rows ? st.row_length[seq_ids[r / H] * H + r % H] : 0;
    int at = 0, total = 0;
    block_scan(scan_storage).ExclusiveSum(length, at, total);
    if (r < rows) tmp.offset[r] = before + at;
    __syncthreads();
    if (threadIdx.x == 0) before += total;
    __syncthreads();
  }
}

// Per row: its candidates into its segment, keyed by eviction_key (by_score) or by position
// (by_pooled_score, which pools after a first sort).
template <int Threads, class T, class DevicePolicy>
__global__ void __launch_bounds__(Threads)
    compression_gather_kernel(cache_state<T> st, DevicePolicy policy, const std::int32_t* seq_ids,
                              compression_temp tmp) {
  using block_scan = cub::BlockScan<int, Threads>;
  __shared__ typename block_scan::TempStorage scan_storage;
  __shared__ int total;
  const int r = int(blockIdx.x), H = st.num_kv_heads;
  const bool failed = *st.status != 0;
  const int base = failed ? 0 : tmp.offset[r];
  if (threadIdx.x == 0) {
    total = 0;
    tmp.begin[r] = tmp.end[r] = base;
    tmp.evict[r] = tmp.released[r] = -1;
  }
  __syncthreads();
  if (failed) return;
  const int row = seq_ids[r / H] * H + r % H;
  const int length = st.row_length[row];
  const std::int32_t seen = st.seen[row];
  for (int s0 = 0; s0 < length; s0 += Threads) {
    const int s = s0 + int(threadIdx.x);
    std::int32_t p = -1;
    if (s < length) p = st.position[st.slot_index(row, s)];
    const int take = p >= 0 && policy.prompt_candidate(p, seen) ? 1 : 0;
    int at = 0, count = 0;
    block_scan(scan_storage).ExclusiveSum(take, at, count);
    if (take) {
      const float score = st.score ? st.score[st.slot_index(row, s)] : 0.0f;
      tmp.keys[0][base + total + at] =
          DevicePolicy::reduces_prompt == prompt_reduction::by_pooled_score
              ? std::uint64_t(std::uint32_t(p))
              : step::eviction_key(score, p);
      tmp.slots[0][base + total + at] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) total += count;
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    tmp.end[r] = base + total;
    const int n = policy.prompt_evictions(st.live[row], total);
    tmp.evict[r] = n < total ? n : total;
  }
}

// SnapKV: the segment sorted by position (keys[1], slots[1]) -> pooled keys (keys[0], slots[0]).
template <int Threads, class T, class DevicePolicy>
__global__ void __launch_bounds__(Threads)
    compression_pool_kernel(cache_state<T> st, DevicePolicy policy, const std::int32_t* seq_ids,
                            compression_temp tmp) {
  const int r = int(blockIdx.x), H = st.num_kv_heads;
  if (*st.status != 0) return;
  const int row = seq_ids[r / H] * H + r % H;
  const int base = tmp.begin[r];
  const int n = tmp.end[r] - base;
  const std::int32_t* by_position = tmp.slots[1] + base;
  const auto score_at = [&](int j) {
    return st.score ? st.score[st.slot_index(row, by_position[j])] : 0.0f;
  };
  for (int i = int(threadIdx.x); i < n; i += Threads) {
    const float pooled =
        step::pooled_score(score_at, n, i, policy.pool_kernel(), policy.pool_max());
    tmp.keys[0][base + i] = step::eviction_key(pooled, std::int32_t(tmp.keys[1][base + i]));
    tmp.slots[0][base + i] = by_position[i];
  }
}

// Per row: evict the first `evict` slots of the sorted segment, then compact. The holes in
// ascending order and the live slots in descending order are laid out by two block scans (in
// the segment's key buffer, free once sorted: 8 bytes per slot of the row); pair i moves iff its
// live slot lies above its hole, a prefix of the pairs (the host's two-pointer walk stops at the
// first that does not).
template <int Threads, class T, class DevicePolicy>
__global__ void __launch_bounds__(Threads)
    compression_compact_kernel(cache_state<T> st, DevicePolicy policy, const std::int32_t* seq_ids,
                               compression_temp tmp) {
  using block_scan = cub::BlockScan<int, Threads>;
  using block_reduce = cub::BlockReduce<int, Threads>;
  __shared__ union {
    typename block_scan::TempStorage scan;
    typename block_reduce::TempStorage reduce;
  } storage;
  __shared__ int holes_before, live_before, moves;
  const int r = int(blockIdx.x), H = st.num_kv_heads;
  if (*st.status != 0) return;
  const int evict = tmp.evict[r];
  if (evict < 0) return;
  const int row = seq_ids[r / H] * H + r % H;
  const int base = tmp.begin[r];
  const int length = st.row_length[row];

  for (int i = int(threadIdx.x); i < evict; i += Threads) {
    const std::int64_t at = st.slot_index(row, tmp.slots[1][base + i]);
    st.position[at] = -1;
    if (st.score) st.score[at] = 0.0f;
  }
  if (threadIdx.x == 0) {
    holes_before = live_before = 0;
    st.live[row] -= evict;
  }
  __syncthreads();
  const int live = st.live[row];

  // holes[k]: the k-th hole, ascending; lives[k]: the k-th live slot from the top.
  auto* holes = reinterpret_cast<std::int32_t*>(tmp.keys[0] + base);
  std::int32_t* lives = holes + length;
  for (int s0 = 0; s0 < length; s0 += Threads) {
    const int s = s0 + int(threadIdx.x);
    const int hole = s < length && st.position[st.slot_index(row, s)] < 0 ? 1 : 0;
    const int alive = s < length && !hole ? 1 : 0;
    int hole_rank = 0, hole_count = 0;
    block_scan(storage.scan).ExclusiveSum(hole, hole_rank, hole_count);
    __syncthreads();
    int live_rank = 0, live_count = 0;
    block_scan(storage.scan).ExclusiveSum(alive, live_rank, live_count);
    if (hole) holes[holes_before + hole_rank] = s;
    if (alive) lives[live - 1 - (live_before + live_rank)] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
      holes_before += hole_count;
      live_before += live_count;
    }
    __syncthreads();
  }
  const int pairs = min(holes_before, live);

  // Move: a warp per pair; lane 0 moves the token's metadata, the lanes its K/V channels.
  const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
  int mine = 0;
  for (int i = warp; i < pairs; i += Threads / 32) {
    const int from = lives[i], to = holes[i];
    if (from <= to) continue;
    for (int c = lane; c < st.head_dim; c += 32) step::move_channel(st, row, from, to, c);
    if (lane == 0) {
      step::move_token(st, policy, row, from, to);
      ++mine;
    }
  }
  const int moved = block_reduce(storage.reduce).Sum(mine);
  if (threadIdx.x == 0) moves = moved;
  __syncthreads();
  // Key bounds only widen, and min/max commute: one thread per channel, over the moves.
  if (st.page_min)
    for (int c = int(threadIdx.x); c < st.head_dim; c += Threads)
      for (int i = 0; i < moves; ++i) step::widen_channel(st, row, holes[i], c);
  if (threadIdx.x == 0) tmp.released[r] = step::pages_released(length, live, st.page_size);
}

// One block: the freed pages onto the free stack, rows in batch order, then free_top.
template <int Threads, class T>
__global__ void __launch_bounds__(Threads)
    compression_release_kernel(cache_state<T> st, const std::int32_t* seq_ids, int rows,
                               compression_temp tmp) {
  using block_scan = cub::BlockScan<int, Threads>;
  __shared__ typename block_scan::TempStorage scan_storage;
  __shared__ int before;
  if (*st.status != 0) return;
  if (threadIdx.x == 0) before = 0;
  __syncthreads();
  const int H = st.num_kv_heads;
  for (int r0 = 0; r0 < rows; r0 += Threads) {
    const int r = r0 + int(threadIdx.x);
    const int released = r < rows ? tmp.released[r] : -1;
    int rank = 0, total = 0;
    block_scan(scan_storage).ExclusiveSum(released > 0 ? released : 0, rank, total);
    if (released >= 0) {
      const int row = seq_ids[r / H] * H + r % H;
      step::shrink_row(st, row, st.live[row], before + rank);
    }
    __syncthreads();
    if (threadIdx.x == 0) before += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) *st.free_top += before;
}

}  // namespace detail

/// Temporary storage finish_prompts needs for a batch of `batch` sequences.
template <class T>
[[nodiscard]] std::size_t finish_prompts_temp_bytes(const cache_state<T>& st, int batch) {
  const int rows = std::max(1, batch * st.num_kv_heads);
  const int items = int(detail::compression_items(st, rows));
  return detail::compression_temp::bytes(rows, items, detail::segmented_sort_bytes(items, rows));
}

/// Ends the prompts of seq_ids[0, batch): each row is reduced by the policy's prompt rule and
/// compacted (paged_cache::finish_prompt for each sequence in order, with the same slots, pages
/// and free stack). For policies that reduce no prompt (dense, DMS, Quest) it does nothing.
/// Nothing changes and cache_state::status records why if a sequence id is unknown or repeated,
/// or if an earlier step failed. d_temp == nullptr: only sets temp_bytes.
template <class T, class DevicePolicy>
[[nodiscard]] cudaError_t finish_prompts(void* d_temp, std::size_t& temp_bytes,
                                         const cache_state<T>& st, const DevicePolicy& policy,
                                         const std::int32_t* seq_ids, int batch,
                                         cudaStream_t stream = nullptr) {
  if (batch < 0 || detail::compression_items(st, std::max(1, batch * st.num_kv_heads)) > INT_MAX)
    return cudaErrorInvalidValue;
  const std::size_t need = finish_prompts_temp_bytes(st, batch);
  if (d_temp == nullptr) {
    temp_bytes = need;
    return cudaSuccess;
  }
  if (temp_bytes < need) return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  if (!seq_ids) return cudaErrorInvalidValue;
  constexpr int threads = prompt_compression_tuning::threads;
  const int rows = batch * st.num_kv_heads;
  const int items = int(detail::compression_items(st, rows));
  const auto tmp = detail::compression_temp::carve(d_temp, rows, items,
                                                   detail::segmented_sort_bytes(items, rows));
  detail::compression_plan_kernel<threads><<<1, threads, 0, stream>>>(st, seq_ids, batch, tmp);
  DMS_CUDA_TRY(cudaGetLastError());
  if constexpr (DevicePolicy::reduces_prompt == prompt_reduction::none) {
    return cudaSuccess;
  } else {
    const auto sort = [&](int end_bit) {
      std::size_t bytes = tmp.sort_bytes;
      return cub::DeviceSegmentedRadixSort::SortPairs(
          tmp.sort_temp, bytes, tmp.keys[0], tmp.keys[1], tmp.slots[0], tmp.slots[1], items, rows,
          tmp.begin, tmp.end, 0, end_bit, stream);
    };
    detail::compression_gather_kernel<threads>
        <<<rows, threads, 0, stream>>>(st, policy, seq_ids, tmp);
    DMS_CUDA_TRY(cudaGetLastError());
    if constexpr (DevicePolicy::reduces_prompt == prompt_reduction::by_pooled_score) {
      DMS_CUDA_TRY(sort(32));  // by position
      detail::compression_pool_kernel<threads>
          <<<rows, threads, 0, stream>>>(st, policy, seq_ids, tmp);
      DMS_CUDA_TRY(cudaGetLastError());
    }
    DMS_CUDA_TRY(sort(64));
    detail::compression_compact_kernel<threads>
        <<<rows, threads, 0, stream>>>(st, policy, seq_ids, tmp);
    DMS_CUDA_TRY(cudaGetLastError());
    detail::compression_release_kernel<threads><<<1, threads, 0, stream>>>(st, seq_ids, rows, tmp);
    return cudaGetLastError();
  }
}

/// The same on a device_cache.
template <storage_type T, class Policy>
[[nodiscard]] cudaError_t finish_prompts(void* d_temp, std::size_t& temp_bytes,
                                         const device_cache<T, Policy>& cache,
                                         const std::int32_t* seq_ids, int batch,
                                         cudaStream_t stream = nullptr) {
  return finish_prompts(d_temp, temp_bytes, cache.state(), cache.device_policy(), seq_ids, batch,
                        stream);
}

}  // namespace cuda
DMS_NAMESPACE_END
