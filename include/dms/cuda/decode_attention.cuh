// SPDX-License-Identifier: Apache-2.0
#pragma once

// Decode attention on the GPU: one new query token per sequence attends to the live slots of each
// of its rows (or to the slots of a Quest page list), with the semantics of
// dms::reference::decode_attention — softmax over the read slots of scale * q.k, out = sum p v,
// holes (position < 0) skipped, an empty row giving out = 0 and lse = -inf — and optionally the
// fold of the probabilities into the per-slot scores (TOVA: assign, H2O: add).
//
// Flash-decoding in three stream-ordered kernels, with no host round trip, so the whole call can
// be captured in a CUDA graph:
//
//  1. plan (one block): the slots each batch row reads, their sum, and from it one chunk length
//        chunk = max(min_chunk, ceil(total / target_items)),  target_items = num_sms * items_per_sm
//     so that long rows split and short ones do not (a 600-slot DMS row next to a 32K dense row
//     gives 3 and 128 chunks of the same length); a cub::BlockScan of the per-row chunk counts
//     gives the work list [item] -> (batch row, first slot, end slot). There are at most
//     target_items + rows items, a bound the host knows, which sizes everything below.
//  2. attend (as many blocks as fit on the device, each taking work items from an atomic counter
//     until none are left, so skewed rows and late blocks balance): a block is 4 warps; a "key
//     group" of TPK lanes (16-byte loads: TPK = head_dim * sizeof(T) / 16, at most 32) holds one
//     key, each lane CPT = head_dim / TPK channels of it, and computes the logits of all the
//     group's query heads from that one load (GQA: K/V are read once for the whole group). Each
//     key group walks the chunk `unroll` keys at a time (all K and V loads of an iteration in
//     flight together, the next iteration's page-table and position lookups prefetched), with an
//     online softmax in registers. Groups wider than head_channels / CPT heads are split into
//     head tiles over the warps of the block (the tiles read the same keys, mostly from L1), so
//     that q and the accumulators stay in registers. At the end of an item the key groups merge
//     through shared memory into one partial (log2-sum-exp, normalized output) per head.
//  3. merge (grid-stride over tasks): task r < rows merges the partials of batch row r by
//     log-sum-exp into out and lse; with a fold, each further task (one per work item) recomputes
//     its row's log-sum-exp from the partials and folds p = exp2(logit - lse), summed over the
//     group, into the scores of the slots its chunk read. The logits come from a scratch array
//     that the attend kernel filled, indexed by physical slot, so K is read only once.
//
// All arithmetic is fp32 (the softmax runs in the log2 domain: q is pre-scaled by
// scale * log2(e)); K/V may be float, half or bfloat16 (T) and q/out float, half or bfloat16 (Q).
// Results are deterministic: an item's arithmetic does not depend on the block that runs it.
//
// Temporary storage (256-byte aligned regions; detail::decode::make_layout):
//   offsets   int32 [rows + 2]          first item of each batch row; [rows] = number of items,
//                                       [rows + 1] = the attend kernel's work counter
//   work      int4  [max_items]         (batch row, begin, end, 0) in the row's read domain
//   part_lse  float [max_items][G]      log2-sum-exp of each partial (-inf: it read nothing)
//   part_out  float [max_items][G][D]   normalized partial output
//   logits    float [max_pages * P][G]  only with a fold: log2-scaled logit of each slot read
// with rows = batch * num_kv_heads and max_items = num_sms * items_per_sm + rows: it depends on
// (batch, num_kv_heads, group_size, head_dim, num_sms) and, with a fold, on
// decode_options::max_pages * page_size. Pass the same options to both calls.

#if !defined(__CUDACC__)
#error \
    "dms/cuda/decode_attention.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <type_traits>

#include "dms/cache_view.hpp"
#include "dms/config.hpp"
#include "dms/cuda/check.cuh"
#include "dms/numeric.hpp"
#include "dms/policy/policy.hpp"

DMS_NAMESPACE_BEGIN
namespace cuda {

/// Options of decode_attention. All pointers are device pointers.
struct decode_options {
  float softmax_scale = 0.0f;  // 0 = 1 / sqrt(head_dim)
  /// Optional out [batch][num_query_heads]: natural-log log-sum-exp of the scaled logits; -inf
  /// for a head whose row read nothing.
  float* lse = nullptr;
  /// Optional page selection (Quest): [batch * num_kv_heads][page_stride] logical page ids of each
  /// batch row, ascending and distinct; page_counts[batch * num_kv_heads] of them are used. The
  /// slots of a page are clipped to the row's length; ids outside the row read nothing.
  const std::int32_t* pages = nullptr;
  const std::int32_t* page_counts = nullptr;
  int page_stride = 0;  // in [1, max_pages_per_row] when pages is set
  /// Fold of the probabilities into score (TOVA: assign, H2O: add; see dms/policy/policy.hpp):
  /// for each slot read, s = sum over the group's heads of p; score = fold == add ? score + s : s.
  score_update fold = score_update::none;
  float* score = nullptr;  // [max_pages * page_size] the cache's score array; required with fold
  /// Pages in the cache's pool (cache_config::max_pages); required with a fold, where it sizes
  /// the logit scratch (cache_view does not carry it).
  int max_pages = 0;
  /// Optional: += the number of live slots read (atomicAdd), the paper's KV-token reads.
  std::int64_t* kv_reads = nullptr;
  /// SMs to size the grid and the splits for; 0 = ask the current device (cudaDeviceGetAttribute,
  /// which is allowed during stream capture).
  int num_sms = 0;
  /// Optional [1]: a step status word (cache_state::status), read on the device when the call
  /// runs. Nonzero means the step this attention belongs to did not happen (its append failed, or
  /// an earlier step did): then every row reads nothing, so out = 0 and lse = -inf, no score is
  /// folded and kv_reads is unchanged, instead of attending over a cache without the step's
  /// token. decode_step passes the cache's status word here.
  const std::int32_t* skip_if_failed = nullptr;
};

/// Launch shapes and split rule, as plain data.
struct decode_tuning {
  static constexpr int threads = 128;        // attend: 4 warps per block
  static constexpr int items_per_sm = 8;     // target work items: num_sms * items_per_sm
  static constexpr int min_chunk = 128;      // slots; shorter chunks do not pay for their merge
  static constexpr int plan_threads = 256;   // one planning block
  static constexpr int merge_threads = 128;  // merge/fold blocks
  static constexpr int merge_blocks_per_sm = 8;
  static constexpr int max_group_size = 16;  // query heads per KV head
  /// Cap of (query heads per tile) x (channels per lane): the registers of q and of the
  /// accumulators. Larger groups are split into head tiles over the warps of a block.
  static constexpr int head_channels = 32;
};

namespace detail {
namespace decode {

constexpr float log2e = 1.4426950408889634f;
constexpr float ln2 = 0.6931471805599453f;

DMS_DEVICE float neg_inf() {
  return __uint_as_float(0xff800000u);
}

// Division by the page size: a shift for a power of two (the usual case), else a divide.
struct page_div {
  int size;
  int shift;  // log2(size), or -1 if size is not a power of two
  DMS_HOST_DEVICE int div(int x) const { return shift >= 0 ? x >> shift : x / size; }
  DMS_HOST_DEVICE int mod(int x) const { return shift >= 0 ? x & (size - 1) : x % size; }
};

inline page_div make_page_div(int size) {
  int shift = -1;
  if ((size & (size - 1)) == 0) {
    shift = 0;
    while ((1 << shift) < size) ++shift;
  }
  return {size, shift};
}

// What one batch row reads: index j of its read domain -> physical slot index, or -1 when j
// reads nothing (a hole, a slot past the row's length, a page id outside the row). The domain
// is [0, length) without a page list, [0, count * page_size) with one.
struct row_reader {
  const std::int32_t* table;     // the row's page-table entries
  const std::int32_t* pages;     // the row's selected logical pages, or null
  const std::int32_t* position;  // [max_pages * page_size]
  int length;
  int num_pages;
  page_div P;

  DMS_DEVICE int slot(int j) const {
    const int lp = pages ? pages[P.div(j)] : P.div(j);
    const int off = P.mod(j);
    if (lp < 0 || lp >= num_pages || lp * P.size + off >= length) return -1;
    const int page = table[lp];
    if (page < 0) return -1;
    const int at = page * P.size + off;
    return position[at] >= 0 ? at : -1;
  }
};

// The cache arrays and the batch description the three kernels share.
struct batch_layout {
  const std::int32_t* seq_ids;      // [batch]
  const std::int32_t* page_table;   // [max_rows][max_pages_per_row]
  const std::int32_t* row_length;   // [max_rows]
  const std::int32_t* position;     // [max_pages * page_size]
  const std::int32_t* pages;        // [rows][page_stride] or null
  const std::int32_t* page_counts;  // [rows] or null
  int page_stride;
  int num_kv_heads;
  int max_pages_per_row;
  int max_rows;
  page_div P;

  // The cache row of batch row i, or -1 if its sequence id is out of range.
  DMS_DEVICE int cache_row(int i) const {
    const std::int64_t seq = seq_ids[i / num_kv_heads];
    const std::int64_t r = seq * num_kv_heads + i % num_kv_heads;
    return seq >= 0 && r < max_rows ? int(r) : -1;
  }
  // Length of the read domain of batch row i.
  DMS_DEVICE int domain(int i) const {
    const int r = cache_row(i);
    if (r < 0) return 0;
    if (pages == nullptr) return row_length[r];
    const int n = page_counts[i];
    return (n < 0 ? 0 : n > page_stride ? page_stride : n) * P.size;
  }
  DMS_DEVICE row_reader reader(int i, int r) const {
    const int len = row_length[r];
    return {page_table + std::int64_t{r} * max_pages_per_row,
            pages ? pages + std::int64_t{i} * page_stride : nullptr,
            position,
            len,
            P.div(len + P.size - 1),
            P};
  }
};

// Temporary storage regions (see the header comment).
struct temp_layout {
  int rows = 0;
  int max_items = 0;
  int target_items = 0;
  int merge_grid = 0;
  std::size_t offsets = 0, work = 0, part_lse = 0, part_out = 0, logits = 0, bytes = 0;
};

inline std::size_t round_up(std::size_t n) {
  return (n + 255) / 256 * 256;
}

inline temp_layout make_layout(int batch, int num_kv_heads, int group_size, int head_dim,
                               int num_sms, std::int64_t fold_slots) {
  temp_layout t;
  t.rows = batch * num_kv_heads;
  t.target_items = num_sms * decode_tuning::items_per_sm;
  t.max_items = t.target_items + t.rows;
  const std::int64_t tasks = std::int64_t{t.rows} + (fold_slots > 0 ? t.max_items : 0);
  const std::int64_t merge_cap = std::int64_t{num_sms} * decode_tuning::merge_blocks_per_sm;
  t.merge_grid = int(tasks < merge_cap ? tasks : merge_cap);
  const auto G = std::size_t(group_size), D = std::size_t(head_dim);
  const auto items = std::size_t(t.max_items);
  std::size_t at = 0;
  t.offsets = at;
  at += round_up(sizeof(std::int32_t) * (std::size_t(t.rows) + 2));
  t.work = at;
  at += round_up(sizeof(int4) * items);
  t.part_lse = at;
  at += round_up(sizeof(float) * items * G);
  t.part_out = at;
  at += round_up(sizeof(float) * items * G * D);
  t.logits = at;
  at += round_up(sizeof(float) * std::size_t(fold_slots > 0 ? fold_slots : 0) * G);
  t.bytes = at;
  return t;
}

// ---- 1. plan -------------------------------------------------------------------------------

struct plan_args {
  batch_layout layout;
  const std::int32_t* status;  // [1] or null: nonzero = the step failed, plan no work
  int rows;
  int target_items;
  std::int32_t* offsets;  // [rows + 2]
  int4* work;             // [max_items]
};

template <int Threads>
__global__ void __launch_bounds__(Threads) plan_kernel(plan_args a) {
  using block_reduce = cub::BlockReduce<long long, Threads>;
  using block_scan = cub::BlockScan<int, Threads>;
  __shared__ union {
    typename block_reduce::TempStorage reduce;
    typename block_scan::TempStorage scan;
  } storage;
  __shared__ long long total;
  __shared__ int carry;

  const int tid = int(threadIdx.x);
  // A failed step plans no items: the merge then writes out = 0, lse = -inf for every row.
  const bool failed = a.status != nullptr && *a.status != 0;
  long long mine = 0;
  if (!failed)
    for (int i = tid; i < a.rows; i += Threads) mine += a.layout.domain(i);
  const long long sum = block_reduce(storage.reduce).Sum(mine);
  if (tid == 0) {
    total = sum;
    carry = 0;
  }
  __syncthreads();  // total is visible; storage is free for the scan

  // chunk >= total / target_items bounds the item count by target_items + rows.
  long long chunk64 = (total + a.target_items - 1) / a.target_items;
  if (chunk64 < decode_tuning::min_chunk) chunk64 = decode_tuning::min_chunk;
  if (chunk64 > 0x7fffffffLL) chunk64 = 0x7fffffffLL;
  const long long chunk = chunk64;

  for (int base = 0; base < a.rows; base += Threads) {
    const int i = base + tid;
    int items = 0;
    if (i < a.rows && !failed) items = int((a.layout.domain(i) + chunk - 1) / chunk);
    int first = 0, count = 0;
    block_scan(storage.scan).ExclusiveSum(items, first, count);
    if (i < a.rows) a.offsets[i] = carry + first;
    __syncthreads();  // everyone read carry; the scan storage is free again
    if (tid == 0) carry += count;
    __syncthreads();
  }
  if (tid == 0) {
    a.offsets[a.rows] = carry;
    a.offsets[a.rows + 1] = 0;  // the attend kernel's work counter
  }
  __syncthreads();  // the offsets (global, written by this block) are visible to the block

  const int num_items = carry;
  for (int k = tid; k < num_items; k += Threads) {
    // The last batch row whose first item is <= k (rows without items share their successor's
    // offset, so the search skips them).
    int lo = 0, hi = a.rows - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (a.offsets[mid] <= k) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    const long long n = a.layout.domain(lo);
    const long long begin = (k - a.offsets[lo]) * chunk;
    const long long end = begin + chunk < n ? begin + chunk : n;
    a.work[k] = make_int4(lo, int(begin), int(end), 0);
  }
}

// ---- 2. attend -----------------------------------------------------------------------------

// The shape of one attend kernel, from the storage type and the head dimension.
template <class T, int D>
struct attend_shape {
  static constexpr int vec = 16 / int(sizeof(T));          // elements per 16-byte load
  static constexpr int tpk = D / vec < 32 ? D / vec : 32;  // lanes per key
  static constexpr int cpt = D / tpk;                      // channels per lane
  static constexpr int loads = cpt / vec;                  // 16-byte loads per lane per key
  static constexpr int unroll = loads == 1 ? 4 : 2;        // keys per key group per iteration
  static constexpr int max_heads = decode_tuning::head_channels / cpt;  // heads per tile
  static constexpr int groups_per_warp = 32 / tpk;
  static constexpr int warps = decode_tuning::threads / 32;
  static constexpr int groups_per_block = warps * groups_per_warp;
  static_assert(D % vec == 0 && cpt % vec == 0 && cpt % 4 == 0, "unsupported head_dim");
  static_assert(groups_per_warp * unroll <= 32, "one metadata lane per key of a warp");
};

template <class T>
struct attend_args {
  cache_view<const T> view;
  batch_layout layout;
  const void* q;  // [batch][num_kv_heads * G][D] of q_type
  dtype q_type;
  int group_size;    // G
  int head_tiles;    // tiles of heads over the warps of a block: 1, 2 or 4
  float scale_log2;  // softmax scale * log2(e)
  int rows;
  std::int32_t* offsets;  // [rows + 2]: [rows] = item count, [rows + 1] = next item to hand out
  const int4* work;
  float* part_lse;
  float* part_out;
  float* logits;  // null without a fold
  unsigned long long* kv_reads;
};

// One element of q (float, half or bfloat16) as a float, with the hardware conversions.
DMS_DEVICE float widen_one(float x) {
  return x;
}
DMS_DEVICE float widen_one(::dms::half x) {
  return __half2float(__ushort_as_half(x.bits));
}
DMS_DEVICE float widen_one(::dms::bfloat16 x) {
  return __uint_as_float(unsigned{x.bits} << 16);
}

// q of the heads [first, first + GT) of batch row i, channels [c0, c0 + CPT), times scale;
// heads past G (the padding of the last tile) are 0.
template <int GT, int CPT, class Q>
DMS_DEVICE void load_q_tile(const Q* q, int i, int first, int G, int D, int c0, float scale,
                            float (&qr)[GT][CPT]) {
#pragma unroll
  for (int gg = 0; gg < GT; ++gg) {
    const int g = first + gg;
    const Q* row = q + (std::int64_t{i} * G + (g < G ? g : 0)) * D + c0;
#pragma unroll
    for (int c = 0; c < CPT; ++c) qr[gg][c] = g < G ? widen_one(row[c]) * scale : 0.0f;
  }
}

// 16 raw bytes of K or V -> 16 / sizeof(T) floats.
template <class T>
DMS_DEVICE void widen(const uint4& r, float* f) {
  const unsigned u[4] = {r.x, r.y, r.z, r.w};
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int e = 0; e < 4; ++e) f[e] = __uint_as_float(u[e]);
  } else if constexpr (std::is_same_v<T, ::dms::bfloat16>) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      f[2 * e] = __uint_as_float(u[e] << 16);
      f[2 * e + 1] = __uint_as_float(u[e] & 0xffff0000u);
    }
  } else {
    static_assert(std::is_same_v<T, ::dms::half>);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      f[2 * e] = __half2float(__ushort_as_half(static_cast<unsigned short>(u[e] & 0xffffu)));
      f[2 * e + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(u[e] >> 16)));
    }
  }
}

template <class T, int D, int GT>
__global__ void __launch_bounds__(decode_tuning::threads) attend_kernel(attend_args<T> a) {
  using S = attend_shape<T, D>;
  constexpr int TPK = S::tpk, CPT = S::cpt, U = S::unroll, NL = S::loads, KPW = S::groups_per_warp;
  static_assert(GT >= 1 && GT <= S::max_heads && GT <= TPK, "head tile too large");
  constexpr unsigned full = 0xffffffffu;

  __shared__ float st_m[S::groups_per_block][GT];
  __shared__ float st_l[S::groups_per_block][GT];
  __shared__ __align__(16) float st_acc[S::groups_per_block][GT][D];

  const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
  const int tl = lane % TPK;               // lane within the key group
  const int kgw = lane / TPK;              // key group within the warp
  const int WT = S::warps / a.head_tiles;  // warps per head tile
  const int tile = warp / WT;
  const int KG = WT * KPW;           // key groups per tile
  const int kgb = warp * KPW + kgw;  // key group within the block
  const int step = KG * U;           // keys per iteration of a tile
  const int G = a.group_size;
  const int c0 = tl * CPT;
  // The metadata lanes: lane L < KPW * U looks up key (u = L / KPW, group L % KPW) of the warp.
  const bool meta_lane = lane < KPW * U;
  const int meta_off = (lane / KPW) * KG + (warp % WT) * KPW + lane % KPW;
  const int num_items = a.offsets[a.rows];
  unsigned long long reads = 0;
  __shared__ int next_item;

  // Work items are handed out dynamically, so blocks that start late (more blocks than fit on
  // the device at once) or items that end early (holes read nothing) cannot unbalance the grid.
  for (;;) {
    if (threadIdx.x == 0) next_item = atomicAdd(a.offsets + a.rows + 1, 1);
    __syncthreads();             // also: the previous item's merge has finished reading st_*
    const int item = next_item;  // read by every thread before the merge's barriers below
    if (item >= num_items) break;
    const int4 w = a.work[item];
    const int i = w.x, begin = w.y, end = w.z;
    const row_reader rd = a.layout.reader(i, a.layout.cache_row(i));

    // q of this tile's heads in the log2 domain.
    float qr[GT][CPT];
    switch (a.q_type) {
      case dtype::f16:
        load_q_tile(static_cast<const ::dms::half*>(a.q), i, tile * GT, G, D, c0, a.scale_log2, qr);
        break;
      case dtype::bf16:
        load_q_tile(static_cast<const ::dms::bfloat16*>(a.q), i, tile * GT, G, D, c0, a.scale_log2,
                    qr);
        break;
      default:
        load_q_tile(static_cast<const float*>(a.q), i, tile * GT, G, D, c0, a.scale_log2, qr);
        break;
    }
    float m[GT], l[GT], acc[GT][CPT];
#pragma unroll
    for (int gg = 0; gg < GT; ++gg) {
      m[gg] = neg_inf();
      l[gg] = 0.0f;
#pragma unroll
      for (int c = 0; c < CPT; ++c) acc[gg][c] = 0.0f;
    }

    int meta = meta_lane && begin + meta_off < end ? rd.slot(begin + meta_off) : -1;
    for (int j0 = begin; j0 < end; j0 += step) {
      if (tile == 0) reads += unsigned(__popc(__ballot_sync(full, meta >= 0)));
      int ph[U];
#pragma unroll
      for (int u = 0; u < U; ++u) ph[u] = __shfl_sync(full, meta, u * KPW + kgw);

      // All K and V loads of the iteration in flight together; nothing is read for a slot that
      // reads nothing (its memory may hold anything, NaN included).
      uint4 kr[U][NL], vr[U][NL];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const std::int64_t base = std::int64_t{ph[u] >= 0 ? ph[u] : 0} * D + c0;
        const uint4* kp = reinterpret_cast<const uint4*>(a.view.k + base);
        const uint4* vp = reinterpret_cast<const uint4*>(a.view.v + base);
#pragma unroll
        for (int n = 0; n < NL; ++n) {
          kr[u][n] = ph[u] >= 0 ? __ldg(kp + n) : make_uint4(0, 0, 0, 0);
          vr[u][n] = ph[u] >= 0 ? __ldg(vp + n) : make_uint4(0, 0, 0, 0);
        }
      }
      // Prefetch the next iteration's slots while the loads are in flight.
      {
        const int jn = j0 + step + meta_off;
        meta = meta_lane && jn < end ? rd.slot(jn) : -1;
      }

      // Logits of every head of the tile for the U keys, reduced over the key group.
      float s[U][GT];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float kf[CPT];
#pragma unroll
        for (int n = 0; n < NL; ++n) widen<T>(kr[u][n], kf + n * S::vec);
#pragma unroll
        for (int gg = 0; gg < GT; ++gg) {
          float dot = 0.0f;
#pragma unroll
          for (int c = 0; c < CPT; ++c) dot = fmaf(qr[gg][c], kf[c], dot);
          s[u][gg] = dot;
        }
      }
#pragma unroll
      for (int off = TPK / 2; off > 0; off /= 2)
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
          for (int gg = 0; gg < GT; ++gg) s[u][gg] += __shfl_xor_sync(full, s[u][gg], off);
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int gg = 0; gg < GT; ++gg) {
          if (ph[u] < 0) s[u][gg] = neg_inf();
          // Lane gg of the key group keeps head gg's logit for the score fold.
          const int g = tile * GT + gg;
          if (a.logits != nullptr && ph[u] >= 0 && tl == gg && g < G)
            a.logits[std::int64_t{ph[u]} * G + g] = s[u][gg];
        }
      }

      // Online softmax: s becomes the weights relative to the running maximum.
#pragma unroll
      for (int gg = 0; gg < GT; ++gg) {
        float mx = m[gg];
#pragma unroll
        for (int u = 0; u < U; ++u) mx = fmaxf(mx, s[u][gg]);
        const bool any = mx != neg_inf();  // false while this key group has read nothing
        const float alpha = any ? exp2f(m[gg] - mx) : 1.0f;  // m = -inf, mx finite: 0
        float sum = 0.0f;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          s[u][gg] = any ? exp2f(s[u][gg] - mx) : 0.0f;
          sum += s[u][gg];
        }
        m[gg] = mx;
        l[gg] = l[gg] * alpha + sum;
#pragma unroll
        for (int c = 0; c < CPT; ++c) acc[gg][c] *= alpha;
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float vf[CPT];
#pragma unroll
        for (int n = 0; n < NL; ++n) widen<T>(vr[u][n], vf + n * S::vec);
#pragma unroll
        for (int gg = 0; gg < GT; ++gg)
#pragma unroll
          for (int c = 0; c < CPT; ++c) acc[gg][c] = fmaf(s[u][gg], vf[c], acc[gg][c]);
      }
    }

    // Merge the key groups of each tile into the item's partial.
    if (tl == 0) {
#pragma unroll
      for (int gg = 0; gg < GT; ++gg) {
        st_m[kgb][gg] = m[gg];
        st_l[kgb][gg] = l[gg];
      }
    }
#pragma unroll
    for (int gg = 0; gg < GT; ++gg)
#pragma unroll
      for (int c = 0; c < CPT; c += 4)
        *reinterpret_cast<float4*>(&st_acc[kgb][gg][c0 + c]) =
            make_float4(acc[gg][c], acc[gg][c + 1], acc[gg][c + 2], acc[gg][c + 3]);
    __syncthreads();  // st_* written
    for (int idx = int(threadIdx.x); idx < G * D; idx += decode_tuning::threads) {
      const int g = idx / D, c = idx % D;
      const int gg = g % GT, first = (g / GT) * KG;
      float M = neg_inf();
      for (int k = 0; k < KG; ++k) M = fmaxf(M, st_m[first + k][gg]);
      float o = 0.0f, lse = neg_inf();
      if (M != neg_inf()) {
        // The key group holding the maximum has l >= 1, so L > 0.
        float L = 0.0f, A = 0.0f;
        for (int k = 0; k < KG; ++k) {
          const float e = exp2f(st_m[first + k][gg] - M);  // -inf (read nothing): 0
          L = fmaf(st_l[first + k][gg], e, L);
          A = fmaf(st_acc[first + k][gg][c], e, A);
        }
        o = A / L;
        lse = M + log2f(L);
      }
      a.part_out[(std::int64_t{item} * G + g) * D + c] = o;
      if (c == 0) a.part_lse[std::int64_t{item} * G + g] = lse;
    }
  }
  if (a.kv_reads != nullptr && tile == 0 && lane == 0 && reads != 0) atomicAdd(a.kv_reads, reads);
}

// ---- 3. merge and fold ---------------------------------------------------------------------

template <class Q>
struct merge_args {
  batch_layout layout;
  int rows;
  int group_size;
  int head_dim;
  const std::int32_t* offsets;
  const int4* work;
  const float* part_lse;
  const float* part_out;
  const float* logits;  // null: no fold
  Q* out;
  float* lse;
  float* score;
  bool add;
};

DMS_DEVICE float warp_max(float x) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}
DMS_DEVICE float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

template <int Threads, class Q>
__global__ void __launch_bounds__(Threads) merge_kernel(merge_args<Q> a) {
  __shared__ float row_lse[decode_tuning::max_group_size];
  const int tid = int(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const int G = a.group_size, D = a.head_dim;
  const int num_items = a.offsets[a.rows];
  const int tasks = a.rows + (a.logits != nullptr ? num_items : 0);

  for (int t = int(blockIdx.x); t < tasks; t += int(gridDim.x)) {
    const bool fold = t >= a.rows;
    const int4 w = fold ? a.work[t - a.rows] : make_int4(t, 0, 0, 0);
    const int i = w.x;
    const int lo = a.offsets[i], hi = a.offsets[i + 1];

    __syncthreads();  // the previous task has finished reading row_lse
    for (int g = warp; g < G; g += Threads / 32) {
      float M = neg_inf();
      for (int k = lo + lane; k < hi; k += 32) M = fmaxf(M, a.part_lse[std::int64_t{k} * G + g]);
      M = warp_max(M);
      float sum = 0.0f;
      if (M != neg_inf())
        for (int k = lo + lane; k < hi; k += 32)
          sum += exp2f(a.part_lse[std::int64_t{k} * G + g] - M);
      sum = warp_sum(sum);
      if (lane == 0) row_lse[g] = M == neg_inf() ? M : M + log2f(sum);
    }
    __syncthreads();

    if (!fold) {
      for (int idx = tid; idx < G * D; idx += Threads) {
        const int g = idx / D, c = idx % D;
        const float L = row_lse[g];
        float o = 0.0f;
        if (L != neg_inf())
          for (int k = lo; k < hi; ++k)
            o = fmaf(exp2f(a.part_lse[std::int64_t{k} * G + g] - L),
                     a.part_out[(std::int64_t{k} * G + g) * D + c], o);
        a.out[(std::int64_t{i} * G + g) * D + c] = from_float<Q>(o);
      }
      if (a.lse != nullptr)
        for (int g = tid; g < G; g += Threads)
          a.lse[std::int64_t{i} * G + g] = row_lse[g] == neg_inf() ? neg_inf() : row_lse[g] * ln2;
    } else {
      // Every slot this chunk read was read by exactly this chunk, so the updates do not race.
      const row_reader rd = a.layout.reader(i, a.layout.cache_row(i));
      for (int j = w.y + tid; j < w.z; j += Threads) {
        const int at = rd.slot(j);
        if (at < 0) continue;
        float p = 0.0f;
        for (int g = 0; g < G; ++g) p += exp2f(a.logits[std::int64_t{at} * G + g] - row_lse[g]);
        a.score[at] = a.add ? a.score[at] + p : p;
      }
    }
  }
}

// ---- dispatch ------------------------------------------------------------------------------

inline bool supported_head_dim(int d) {
  return d == 64 || d == 128 || d == 256;
}

// As many blocks as fit on the device at once (occupancy is a host query, no synchronization),
// but no more than there can be work items.
template <class T, int D, int GT>
cudaError_t launch_attend(const attend_args<T>& a, int num_sms, int max_items,
                          cudaStream_t stream) {
  int per_sm = 0;
  DMS_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, attend_kernel<T, D, GT>,
                                                             decode_tuning::threads, 0));
  const std::int64_t blocks = std::int64_t{num_sms} * (per_sm > 0 ? per_sm : 1);
  const int grid = int(blocks < max_items ? blocks : max_items);
  attend_kernel<T, D, GT><<<grid, decode_tuning::threads, 0, stream>>>(a);
  return cudaGetLastError();
}

// The one point where (head_dim, head tile) become compile-time constants.
template <class T, int D>
cudaError_t launch_attend_tiles(attend_args<T> a, int padded_group, int num_sms, int max_items,
                                cudaStream_t stream) {
  using S = attend_shape<T, D>;
  const int gt = padded_group < S::max_heads ? padded_group : S::max_heads;
  a.head_tiles = padded_group / gt;
  switch (gt) {
    case 1:
      return launch_attend<T, D, 1>(a, num_sms, max_items, stream);
    case 2:
      return launch_attend<T, D, 2>(a, num_sms, max_items, stream);
    case 4:
      return launch_attend<T, D, 4>(a, num_sms, max_items, stream);
    case 8:
      if constexpr (S::max_heads >= 8) return launch_attend<T, D, 8>(a, num_sms, max_items, stream);
      break;
    default:
      break;
  }
  return cudaErrorInvalidValue;
}

template <class T>
cudaError_t launch_attend_dispatch(const attend_args<T>& a, int head_dim, int padded_group,
                                   int num_sms, int max_items, cudaStream_t stream) {
  switch (head_dim) {
    case 64:
      return launch_attend_tiles<T, 64>(a, padded_group, num_sms, max_items, stream);
    case 128:
      return launch_attend_tiles<T, 128>(a, padded_group, num_sms, max_items, stream);
    case 256:
      return launch_attend_tiles<T, 256>(a, padded_group, num_sms, max_items, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace decode
}  // namespace detail

/// Decode attention of one query token per sequence over a paged cache (see the top of this
/// file). view: the cache (device pointers; head_dim 64, 128 or 256, group_size 1..16, k and v
/// 16-byte aligned); seq_ids: [batch] distinct sequence ids; q: [batch][num_kv_heads *
/// group_size][head_dim], query head kv_head * group_size + g; out: same shape (may alias q).
/// Everything is stream-ordered and capturable. Two-phase temporary storage: with d_temp ==
/// nullptr only sets temp_bytes (after validating the shapes). Returns cudaErrorInvalidValue for
/// unsupported shapes or missing arguments, never a silently wrong result.
template <class T, class Q>
[[nodiscard]] cudaError_t decode_attention(void* d_temp, std::size_t& temp_bytes,
                                           cache_view<const T> view, const std::int32_t* seq_ids,
                                           int batch, const Q* q, Q* out,
                                           const decode_options& opt = {},
                                           cudaStream_t stream = nullptr) {
  static_assert(storage_type<T> && storage_type<Q>,
                "dms::cuda::decode_attention: T and Q must be float, dms::half or dms::bfloat16");
  namespace impl = detail::decode;
  const int D = view.head_dim, G = view.group_size, H = view.num_kv_heads;
  const bool fold = opt.fold != score_update::none;
  if (batch < 0 || H < 1 || !impl::supported_head_dim(D) || G < 1 ||
      G > decode_tuning::max_group_size || view.page_size < 1 || opt.num_sms < 0 ||
      opt.num_sms > (1 << 16))
    return cudaErrorInvalidValue;
  if (std::int64_t{batch} * H > 0x7fffffff / 2) return cudaErrorInvalidValue;
  if (opt.pages != nullptr && (opt.page_counts == nullptr || opt.page_stride < 1 ||
                               opt.page_stride > view.max_pages_per_row))
    return cudaErrorInvalidValue;
  if (fold &&
      (opt.max_pages < 1 || (opt.fold != score_update::add && opt.fold != score_update::assign)))
    return cudaErrorInvalidValue;

  int num_sms = opt.num_sms;
  if (num_sms == 0) {
    int device = 0;
    DMS_CUDA_TRY(cudaGetDevice(&device));
    DMS_CUDA_TRY(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
    if (num_sms < 1) return cudaErrorInvalidValue;
  }
  const std::int64_t fold_slots = fold ? std::int64_t{opt.max_pages} * view.page_size : 0;
  const impl::temp_layout t = impl::make_layout(batch, H, G, D, num_sms, fold_slots);
  if (d_temp == nullptr) {
    temp_bytes = t.bytes;
    return cudaSuccess;
  }
  if (temp_bytes < t.bytes || reinterpret_cast<std::uintptr_t>(d_temp) % 16 != 0)
    return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  if (seq_ids == nullptr || q == nullptr || out == nullptr || view.k == nullptr ||
      view.v == nullptr || view.position == nullptr || view.page_table == nullptr ||
      view.row_length == nullptr || (fold && opt.score == nullptr))
    return cudaErrorInvalidValue;
  // 16-byte loads: rows of head_dim * sizeof(T) bytes keep the base pointers' alignment.
  if (reinterpret_cast<std::uintptr_t>(view.k) % 16 != 0 ||
      reinterpret_cast<std::uintptr_t>(view.v) % 16 != 0)
    return cudaErrorInvalidValue;

  auto* base = static_cast<unsigned char*>(d_temp);
  auto* offsets = reinterpret_cast<std::int32_t*>(base + t.offsets);
  auto* work = reinterpret_cast<int4*>(base + t.work);
  auto* part_lse = reinterpret_cast<float*>(base + t.part_lse);
  auto* part_out = reinterpret_cast<float*>(base + t.part_out);
  auto* logits = fold ? reinterpret_cast<float*>(base + t.logits) : nullptr;

  const impl::batch_layout layout{seq_ids,
                                  view.page_table,
                                  view.row_length,
                                  view.position,
                                  opt.pages,
                                  opt.pages != nullptr ? opt.page_counts : nullptr,
                                  opt.pages != nullptr ? opt.page_stride : 0,
                                  H,
                                  view.max_pages_per_row,
                                  view.max_rows,
                                  impl::make_page_div(view.page_size)};

  constexpr int plan_threads = decode_tuning::plan_threads;
  impl::plan_kernel<plan_threads><<<1, plan_threads, 0, stream>>>(
      impl::plan_args{layout, opt.skip_if_failed, t.rows, t.target_items, offsets, work});
  DMS_CUDA_TRY(cudaGetLastError());

  float scale = opt.softmax_scale > 0.0f ? opt.softmax_scale : 1.0f / std::sqrt(float(D));
  impl::attend_args<T> aa{view,
                          layout,
                          q,
                          dtype_of<Q>,
                          G,
                          1,
                          scale * impl::log2e,
                          t.rows,
                          offsets,
                          work,
                          part_lse,
                          part_out,
                          logits,
                          reinterpret_cast<unsigned long long*>(opt.kv_reads)};
  int padded = 1;
  while (padded < G) padded *= 2;
  DMS_CUDA_TRY(impl::launch_attend_dispatch<T>(aa, D, padded, num_sms, t.max_items, stream));

  constexpr int merge_threads = decode_tuning::merge_threads;
  impl::merge_kernel<merge_threads, Q><<<t.merge_grid, merge_threads, 0, stream>>>(
      impl::merge_args<Q>{layout, t.rows, G, D, offsets, work, part_lse, part_out, logits, out,
                          opt.lse, fold ? opt.score : nullptr, opt.fold == score_update::add});
  return cudaGetLastError();
}

}  // namespace cuda
DMS_NAMESPACE_END
