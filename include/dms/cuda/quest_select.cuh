// SPDX-License-Identifier: Apache-2.0
#pragma once

// Quest page selection on the device (spec "Quest"). For every (sequence, KV head) row of a decode
// batch it lists the logical pages attention reads this step, exactly as the CPU's
// quest_policy::select_pages does (dms/policy/quest.hpp):
//
//   n = pages of the row, budget = policy.page_budget(page_size)
//   n <= budget:  0, 1, ..., n - 1              (a dense layer's budget is unlimited)
//   otherwise:    the budget - 1 best of the pages [0, n - 1), ascending, then n - 1
//
// where a page's score is the max over the query heads of the group of quest_rule::upper_bound,
// higher first, ties to the lower page index. The result is bitwise the CPU's: each bound is
// computed by quest_rule::upper_bound itself, by one thread, channels in order, from q converted
// with dms::to_float; the group is folded with the CPU's max, heads in order.
//
// Two kernels, no host round trip, so a step can be captured in a CUDA graph:
//  1. score — blocks of (tile of pages, row). The tile's page bounds are staged in shared memory
//     (coalesced loads, reused by all G heads) next to q as floats; one thread per (page, head)
//     computes the bound, one thread per page folds the group. The score is stored as a 32-bit
//     key whose ascending order is the descending score (temporary storage).
//  2. select — one block per row. A radix select (four 8-bit passes over the keys) finds the key K
//     of the (budget - 1)-th best page and how many pages scoring K to take; one scan in page
//     order then writes every page that scores better than K and the first ones that score K.
//     Any row length works: the keys of up to quest_select_tuning::cached_keys pages are read
//     from shared memory, longer rows' from global memory.
//
// Bit-exactness assumes the default floating-point mode: --use_fast_math (or -ftz=true) changes
// quest_rule::upper_bound on the device but not on the CPU.
//
// API in CUB's shape: views and a stream in, cudaError_t out, two-phase temporary storage (call
// once with d_temp == nullptr to get temp_bytes, then again with that much device memory).

#if !defined(__CUDACC__)
#error \
    "dms/cuda/quest_select.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cub/block/block_scan.cuh>
#include <type_traits>

#include "dms/cache_config.hpp"
#include "dms/cache_view.hpp"
#include "dms/config.hpp"
#include "dms/cuda/check.cuh"
#include "dms/numeric.hpp"
#include "dms/policy/quest.hpp"

DMS_NAMESPACE_BEGIN
namespace cuda {

/// Launch shapes and limits, as plain data (CUB's tuning-policy habit).
struct quest_select_tuning {
  // score: dynamic shared memory is kept within the 48 KiB every device grants without opt-in.
  static constexpr int score_smem_floats = 12 * 1024;
  static constexpr int score_q_floats = 3 * 1024;  // q's share: heads beyond it go in chunks
  static constexpr int score_max_threads = 256;
  static constexpr int score_max_tile_pages = 128;
  static constexpr int score_max_tiles = 256;  // grid.x; blocks loop over further tiles
  // select: one histogram bin per thread (8-bit digits).
  static constexpr int select_threads = 256;
  static constexpr int select_items = 4;    // keys per thread per scan of the final pass
  static constexpr int cached_keys = 4096;  // rows with more scored pages read keys from global
};

namespace detail {

// What both kernels read of the cache and the batch (the K/V storage type plays no part).
struct quest_rows {
  const float* page_min;           // [max_pages][head_dim]
  const float* page_max;           // [max_pages][head_dim]
  const std::int32_t* page_table;  // [max_rows][max_pages_per_row]
  const std::int32_t* row_length;  // [max_rows]
  const std::int32_t* seq_ids;     // [batch]
  int batch;
  int num_kv_heads;
  int group_size;
  int head_dim;
  int page_size;
  int max_pages_per_row;
  int max_rows;

  // Cache row of batch row i = b * num_kv_heads + h, or -1 if seq_ids[b] is out of range.
  __device__ int row(int i) const {
    const int seq = seq_ids[i / num_kv_heads];
    if (seq < 0 || std::int64_t{seq} * num_kv_heads >= max_rows) return -1;
    return seq * num_kv_heads + i % num_kv_heads;
  }
  __device__ int num_pages(int row) const { return (row_length[row] + page_size - 1) / page_size; }
};

// Shared-memory layout of the score kernel, chosen on the host from (group_size, head_dim).
struct quest_score_plan {
  int head_chunk;  // query heads whose q is resident at a time (all G unless G * head_dim is big)
  int tile_pages;  // pages per tile
  int threads;     // block size: one thread per (page, head) of a chunk, rounded up to a warp
  std::size_t smem_bytes;

  static quest_score_plan make(int group_size, int head_dim) {
    using tuning = quest_select_tuning;
    quest_score_plan p{};
    p.head_chunk = std::min(group_size, std::max(1, tuning::score_q_floats / head_dim));
    const int room = tuning::score_smem_floats - p.head_chunk * head_dim;
    const int per_page = 2 * (head_dim + 1) + p.head_chunk;  // padded min and max, one U per head
    p.tile_pages = std::clamp(std::min(room / per_page, tuning::score_max_threads / p.head_chunk),
                              1, tuning::score_max_tile_pages);
    p.threads = (p.tile_pages * p.head_chunk + 31) / 32 * 32;
    p.smem_bytes = sizeof(float) *
                   (std::size_t(p.head_chunk) * head_dim + std::size_t(p.tile_pages) * per_page);
    return p;
  }
};

// Rank key of a score: ascending key = descending score. -0 and +0 compare equal on the CPU, so
// they share a key (and tie to the lower page, as there).
__device__ __forceinline__ std::uint32_t quest_score_key(float u) {
  const std::uint32_t b = __float_as_uint(u == 0.0f ? 0.0f : u);
  return (b & 0x80000000u) ? b : ~(b | 0x80000000u);
}

inline std::size_t quest_select_temp_bytes(int batch, int num_kv_heads, int max_pages_per_row) {
  const std::size_t keys =
      sizeof(std::uint32_t) * std::size_t(batch) * num_kv_heads * std::size_t(max_pages_per_row);
  return (keys + 255) / 256 * 256;
}

// Grid (tiles of plan.tile_pages pages, batch rows), both grid-strided. Writes the keys of pages
// [0, n - 1) of every row with n > budget to keys[i][.]. Rows (and tiles) with nothing to score
// are skipped before touching shared memory; every branch around a barrier is uniform over the
// block, as it depends only on blockIdx and the row.
template <class Q>
__global__ void quest_score_kernel(quest_rows rows, const Q* q, int budget, quest_score_plan plan,
                                   std::uint32_t* keys) {
  // A name of its own: block-scope extern declarations of every kernel share the namespace.
  extern __shared__ float quest_score_smem[];
  const int d = rows.head_dim, G = rows.group_size, stride = d + 1;
  const int GC = plan.head_chunk, TP = plan.tile_pages;
  float* q_s = quest_score_smem;     // [GC][d]   q of the resident heads, as float
  float* lo_s = q_s + GC * d;        // [TP][d+1] page minima; the pad spreads pages over banks
  float* hi_s = lo_s + TP * stride;  // [TP][d+1] page maxima
  float* u_s = hi_s + TP * stride;   // [GC][TP]  bound per (head, page)
  const int tid = int(threadIdx.x), nthreads = int(blockDim.x);
  const bool q_resident = GC == G;  // else q is staged per tile, GC heads at a time
  const bool vec4 = d % 4 == 0;     // the host checked the bound arrays are 16-byte aligned
  const int total_rows = rows.batch * rows.num_kv_heads;

  // Shared-memory reuse: every phase that writes q_s, lo_s or hi_s comes after the barrier that
  // follows the bounds computation (their last reader); the bounds computation writes u_s after
  // the barrier that precedes it, which ends the fold that read u_s last.
  for (int i = int(blockIdx.y); i < total_rows; i += int(gridDim.y)) {
    const int row = rows.row(i);
    if (row < 0) continue;
    const int n = rows.num_pages(row);
    if (n <= budget) continue;
    const int scored = n - 1;
    if (std::int64_t{blockIdx.x} * TP >= scored) continue;
    const Q* q_row = q + std::int64_t{i} * G * d;  // [G][d]: query heads h * G + g
    std::uint32_t* keys_row = keys + std::int64_t{i} * rows.max_pages_per_row;
    const std::int32_t* table = rows.page_table + std::int64_t{row} * rows.max_pages_per_row;
    if (q_resident)
      for (int e = tid; e < G * d; e += nthreads) q_s[e] = to_float(q_row[e]);

    for (std::int64_t tile = blockIdx.x; tile * TP < scored; tile += gridDim.x) {
      const int first = int(tile * TP);
      const int tp = min(TP, scored - first);
      if (vec4) {
        const int d4 = d / 4;
        for (int e = tid; e < tp * d4; e += nthreads) {
          const int p = e / d4, c = (e - p * d4) * 4;
          const std::int64_t at = std::int64_t{table[first + p]} * d + c;
          const float4 lo = *reinterpret_cast<const float4*>(rows.page_min + at);
          const float4 hi = *reinterpret_cast<const float4*>(rows.page_max + at);
          float* l = lo_s + p * stride + c;
          float* h = hi_s + p * stride + c;
          l[0] = lo.x, l[1] = lo.y, l[2] = lo.z, l[3] = lo.w;
          h[0] = hi.x, h[1] = hi.y, h[2] = hi.z, h[3] = hi.w;
        }
      } else {
        for (int e = tid; e < tp * d; e += nthreads) {
          const int p = e / d, c = e - p * d;
          const std::int64_t at = std::int64_t{table[first + p]} * d + c;
          lo_s[p * stride + c] = rows.page_min[at];
          hi_s[p * stride + c] = rows.page_max[at];
        }
      }

      float best = 0.0f;  // thread tid < tp: the score of page first + tid
      for (int g0 = 0; g0 < G; g0 += GC) {
        const int gc = min(GC, G - g0);
        if (!q_resident)
          for (int e = tid; e < gc * d; e += nthreads) q_s[e] = to_float(q_row[g0 * d + e]);
        __syncthreads();  // q_s, lo_s, hi_s written; the previous fold is done with u_s
        // Lanes of a warp share a head (q_s broadcasts) and take consecutive pages.
        for (int e = tid; e < gc * tp; e += nthreads) {
          const int g = e / tp, p = e - g * tp;
          u_s[g * TP + p] =
              quest_rule::upper_bound(q_s + g * d, lo_s + p * stride, hi_s + p * stride, d);
        }
        __syncthreads();  // u_s written; q_s, lo_s, hi_s are free again
        if (tid < tp) {
          const int g_first = g0 == 0 ? 1 : 0;  // head 0 starts the fold
          if (g0 == 0) best = u_s[tid];
          for (int g = g_first; g < gc; ++g) {
            const float u = u_s[g * TP + tid];
            best = best < u ? u : best;  // std::max(best, u), as the CPU folds the group
          }
        }
      }
      if (tid < tp) keys_row[first + tid] = quest_score_key(best);
    }
  }
}

// One block per batch row: pages[i][0, page_counts[i]) ascending.
template <int Threads, int Items, int CachedKeys>
__global__ void __launch_bounds__(Threads)
    quest_select_kernel(quest_rows rows, int budget, const std::uint32_t* keys, std::int32_t* pages,
                        std::int32_t* page_counts, int page_stride) {
  static_assert(Threads == 256, "one thread per bin of an 8-bit digit");
  static_assert(Threads * Items < (1 << 16), "the final scan packs two counts in 16-bit halves");
  using block_scan = cub::BlockScan<int, Threads>;
  __shared__ typename block_scan::TempStorage scan_storage;
  __shared__ int histogram[Threads];
  __shared__ int chosen_digit, chosen_before;
  __shared__ std::uint32_t cached[CachedKeys];

  const int i = int(blockIdx.x), tid = int(threadIdx.x);
  std::int32_t* out = pages + std::int64_t{i} * page_stride;
  const int row = rows.row(i);
  const int n = row < 0 ? 0 : rows.num_pages(row);
  if (n <= budget) {
    for (int p = tid; p < n; p += Threads) out[p] = p;
    if (tid == 0) page_counts[i] = n;
    return;
  }
  const int scored = n - 1, take = budget - 1;  // take < scored
  if (take > 0) {
    const std::uint32_t* src = keys + std::int64_t{i} * rows.max_pages_per_row;
    if (scored <= CachedKeys) {
      for (int p = tid; p < scored; p += Threads) cached[p] = src[p];
      src = cached;  // visible after the first barrier below
    }

    // Radix select, most significant digit first: after the pass at `shift`, the keys that
    // match `prefix` under `mask` hold the take-th smallest key, and `need` more keys are to be
    // taken from them.
    std::uint32_t prefix = 0, mask = 0;
    int need = take;
    for (int shift = 24; shift >= 0; shift -= 8) {
      histogram[tid] = 0;  // this thread alone read it last (below)
      __syncthreads();
      for (int p = tid; p < scored; p += Threads) {
        const std::uint32_t key = src[p];
        if ((key & mask) == prefix) atomicAdd(&histogram[(key >> shift) & 0xffu], 1);
      }
      __syncthreads();
      const int count = histogram[tid];
      int before = 0;
      block_scan(scan_storage).ExclusiveSum(count, before);
      if (before < need && need <= before + count) {  // exactly one digit: 0 < need <= all
        chosen_digit = tid;
        chosen_before = before;
      }
      __syncthreads();  // also orders this pass's scan before the next use of scan_storage
      prefix |= std::uint32_t(chosen_digit) << shift;
      mask |= 0xffu << shift;
      need -= chosen_before;  // chosen_* are rewritten only after two more barriers
    }

    // Every key below `prefix` and the first `need` keys equal to it, in page order. The scan
    // counts both at once: below in the high 16 bits, equal in the low 16.
    const std::uint32_t threshold = prefix;
    int below_base = 0, equal_base = 0;
    for (int first = 0; first < scored; first += Threads * Items) {
      int flags[Items], before[Items], total = 0;
      for (int j = 0; j < Items; ++j) {
        const int p = first + tid * Items + j;
        const std::uint32_t key = p < scored ? src[p] : 0xffffffffu;
        flags[j] = p >= scored ? 0 : key < threshold ? (1 << 16) : key == threshold ? 1 : 0;
      }
      block_scan(scan_storage).ExclusiveSum(flags, before, total);
      for (int j = 0; j < Items; ++j) {
        if (flags[j] == 0) continue;
        const int below = below_base + (before[j] >> 16);
        const int equal = equal_base + (before[j] & 0xffff);
        if (flags[j] >> 16)
          out[below + min(equal, need)] = first + tid * Items + j;
        else if (equal < need)
          out[below + equal] = first + tid * Items + j;
      }
      below_base += total >> 16;
      equal_base += total & 0xffff;
      __syncthreads();  // scan_storage is reused by the next tile
    }
  }
  if (tid == 0) {
    out[take] = scored;  // the current page: always read, never scored
    page_counts[i] = budget;
  }
}

}  // namespace detail

/// Smallest valid page_stride of select_pages for a cache config and policy: the most pages a
/// row can read in one step.
[[nodiscard]] inline int select_pages_stride(const cache_config& cfg,
                                             const quest_device_policy& policy) {
  return std::min(policy.page_budget(cfg.page_size), cfg.max_pages_per_row());
}

/// Pages each row reads this step (Quest), bitwise equal to quest_policy::select_pages.
///
/// seq_ids: [batch] sequence ids (device); batch row i = b * num_kv_heads + h is cache row
///   seq_ids[b] * num_kv_heads + h. An id outside the view's rows yields page_counts[i] = 0.
/// q: [batch][num_kv_heads * group_size][head_dim] queries (device), query head h * G + g;
///   unused (may be null) when no row can need a selection (a dense layer, or page budget 1).
/// pages: [batch * num_kv_heads][page_stride] ascending logical page ids (device);
///   page_counts: [batch * num_kv_heads] entries of pages used per row (device).
/// page_stride >= select_pages_stride(config, policy) = min(policy.page_budget(page_size),
///   view.max_pages_per_row), else cudaErrorInvalidValue.
/// Temporary storage: batch * num_kv_heads * max_pages_per_row * 4 bytes (256-byte rounded);
/// d_temp == nullptr only sets temp_bytes. No host synchronization; graph capturable.
template <class T, class Q>
[[nodiscard]] cudaError_t select_pages(void* d_temp, std::size_t& temp_bytes,
                                       cache_view<const T> view, const std::int32_t* seq_ids,
                                       int batch, const Q* q, const quest_device_policy& policy,
                                       std::int32_t* pages, std::int32_t* page_counts,
                                       int page_stride, cudaStream_t stream = nullptr) {
  static_assert(storage_type<Q>,
                "dms::cuda::select_pages: q must be float, dms::half or dms::bfloat16");
  using tuning = quest_select_tuning;
  if (batch < 0 || view.num_kv_heads < 1 || view.max_pages_per_row < 1)
    return cudaErrorInvalidValue;
  const std::size_t need =
      detail::quest_select_temp_bytes(batch, view.num_kv_heads, view.max_pages_per_row);
  if (d_temp == nullptr) {
    temp_bytes = need;
    return cudaSuccess;
  }
  if (temp_bytes < need || view.page_size < 1) return cudaErrorInvalidValue;
  const int budget = policy.page_budget(view.page_size);
  if (budget < 1 || page_stride < std::min(budget, view.max_pages_per_row))
    return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  if (seq_ids == nullptr || pages == nullptr || page_counts == nullptr)
    return cudaErrorInvalidValue;

  const detail::quest_rows rows{
      view.page_min, view.page_max,  view.page_table,        view.row_length,
      seq_ids,       batch,          view.num_kv_heads,      view.group_size,
      view.head_dim, view.page_size, view.max_pages_per_row, view.max_rows};
  const int total_rows = batch * view.num_kv_heads;
  auto* keys = static_cast<std::uint32_t*>(d_temp);

  // Only a row with more than `budget` pages and budget - 1 > 0 pages to pick needs scores.
  if (budget > 1 && budget < view.max_pages_per_row) {
    if (q == nullptr || view.page_min == nullptr || view.page_max == nullptr ||
        view.group_size < 1 || view.head_dim < 1 || view.head_dim > cache_config::max_head_dim)
      return cudaErrorInvalidValue;
    const auto misaligned = [](const float* p) {
      return reinterpret_cast<std::uintptr_t>(p) % alignof(float4) != 0;
    };
    if (view.head_dim % 4 == 0 && (misaligned(view.page_min) || misaligned(view.page_max)))
      return cudaErrorInvalidValue;
    const auto plan = detail::quest_score_plan::make(view.group_size, view.head_dim);
    const int tiles = (view.max_pages_per_row - 1 + plan.tile_pages - 1) / plan.tile_pages;
    const dim3 grid(unsigned(std::min(tiles, tuning::score_max_tiles)),
                    unsigned(std::min(total_rows, 65535)));
    detail::quest_score_kernel<Q>
        <<<grid, unsigned(plan.threads), plan.smem_bytes, stream>>>(rows, q, budget, plan, keys);
    DMS_CUDA_TRY(cudaGetLastError());
  }
  detail::quest_select_kernel<tuning::select_threads, tuning::select_items, tuning::cached_keys>
      <<<unsigned(total_rows), tuning::select_threads, 0, stream>>>(rows, budget, keys, pages,
                                                                    page_counts, page_stride);
  return cudaGetLastError();
}

/// The same, for a writable view (device_cache::view()).
template <class T, class Q>
requires(!std::is_const_v<T>) [[nodiscard]] cudaError_t
    select_pages(void* d_temp, std::size_t& temp_bytes, cache_view<T> view,
                 const std::int32_t* seq_ids, int batch, const Q* q,
                 const quest_device_policy& policy, std::int32_t* pages, std::int32_t* page_counts,
                 int page_stride, cudaStream_t stream = nullptr) {
  return select_pages(d_temp, temp_bytes, view.read_only(), seq_ids, batch, q, policy, pages,
                      page_counts, page_stride, stream);
}

}  // namespace cuda
DMS_NAMESPACE_END
