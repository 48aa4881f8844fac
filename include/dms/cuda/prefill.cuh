// SPDX-License-Identifier: Apache-2.0
#pragma once

// Chunked prefill on the GPU: for each chunk of the prompts of a batch, prefill attention
// (dms/cuda/prefill_attention.cuh), then the chunk's K/V go into the device cache with the decode
// bookkeeping's rules, so DMS drops what no later query can see (a flagged token's slot is reused
// by the token w+1 positions later) and later chunks and decode read only survivors + window.
// Everything stays on the device: no host synchronization, errors land in the cache's sticky
// status word (dms/step/cache_state.hpp) like every other device step.
//
// The chunk append (append_prompt) is one pass over the chunk, not one launch pair per token,
// and its result is exactly that of appending the chunk's real tokens one by one with
// dms::cuda::append(..., in_prompt = true), sequence after sequence in batch order (the host's
// dms::reference::prefill_chunk order): the same slots, positions, rings, counters, page ids and
// free stack. It relies on the in-prompt victim rule being known (prefill_traits<DevicePolicy>):
// none for the training-free policies; DMS's shift rule, under which token t takes the slot of
// token t-w-1 iff that token is flagged. So:
//   * a token's slot is that of token t-w-1 if flagged (followed back through the chunk), else
//     the k-th slot a non-victim takes: the row's holes in pop order, then fresh slots at the end
//     of the row, where k counts the chunk's earlier non-victims (a block-wide scan);
//   * fresh pages are numbered by a device-wide scan in (sequence, token, kv head) order, which is
//     the order in which token-by-token appends pop them from the free stack;
//   * a token whose slot a later token of the same chunk reuses is never written.
// Unlike token-by-token appends, a chunk that cannot complete (pool exhausted, row full, unknown
// or duplicate sequence) changes nothing, like the host prefill (check_prompt_capacity).
//
// prefill() runs, per chunk, prefill_attention, append_prompt and, for the policies that rank
// the prompt by attention (TOVA, H2O, SnapKV), prompt_scores (dms/cuda/prompt_scores.cuh); after
// the last chunk, finish_prompts (dms/cuda/prompt_compression.cuh) reduces the prompts of the
// training-free policies to their budgets. Every library policy is taken.

#if !defined(__CUDACC__)
#error "dms/cuda/prefill.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_scan.cuh>
#include <type_traits>

#include "dms/config.hpp"
#include "dms/cuda/check.cuh"
#include "dms/cuda/device_cache.cuh"
#include "dms/cuda/prefill_attention.cuh"
#include "dms/cuda/prompt_compression.cuh"
#include "dms/cuda/prompt_scores.cuh"
#include "dms/numeric.hpp"
#include "dms/policy/dms.hpp"
#include "dms/step/batch_step.hpp"
#include "dms/step/cache_state.hpp"

DMS_NAMESPACE_BEGIN
namespace cuda {

/// Launch shapes of the chunk append, as plain data.
struct prompt_append_tuning {
  static constexpr int plan_threads = 256;    // per row: victims, non-victim scan, fresh pages
  static constexpr int check_threads = 256;   // one block: errors, capacity, commit decision
  static constexpr int commit_threads = 256;  // per row: slots, pages, positions, ring, counters
  static constexpr int write_warps = 8;       // per block: one token's K/V row per warp
};

namespace detail {

// Temporary storage of append_prompt. rows = batch * num_kv_heads; row-major arrays are
// [rows][chunk], the page-order arrays [batch][chunk][num_kv_heads].
struct prompt_append_temp {
  std::uint8_t* victim;            // [rows][chunk] the token reuses the slot of token t-w-1
  std::int32_t* nonvictim_before;  // [rows][chunk] non-victims among the chunk's earlier tokens
  std::int32_t* fresh;             // [batch][chunk][H] the token opens a page
  std::int32_t* rank;              // [batch][chunk][H] exclusive scan of fresh
  std::int32_t* holes;             // [rows][chunk] the holes the chunk refills, in pop order
  std::int32_t* slot;              // [rows][chunk] where each token goes
  std::int32_t* row_nonvictim;     // [rows]
  std::int32_t* row_hole_after;    // [rows] hole_head once the refilled holes are popped
  std::int32_t* row_error;         // [rows] step_status
  std::int32_t* control;           // [2] committed, free_top before the chunk
  void* scan_temp;
  std::size_t scan_bytes;

  static std::size_t bytes(int rows, int chunk, std::size_t scan_bytes) {
    const auto cells = std::size_t(rows) * std::size_t(chunk);
    return prefill_align(cells) + 5 * prefill_align(sizeof(std::int32_t) * cells) +
           3 * prefill_align(sizeof(std::int32_t) * std::size_t(rows)) +
           prefill_align(2 * sizeof(std::int32_t)) + prefill_align(scan_bytes);
  }
  static prompt_append_temp carve(void* d_temp, int rows, int chunk, std::size_t scan_bytes) {
    auto* p = static_cast<unsigned char*>(d_temp);
    const auto cells = std::size_t(rows) * std::size_t(chunk);
    const auto take = [&p](std::size_t n) {
      auto* out = p;
      p += prefill_align(n);
      return out;
    };
    prompt_append_temp t{};
    t.victim = take(cells);
    t.nonvictim_before = reinterpret_cast<std::int32_t*>(take(sizeof(std::int32_t) * cells));
    t.fresh = reinterpret_cast<std::int32_t*>(take(sizeof(std::int32_t) * cells));
    t.rank = reinterpret_cast<std::int32_t*>(take(sizeof(std::int32_t) * cells));
    t.holes = reinterpret_cast<std::int32_t*>(take(sizeof(std::int32_t) * cells));
    t.slot = reinterpret_cast<std::int32_t*>(take(sizeof(std::int32_t) * cells));
    t.row_nonvictim = reinterpret_cast<std::int32_t*>(take(sizeof(std::int32_t) * rows));
    t.row_hole_after = reinterpret_cast<std::int32_t*>(take(sizeof(std::int32_t) * rows));
    t.row_error = reinterpret_cast<std::int32_t*>(take(sizeof(std::int32_t) * rows));
    t.control = reinterpret_cast<std::int32_t*>(take(2 * sizeof(std::int32_t)));
    t.scan_temp = take(scan_bytes);
    t.scan_bytes = scan_bytes;
    return t;
  }
};

// Whether token p of a DMS row is flagged, for t0 - w - 1 <= p < t0 + n - 1 (n: the chunk's real
// tokens): token p + 1 carries p's decision, so the chunk's logits decide for p >= t0 - 1 and the
// ring (which holds tokens [t0 - w - 1, t0 - 1]) for older tokens.
template <class T>
DMS_DEVICE bool prompt_flagged(const cache_state<T>& st, const chunk_params<T>& c, int row, int b,
                               int h, int pad, std::int32_t t0, std::int32_t window,
                               std::int32_t p) {
  if (p >= t0 - 1) return dms_rule::evicts(c.logit(b, pad + (p + 1 - t0), h, st.num_kv_heads));
  return st.ring_flag[std::int64_t{row} * st.ring_length + p % (window + 1)] != 0;
}

// Phase 1, one block per row (reads only): which tokens reuse a victim's slot, how many
// non-victims precede each token, which tokens open a page, the holes to refill, row errors.
template <int Threads, class T>
__global__ void __launch_bounds__(Threads)
    prompt_plan_kernel(cache_state<T> st, chunk_params<T> c, std::int32_t window,
                       prompt_append_temp tmp) {
  using block_scan = cub::BlockScan<int, Threads>;
  __shared__ typename block_scan::TempStorage scan_storage;
  const int H = st.num_kv_heads, C = c.length;
  const int r = int(blockIdx.x), b = r / H, h = r % H;
  const std::int64_t cells = std::int64_t{r} * C;
  const int seq = c.in.seq_ids[b];
  // After a failed step (the check kernel then skips the chunk) or for an unknown sequence: no
  // pages, so that the scan reads defined values.
  const bool failed = *st.status != 0;
  if (failed || !step::valid_sequence(st.active, st.max_sequences, seq)) {
    for (int i = int(threadIdx.x); i < C; i += Threads)
      tmp.fresh[(std::int64_t{b} * C + i) * H + h] = 0;
    if (threadIdx.x == 0)
      tmp.row_error[r] = std::int32_t(failed ? step_status::ok : step_status::bad_sequence);
    return;
  }
  const int row = seq * H + h;
  const std::int32_t t0 = st.seen[row];
  const int length = st.row_length[row];
  const int holes = length - st.live[row];
  const int pad = c.padding(b);

  int carry = 0;  // non-victims so far
  for (int i0 = 0; i0 < C; i0 += Threads) {
    const int i = i0 + int(threadIdx.x);
    const bool real = i < C && i >= pad;
    bool victim = false;
    if (real && window >= 0) {
      const std::int32_t p = t0 + (i - pad) - window - 1;
      victim = p >= 0 && prompt_flagged(st, c, row, b, h, pad, t0, window, p);
    }
    const int nonvictim = real && !victim ? 1 : 0;
    int before = 0, added = 0;
    block_scan(scan_storage).ExclusiveSum(nonvictim, before, added);
    if (i < C) {
      const int k = carry + before;
      tmp.victim[cells + i] = victim ? 1 : 0;
      tmp.nonvictim_before[cells + i] = k;
      // Non-victim k takes hole k while there are holes, then grows the row by one slot.
      const bool fresh = nonvictim && k >= holes && (length + (k - holes)) % st.page_size == 0;
      tmp.fresh[(std::int64_t{b} * C + i) * H + h] = fresh ? 1 : 0;
    }
    carry += added;
    __syncthreads();  // scan_storage is reused
  }

  if (threadIdx.x == 0) {
    tmp.row_nonvictim[r] = carry;
    const std::int64_t grown = std::int64_t{length} + (carry > holes ? carry - holes : 0);
    tmp.row_error[r] =
        std::int32_t(grown > st.max_row_slots ? step_status::row_full : step_status::ok);
    // The holes the chunk refills, in the order the decode append pops them (LIFO list).
    int hole = st.hole_head[row];
    const int refill = holes < carry ? holes : carry;
    for (int x = 0; x < refill && hole >= 0; ++x) {
      tmp.holes[cells + x] = hole;
      const std::int32_t link = st.position[st.slot_index(row, hole)];
      hole = link == -1 ? -1 : -2 - link;
    }
    tmp.row_hole_after[r] = hole;
  }
}

// Phase 2, one block: the first error in row order (duplicates included) or pool exhaustion
// stops the chunk (sticky status, nothing changes); otherwise reserve the pages.
template <int Threads, class T>
__global__ void __launch_bounds__(Threads)
    prompt_check_kernel(cache_state<T> st, chunk_params<T> c, prompt_append_temp tmp) {
  __shared__ int first_error_row;
  __shared__ int skip;
  const int H = st.num_kv_heads, rows = c.in.batch * H;
  if (threadIdx.x == 0) {
    tmp.control[0] = 0;
    first_error_row = rows;
    skip = *st.status != 0;
  }
  __syncthreads();
  if (skip) return;
  // A sequence id that appears twice: its later entries fail (the first one alone is valid).
  for (int b = int(threadIdx.x); b < c.in.batch; b += Threads) {
    const int seq = c.in.seq_ids[b];
    for (int e = 0; e < b; ++e)
      if (c.in.seq_ids[e] == seq) {
        if (tmp.row_error[b * H] == std::int32_t(step_status::ok))
          tmp.row_error[b * H] = std::int32_t(step_status::duplicate_sequence);
        break;
      }
  }
  __syncthreads();
  for (int i = int(threadIdx.x); i < rows; i += Threads)
    if (tmp.row_error[i] != std::int32_t(step_status::ok)) atomicMin(&first_error_row, i);
  __syncthreads();
  if (threadIdx.x != 0) return;
  const std::int64_t items = std::int64_t{rows} * c.length;
  const int pages = items > 0 ? tmp.rank[items - 1] + tmp.fresh[items - 1] : 0;
  if (first_error_row < rows) {
    *st.status = tmp.row_error[first_error_row];
  } else if (pages > *st.free_top) {
    *st.status = std::int32_t(step_status::pool_exhausted);
  } else {
    tmp.control[1] = *st.free_top;
    *st.free_top -= pages;
    tmp.control[0] = 1;
  }
}

// Phase 3, one block per row: slots and fresh pages; then positions, scores, the DMS ring (or
// the policy's on_append, in token order), Quest's key bounds and the row counters.
template <int Threads, class T, class DevicePolicy>
__global__ void __launch_bounds__(Threads)
    prompt_commit_kernel(cache_state<T> st, DevicePolicy policy, chunk_params<T> c,
                         std::int32_t window, prompt_append_temp tmp) {
  if (tmp.control[0] == 0) return;
  const int H = st.num_kv_heads, C = c.length, D = st.head_dim;
  const int r = int(blockIdx.x), b = r / H, h = r % H;
  const std::int64_t cells = std::int64_t{r} * C;
  const int row = c.in.seq_ids[b] * H + h;
  const std::int32_t t0 = st.seen[row];
  const int length = st.row_length[row];
  const int live = st.live[row];
  const int holes = length - live;
  const int pad = c.padding(b), n = C - pad;
  const int nonvictims = tmp.row_nonvictim[r];
  const int free_top = tmp.control[1];

  // Slots, a tile of tokens at a time. A victim takes the slot of token t-w-1: followed back in
  // shared memory within the tile, then read from an earlier tile's result or from the ring.
  __shared__ std::int32_t tile_slot[Threads];
  __shared__ std::uint8_t tile_victim[Threads];
  for (int i0 = pad; i0 < C; i0 += Threads) {
    const int i = i0 + int(threadIdx.x);
    if (i < C) {
      const bool victim = tmp.victim[cells + i] != 0;
      tile_victim[threadIdx.x] = victim ? 1 : 0;
      if (!victim) {
        const int k = tmp.nonvictim_before[cells + i];
        tile_slot[threadIdx.x] = k < holes ? tmp.holes[cells + k] : length + (k - holes);
      }
    }
    __syncthreads();
    if (i < C) {
      int at = i, slot;
      for (;;) {
        if (!tile_victim[at - i0]) {
          slot = tile_slot[at - i0];
          break;
        }
        const std::int32_t p = t0 + (at - pad) - window - 1;  // whose slot it reuses
        if (p < t0) {
          slot = st.ring_slot[std::int64_t{row} * st.ring_length + p % (window + 1)];
          break;
        }
        at = pad + (p - t0);
        if (at < i0) {
          slot = tmp.slot[cells + at];  // written in an earlier tile, before its barrier
          break;
        }
      }
      tmp.slot[cells + i] = slot;
      const std::int64_t e = (std::int64_t{b} * C + i) * H + h;
      if (tmp.fresh[e])
        st.page_entry(row, slot / st.page_size) = st.free_pages[free_top - 1 - tmp.rank[e]];
    }
    __syncthreads();  // the tile arrays are reused
  }
  // The barrier that ended the last tile made slots and page-table entries visible to the
  // block, and every read of the ring is done.

  for (int i = pad + int(threadIdx.x); i < C; i += Threads) {
    const int ii = i - pad;
    const bool overwritten =
        window >= 0 && ii + window + 1 < n && tmp.victim[cells + i + window + 1];
    if (overwritten) continue;
    const std::int64_t at = st.slot_index(row, tmp.slot[cells + i]);
    st.position[at] = t0 + ii;
    if (st.score) st.score[at] = 0.0f;
  }

  if (n > 0 && window >= 0) {
    // The ring after the chunk: its w+1 newest tokens (slot, flag), and the flag of the token
    // before the chunk, which the chunk's first token decides.
    const std::int32_t end = t0 + n;
    const std::int64_t ring = std::int64_t{row} * st.ring_length;
    const std::int32_t from = max(max(t0 - 1, end - 1 - window), 0);
    for (std::int32_t q = from + std::int32_t(threadIdx.x); q < end; q += Threads) {
      const std::int64_t x = ring + q % (window + 1);
      if (q >= t0) {
        st.ring_slot[x] = tmp.slot[cells + pad + (q - t0)];
        st.ring_flag[x] =
            q + 1 < end && dms_rule::evicts(c.logit(b, pad + (q + 1 - t0), h, H)) ? 1 : 0;
      } else {
        st.ring_flag[x] = dms_rule::evicts(c.logit(b, pad, h, H)) ? 1 : 0;
      }
    }
  }

  if constexpr (DevicePolicy::needs_page_bounds) {
    // Per channel, in token order: a page's first token sets its bounds, later ones widen them.
    for (int ch = int(threadIdx.x); ch < D; ch += Threads) {
      for (int i = pad; i < C; ++i) {
        const int slot = tmp.slot[cells + i];
        const std::int64_t bound = std::int64_t{st.page_entry(row, slot / st.page_size)} * D + ch;
        const float x = to_float(c.in.k[(c.token(b, i) * H + h) * D + ch]);
        if (tmp.fresh[(std::int64_t{b} * C + i) * H + h]) {
          st.page_min[bound] = x;
          st.page_max[bound] = x;
        } else {
          st.page_min[bound] = x < st.page_min[bound] ? x : st.page_min[bound];
          st.page_max[bound] = x > st.page_max[bound] ? x : st.page_max[bound];
        }
      }
    }
  }

  if (threadIdx.x == 0) {
    if (window < 0 && st.ring_length > 0) {
      // A ring-keeping policy without victims in the prompt: its own hook, token by token.
      for (int i = pad; i < C; ++i)
        policy.on_append(st.context(row), token_info{t0 + (i - pad), c.logit(b, i, h, H), true},
                         tmp.slot[cells + i]);
    }
    st.row_length[row] = length + (nonvictims > holes ? nonvictims - holes : 0);
    st.live[row] = live + nonvictims;
    st.seen[row] = t0 + n;
    if (st.live[row] > st.peak[row]) st.peak[row] = st.live[row];
    st.hole_head[row] = tmp.row_hole_after[r];
  }
}

// Phase 4: K/V of every token that keeps its slot, one warp per (row, token). Vector copies of
// 16 bytes when rows and pointers allow it.
template <int Warps, bool Vector, class T>
__global__ void __launch_bounds__(Warps * 32)
    prompt_write_kernel(cache_state<T> st, chunk_params<T> c, std::int32_t window,
                        prompt_append_temp tmp) {
  if (tmp.control[0] == 0) return;
  const int H = st.num_kv_heads, C = c.length, D = st.head_dim;
  const int r = int(blockIdx.x), b = r / H, h = r % H;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int i = int(blockIdx.y) * Warps + warp;
  const int pad = c.padding(b), n = C - pad;
  if (i >= C || i < pad) return;
  const std::int64_t cells = std::int64_t{r} * C;
  if (window >= 0 && (i - pad) + window + 1 < n && tmp.victim[cells + i + window + 1]) return;
  const int row = c.in.seq_ids[b] * H + h;
  const std::int64_t dst = st.slot_index(row, tmp.slot[cells + i]) * D;
  const std::int64_t src = (c.token(b, i) * H + h) * D;
  if constexpr (Vector) {
    const int units = D * int(sizeof(T)) / 16;
    const auto* ks = reinterpret_cast<const uint4*>(c.in.k + src);
    const auto* vs = reinterpret_cast<const uint4*>(c.in.v + src);
    auto* kd = reinterpret_cast<uint4*>(st.k + dst);
    auto* vd = reinterpret_cast<uint4*>(st.v + dst);
    for (int u = lane; u < units; u += 32) {
      kd[u] = ks[u];
      vd[u] = vs[u];
    }
  } else {
    for (int ch = lane; ch < D; ch += 32) {
      st.k[dst + ch] = c.in.k[src + ch];
      st.v[dst + ch] = c.in.v[src + ch];
    }
  }
}

template <class T>
std::size_t prompt_scan_bytes(int items) {
  std::size_t bytes = 0;
  (void)cub::DeviceScan::ExclusiveSum(nullptr, bytes, static_cast<const std::int32_t*>(nullptr),
                                      static_cast<std::int32_t*>(nullptr), items);
  return bytes;
}

}  // namespace detail

/// Temporary storage append_prompt needs for a chunk of `length` tokens of `batch` sequences.
template <class T>
[[nodiscard]] std::size_t append_prompt_temp_bytes(const cache_state<T>& st, int batch,
                                                   int length) {
  const int rows = batch * st.num_kv_heads;
  return detail::prompt_append_temp::bytes(
      rows, length, detail::prompt_scan_bytes<T>(std::max(1, rows * length)));
}

/// Appends the chunk [begin, begin + length) of in's prompts to the cache (in.k, in.v,
/// in.decision_logits, in.padding; padding tokens are skipped), with the result of appending the
/// chunk's real tokens one by one with dms::cuda::append(..., in_prompt = true). Nothing changes
/// and cache_state::status records why if the chunk cannot complete, or if an earlier step failed.
/// d_temp == nullptr: only sets temp_bytes.
template <class T, class DevicePolicy>
[[nodiscard]] cudaError_t append_prompt(void* d_temp, std::size_t& temp_bytes,
                                        const cache_state<T>& st, const DevicePolicy& policy,
                                        const prefill_batch<T>& in, int begin, int length,
                                        cudaStream_t stream = nullptr) {
  static_assert(prefill_traits<DevicePolicy>::known,
                "dms::cuda::append_prompt: the policy's victim rule inside a prompt is unknown; "
                "specialize dms::cuda::prefill_traits for it");
  if (in.batch < 0 || begin < 0 || length < 0 ||
      std::int64_t{begin} + length > std::int64_t{in.tokens} ||
      std::int64_t{in.batch} * st.num_kv_heads * length > INT_MAX)
    return cudaErrorInvalidValue;
  const std::size_t need = append_prompt_temp_bytes(st, in.batch, length);
  if (d_temp == nullptr) {
    temp_bytes = need;
    return cudaSuccess;
  }
  if (temp_bytes < need) return cudaErrorInvalidValue;
  if (in.batch == 0 || length == 0) return cudaSuccess;
  if (!in.seq_ids || !in.k || !in.v ||
      (length + prompt_append_tuning::write_warps - 1) / prompt_append_tuning::write_warps > 65535)
    return cudaErrorInvalidValue;

  const int rows = in.batch * st.num_kv_heads, items = rows * length;
  const auto tmp =
      detail::prompt_append_temp::carve(d_temp, rows, length, detail::prompt_scan_bytes<T>(items));
  const detail::chunk_params<T> c{in, begin, length};
  const std::int32_t window = prefill_traits<DevicePolicy>::window(policy);
  using tuning = prompt_append_tuning;

  detail::prompt_plan_kernel<tuning::plan_threads, T>
      <<<rows, tuning::plan_threads, 0, stream>>>(st, c, window, tmp);
  DMS_CUDA_TRY(cudaGetLastError());
  std::size_t scan_bytes = tmp.scan_bytes;
  DMS_CUDA_TRY(cub::DeviceScan::ExclusiveSum(tmp.scan_temp, scan_bytes,
                                             static_cast<const std::int32_t*>(tmp.fresh), tmp.rank,
                                             items, stream));
  detail::prompt_check_kernel<tuning::check_threads, T>
      <<<1, tuning::check_threads, 0, stream>>>(st, c, tmp);
  DMS_CUDA_TRY(cudaGetLastError());
  detail::prompt_commit_kernel<tuning::commit_threads, T, DevicePolicy>
      <<<rows, tuning::commit_threads, 0, stream>>>(st, policy, c, window, tmp);
  DMS_CUDA_TRY(cudaGetLastError());

  constexpr int warps = tuning::write_warps;
  const dim3 grid(unsigned(rows), unsigned((length + warps - 1) / warps));
  const bool vector =
      (st.head_dim * sizeof(T)) % 16 == 0 && detail::aligned_16(in.k) && detail::aligned_16(in.v);
  if (vector)
    detail::prompt_write_kernel<warps, true, T>
        <<<grid, warps * 32, 0, stream>>>(st, c, window, tmp);
  else
    detail::prompt_write_kernel<warps, false, T>
        <<<grid, warps * 32, 0, stream>>>(st, c, window, tmp);
  return cudaGetLastError();
}

namespace detail {

// prefill's temporary storage: the prompt's log-sum-exp when the policy scores the prompt and
// the caller passed no lse array ([batch][tokens][num_query_heads] fp32), then one region that
// attention, the append and finish_prompts take in turn.
template <class T, class DevicePolicy>
std::size_t prefill_lse_bytes(const cache_state<T>& st, const prefill_batch<T>& in) {
  if (!DevicePolicy::keeps_scores || in.lse != nullptr) return 0;
  return prefill_align(sizeof(float) * std::size_t(std::max(0, in.batch)) *
                       std::size_t(std::max(0, in.tokens)) *
                       std::size_t(st.num_kv_heads * st.group_size));
}

}  // namespace detail

/// Temporary storage prefill needs for `in` in chunks of chunk_size tokens.
template <class T, class DevicePolicy>
[[nodiscard]] std::size_t prefill_temp_bytes(const cache_state<T>& st, const DevicePolicy&,
                                             const prefill_batch<T>& in, int chunk_size) {
  const int chunk = std::max(1, std::min(chunk_size, in.tokens));
  std::size_t shared = std::max(prefill_attention_temp_bytes(st, in.batch, chunk),
                                append_prompt_temp_bytes(st, in.batch, chunk));
  if constexpr (DevicePolicy::reduces_prompt != prompt_reduction::none)
    shared = std::max(shared, finish_prompts_temp_bytes(st, in.batch));
  return detail::prefill_lse_bytes<T, DevicePolicy>(st, in) + shared;
}

/// Prefills the prompts of `in` (in.tokens per sequence, left-padded by in.padding) in chunks of
/// chunk_size tokens: per chunk, prefill_attention, append_prompt and (TOVA, H2O, SnapKV)
/// prompt_scores; then finish_prompts. Chunk size changes the result by float rounding only.
/// No host synchronization; errors land in cache_state::status. d_temp == nullptr: only sets
/// temp_bytes.
template <class T, class DevicePolicy>
[[nodiscard]] cudaError_t prefill(void* d_temp, std::size_t& temp_bytes, const cache_state<T>& st,
                                  const DevicePolicy& policy, const prefill_batch<T>& in,
                                  int chunk_size, cudaStream_t stream = nullptr) {
  if (chunk_size < 1 || in.tokens < 0 || in.batch < 0) return cudaErrorInvalidValue;
  const std::size_t need = prefill_temp_bytes(st, policy, in, chunk_size);
  if (d_temp == nullptr) {
    temp_bytes = need;
    return cudaSuccess;
  }
  if (temp_bytes < need) return cudaErrorInvalidValue;
  if (in.tokens == 0 || in.batch == 0) return cudaSuccess;
  // The scoring policies need every query's lse: the caller's array, or one in d_temp.
  const std::size_t lse_bytes = detail::prefill_lse_bytes<T, DevicePolicy>(st, in);
  prefill_batch<T> run = in;
  if (lse_bytes > 0) run.lse = static_cast<float*>(d_temp);
  void* shared = static_cast<unsigned char*>(d_temp) + lse_bytes;
  std::size_t shared_bytes = temp_bytes - lse_bytes;
  for (int begin = 0; begin < in.tokens; begin += chunk_size) {
    const int length = std::min(chunk_size, in.tokens - begin);
    DMS_CUDA_TRY(prefill_attention(shared, shared_bytes, st, policy, run, begin, length, stream));
    DMS_CUDA_TRY(append_prompt(shared, shared_bytes, st, policy, run, begin, length, stream));
    if constexpr (DevicePolicy::keeps_scores)
      DMS_CUDA_TRY(prompt_scores(st, policy, run, begin, length, run.lse, stream));
  }
  if constexpr (DevicePolicy::reduces_prompt != prompt_reduction::none)
    DMS_CUDA_TRY(finish_prompts(shared, shared_bytes, st, policy, in.seq_ids, in.batch, stream));
  return cudaSuccess;
}

/// The same on a device_cache.
template <storage_type T, class Policy>
[[nodiscard]] cudaError_t prefill(void* d_temp, std::size_t& temp_bytes,
                                  const device_cache<T, Policy>& cache, const prefill_batch<T>& in,
                                  int chunk_size, cudaStream_t stream = nullptr) {
  return prefill(d_temp, temp_bytes, cache.state(), cache.device_policy(), in, chunk_size, stream);
}

}  // namespace cuda
DMS_NAMESPACE_END
