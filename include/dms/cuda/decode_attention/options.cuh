// SPDX-License-Identifier: Apache-2.0
#pragma once

// The options and the launch shapes of dms::cuda::decode_attention.
// Part of dms/cuda/decode_attention.cuh, whose header comment describes the three kernels.

#if !defined(__CUDACC__)
#error \
    "dms/cuda/decode_attention/options.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cstdint>

#include "dms/config.hpp"
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

}  // namespace cuda
DMS_NAMESPACE_END
