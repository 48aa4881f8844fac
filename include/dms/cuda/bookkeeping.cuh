// SPDX-License-Identifier: Apache-2.0
#pragma once

// The bookkeeping kernels of a decode step: append (with every policy's victim rule, slot reuse
// and page allocation from the device free stack), score eviction after attention (TOVA, H2O),
// and sequence release. They run the per-row functions of dms/step/batch_step.hpp, the same code
// the CPU tests check against paged_cache. No host round trip: errors land in the sticky
// cache_state::status word, and every later step is skipped until the host clears it.
//
// API in CUB's shape: views and a stream in, cudaError_t out, two-phase temporary storage
// (call once with d_temp == nullptr to get temp_bytes, then again with that much device memory).

#if !defined(__CUDACC__)
#error \
    "dms/cuda/bookkeeping.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "dms/config.hpp"
#include "dms/cuda/check.cuh"
#include "dms/policy/ranking.hpp"
#include "dms/step/batch_step.hpp"
#include "dms/step/cache_state.hpp"

DMS_NAMESPACE_BEGIN
namespace cuda {

/// Launch shapes, as plain data (CUB's tuning-policy habit).
struct bookkeeping_tuning {
  static constexpr int plan_threads = 256;   // one block plans and commits the whole batch
  static constexpr int write_threads = 128;  // per row: channels of K and V
  static constexpr int evict_threads = 256;  // per row: arg-min over its slots
};

namespace detail {

inline std::size_t align_up(std::size_t n) {
  return (n + 255) / 256 * 256;
}

// Temporary storage of append: per batch row, its plan, its rank among the rows that open a
// page, and where its token went; per sequence id, its first batch index (duplicate detection,
// step::flag_duplicate); one flag that tells the write kernel whether the step committed.
struct append_temp {
  step::row_plan* plans;
  std::int32_t* ranks;
  step::row_slot* slots;
  std::int32_t* first_entry;
  std::int32_t* committed;

  static std::size_t bytes(int rows, int max_sequences) {
    return align_up(sizeof(step::row_plan) * rows) + align_up(sizeof(std::int32_t) * rows) +
           align_up(sizeof(step::row_slot) * rows) +
           align_up(sizeof(std::int32_t) * max_sequences) + align_up(sizeof(std::int32_t));
  }
  static append_temp carve(void* d_temp, int rows, int max_sequences) {
    auto* p = static_cast<unsigned char*>(d_temp);
    append_temp t{};
    t.plans = reinterpret_cast<step::row_plan*>(p);
    p += align_up(sizeof(step::row_plan) * rows);
    t.ranks = reinterpret_cast<std::int32_t*>(p);
    p += align_up(sizeof(std::int32_t) * rows);
    t.slots = reinterpret_cast<step::row_slot*>(p);
    p += align_up(sizeof(step::row_slot) * rows);
    t.first_entry = reinterpret_cast<std::int32_t*>(p);
    p += align_up(sizeof(std::int32_t) * max_sequences);
    t.committed = reinterpret_cast<std::int32_t*>(p);
    return t;
  }
};

// One block: plan every row (reads only), scan the fresh-page counts, check, then commit. A single
// block keeps the check-then-commit atomic without a grid-wide barrier; the work per row is a
// few dozen instructions, so even a batch of thousands of rows takes microseconds.
template <int Threads, class T, class DevicePolicy>
__global__ void __launch_bounds__(Threads)
    append_plan_commit_kernel(cache_state<T> st, DevicePolicy policy, const std::int32_t* seq_ids,
                              int batch, const float* decision_logits, bool in_prompt,
                              append_temp tmp) {
  using block_scan = cub::BlockScan<int, Threads>;
  __shared__ typename block_scan::TempStorage scan_storage;
  __shared__ int first_error_row;
  __shared__ int pages_total;
  __shared__ int skip;

  const int H = st.num_kv_heads;
  const int rows = batch * H;
  if (threadIdx.x == 0) {
    first_error_row = rows;
    pages_total = 0;
    skip = *st.status != 0;
    *tmp.committed = 0;
  }
  for (int s = threadIdx.x; s < st.max_sequences; s += Threads) tmp.first_entry[s] = step::no_entry;
  __syncthreads();
  if (skip) return;

  // The first batch index of every id: a minimum, so the same whatever order the atomics land in,
  // and the duplicates flagged below are exactly the serial driver's.
  for (int b = threadIdx.x; b < batch; b += Threads) {
    const int seq = seq_ids[b];
    if (step::valid_sequence(st.active, st.max_sequences, seq)) atomicMin(&tmp.first_entry[seq], b);
  }
  __syncthreads();

  // Plan.
  for (int base = 0; base < rows; base += Threads) {
    const int i = base + int(threadIdx.x);
    step::row_plan plan{-1, 0, step_status::ok};
    if (i < rows) {
      const int seq = seq_ids[i / H];
      const float logit = decision_logits ? decision_logits[i] : 0.0f;
      plan = step::plan_append(st, policy, seq, i % H, logit, in_prompt);
      step::flag_duplicate(plan, tmp.first_entry, seq, i / H, i % H);
      if (plan.error != step_status::ok) atomicMin(&first_error_row, i);
    }
    int rank = 0, total = 0;
    block_scan(scan_storage).ExclusiveSum(plan.fresh, rank, total);
    if (i < rows) {
      tmp.plans[i] = plan;
      tmp.ranks[i] = pages_total + rank;
    }
    __syncthreads();  // everyone read pages_total, and scan_storage is free again
    if (threadIdx.x == 0) pages_total += total;
    __syncthreads();
  }

  // Check: the first error in row order wins, as in the serial driver.
  if (first_error_row < rows || pages_total > *st.free_top) {
    if (threadIdx.x == 0)
      *st.status = std::int32_t(first_error_row < rows ? tmp.plans[first_error_row].error
                                                       : step_status::pool_exhausted);
    return;
  }

  // Commit. Rows are distinct (duplicates were rejected), so each thread owns its rows.
  for (int i = threadIdx.x; i < rows; i += Threads) {
    const int seq = seq_ids[i / H];
    const float logit = decision_logits ? decision_logits[i] : 0.0f;
    tmp.slots[i] =
        step::commit_append(st, policy, seq, i % H, logit, in_prompt, tmp.plans[i], tmp.ranks[i]);
  }
  __syncthreads();  // every commit read free_top
  if (threadIdx.x == 0) {
    *st.free_top -= pages_total;
    *tmp.committed = 1;
  }
}

// One block per batch row: store K and V of the new token, widen Quest's page bounds.
template <int Threads, class T, class In>
__global__ void __launch_bounds__(Threads)
    append_write_kernel(cache_state<T> st, const std::int32_t* seq_ids, const In* k, const In* v,
                        append_temp tmp) {
  if (*tmp.committed == 0) return;
  const int i = blockIdx.x;
  const int row = seq_ids[i / st.num_kv_heads] * st.num_kv_heads + i % st.num_kv_heads;
  const step::row_slot where = tmp.slots[i];
  const std::int64_t in = std::int64_t{i} * st.head_dim;
  for (int c = threadIdx.x; c < st.head_dim; c += Threads)
    step::write_channel(st, row, where, c, k[in + c], v[in + c]);
}

// A candidate for eviction, reduced with the shared tie rule (lowest score, then oldest).
struct evict_candidate {
  float score;
  std::int32_t position;
  std::int32_t slot;  // -1 = none
};
struct evicts_first {
  __device__ evict_candidate operator()(const evict_candidate& a, const evict_candidate& b) const {
    if (a.slot < 0) return b;
    if (b.slot < 0) return a;
    return evicts_before(b.score, b.position, a.score, a.position) ? b : a;
  }
};

// One block per batch row: while the row holds more than the budget, evict the lowest-score slot
// among the unprotected positions (the block-parallel form of step::evict_row_by_score).
template <int Threads, class T, class DevicePolicy>
__global__ void __launch_bounds__(Threads)
    evict_by_score_kernel(cache_state<T> st, DevicePolicy policy, const std::int32_t* seq_ids) {
  using block_reduce = cub::BlockReduce<evict_candidate, Threads>;
  __shared__ typename block_reduce::TempStorage storage;
  __shared__ int done;
  if (*st.status != 0) return;
  const int row =
      seq_ids[blockIdx.x / st.num_kv_heads] * st.num_kv_heads + int(blockIdx.x) % st.num_kv_heads;
  const std::int32_t limit = policy.protected_from(st.seen[row]);
  for (;;) {
    __syncthreads();  // the previous round's push_hole is visible; storage is free
    if (st.live[row] <= policy.budget()) return;
    evict_candidate best{0.0f, 0, -1};
    const int n = st.row_length[row];
    for (int s = threadIdx.x; s < n; s += Threads) {
      const std::int64_t at = st.slot_index(row, s);
      const std::int32_t p = st.position[at];
      if (p < 0 || p >= limit) continue;
      best = evicts_first{}(best, evict_candidate{st.score[at], p, s});
    }
    const evict_candidate victim = block_reduce(storage).Reduce(best, evicts_first{});
    if (threadIdx.x == 0) {
      done = victim.slot < 0;
      if (!done) st.push_hole(row, victim.slot);
    }
    __syncthreads();
    if (done) return;
  }
}

// Releases sequences one after another (serial: it is rare and tiny, and the free stack order
// must match the host cache's).
template <class T>
__global__ void release_sequences_kernel(cache_state<T> st, const std::int32_t* seq_ids,
                                         int count) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  for (int b = 0; b < count; ++b) step::release_sequence(st, seq_ids[b]);
}

}  // namespace detail

/// Appends one token to every KV-head row of each sequence in seq_ids[0, batch): the policy's
/// victim rule, slot reuse, pages from the device free stack, K/V rounded to T.
/// k, v: [batch][num_kv_heads][head_dim] (device); decision_logits: [batch][num_kv_heads] or
/// null. On a policy or capacity error nothing changes and cache_state::status records why.
/// d_temp == nullptr: only sets temp_bytes.
template <class T, class DevicePolicy, class In>
[[nodiscard]] cudaError_t append(void* d_temp, std::size_t& temp_bytes, const cache_state<T>& st,
                                 const DevicePolicy& policy, const std::int32_t* seq_ids, int batch,
                                 const In* k, const In* v, const float* decision_logits,
                                 bool in_prompt, cudaStream_t stream = nullptr) {
  const int rows = batch * st.num_kv_heads;
  const std::size_t need = detail::append_temp::bytes(rows, st.max_sequences);
  if (d_temp == nullptr) {
    temp_bytes = need;
    return cudaSuccess;
  }
  if (temp_bytes < need || batch < 0) return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  const auto tmp = detail::append_temp::carve(d_temp, rows, st.max_sequences);
  constexpr int plan = bookkeeping_tuning::plan_threads;
  constexpr int write = bookkeeping_tuning::write_threads;
  detail::append_plan_commit_kernel<plan>
      <<<1, plan, 0, stream>>>(st, policy, seq_ids, batch, decision_logits, in_prompt, tmp);
  DMS_CUDA_TRY(cudaGetLastError());
  detail::append_write_kernel<write><<<rows, write, 0, stream>>>(st, seq_ids, k, v, tmp);
  return cudaGetLastError();
}

/// After attention: rows of score-evicting policies (TOVA, H2O) shrink to their budget. A no-op
/// (no launch) for the other policies.
template <class T, class DevicePolicy>
[[nodiscard]] cudaError_t evict_after_attention(const cache_state<T>& st,
                                                const DevicePolicy& policy,
                                                const std::int32_t* seq_ids, int batch,
                                                cudaStream_t stream = nullptr) {
  if constexpr (DevicePolicy::evicts_by_score) {
    if (batch <= 0) return batch < 0 ? cudaErrorInvalidValue : cudaSuccess;
    constexpr int threads = bookkeeping_tuning::evict_threads;
    detail::evict_by_score_kernel<threads>
        <<<batch * st.num_kv_heads, threads, 0, stream>>>(st, policy, seq_ids);
    return cudaGetLastError();
  } else {
    (void)st, (void)policy, (void)seq_ids, (void)batch, (void)stream;
    return cudaSuccess;
  }
}

/// Frees the pages of seq_ids[0, count) and marks the ids free for reuse.
template <class T>
[[nodiscard]] cudaError_t release_sequences(const cache_state<T>& st, const std::int32_t* seq_ids,
                                            int count, cudaStream_t stream = nullptr) {
  if (count <= 0) return count < 0 ? cudaErrorInvalidValue : cudaSuccess;
  detail::release_sequences_kernel<<<1, 32, 0, stream>>>(st, seq_ids, count);
  return cudaGetLastError();
}

}  // namespace cuda
DMS_NAMESPACE_END
