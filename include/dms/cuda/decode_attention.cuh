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
//
// The pieces, one layer each, under dms/cuda/decode_attention/: options.cuh (decode_options,
// decode_tuning), layout.cuh (what the kernels share), plan.cuh, attend.cuh and merge.cuh (the
// kernels 1-3), launch.cuh (the attend kernel's compile-time dispatch); this file is the entry.

#if !defined(__CUDACC__)
#error \
    "dms/cuda/decode_attention.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "dms/cache_view.hpp"
#include "dms/config.hpp"
#include "dms/cuda/check.cuh"
#include "dms/cuda/decode_attention/launch.cuh"
#include "dms/cuda/decode_attention/layout.cuh"
#include "dms/cuda/decode_attention/merge.cuh"
#include "dms/cuda/decode_attention/options.cuh"
#include "dms/cuda/decode_attention/plan.cuh"
#include "dms/numeric.hpp"
#include "dms/policy/policy.hpp"

DMS_NAMESPACE_BEGIN
namespace cuda {

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
