// SPDX-License-Identifier: Apache-2.0
#pragma once

// The prefill kernels of the CPU fast path: tiled (query block x key block) flash attention over
// a row's keys (its cached survivors, then the chunk's own tokens), fp32 accumulation, and the
// training-free policies' prompt scores.
//
//   prefill_tile    one work item = QB queries x G heads of one row (about 128 rows of Q): for
//                   each block of 64 keys that the tile can see, widen K (transposed) and V into
//                   L1/L2-resident f32 blocks, S = Q K^T in 4 x (2 * width) register tiles, the
//                   causal + DMS visibility mask (only on blocks that need one), online softmax,
//                   O += P V. Blocks nobody in the tile can see are skipped: keys after the tile
//                   (causal) and, under DMS, flagged keys whose window has passed.
//   prefill_scores  one work item = one block of 64 keys: the probabilities p = exp(s - lse)
//                   summed over the group, recomputed from the lse prefill_tile wrote, for every
//                   query the policy folds, newest query first (TOVA's assign settles a key with
//                   the chunk's last query; H2O adds every causal pair; SnapKV its window).
// Visibility: key j is visible to the query at position t iff position_j <= t <= deadline_j,
// where the deadline is position + window for a DMS-flagged key and "never" otherwise.
//
// Written once (prefill_kernel.inl), compiled per SIMD level like the decode kernel.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "dms/config.hpp"
#include "dms/cpu/simd/avx2.hpp"
#include "dms/cpu/simd/avx512.hpp"
#include "dms/cpu/simd/level.hpp"
#include "dms/cpu/simd/scalar.hpp"
#include "dms/cpu/simd/target.hpp"
#include "dms/cpu/simd/vec128.hpp"
#include "dms/numeric.hpp"

DMS_NAMESPACE_BEGIN
namespace cpu::detail {

/// One row's keys in the order prefill attends to them: cached live slots, then chunk tokens.
/// The per-key arrays are padded to whole blocks of 64 (padding: position INT32_MAX, deadline
/// INT32_MIN, so a padding key is visible to nobody).
template <class T>
struct prefill_keys {
  const T* const* k;                       // [count] each key's head_dim elements
  const T* const* v;                       // [count] each value's head_dim elements
  const std::int32_t* position;            // [blocks * 64] token position of each key
  const std::int32_t* deadline;            // [blocks * 64] last query position that sees it
  const std::int32_t* block_min_position;  // [blocks] over the block's real keys
  const std::int32_t* block_max_position;  // [blocks]
  const std::int32_t* block_min_deadline;  // [blocks]
  const std::int32_t* block_max_deadline;  // [blocks]
  int count;                               // keys
};

/// One flash-attention work item.
template <class T>
struct prefill_tile_args {
  prefill_keys<T> keys;
  int head_dim;
  int dpad;         // head_dim rounded up to whole chunks of 2 * width
  int group;        // G
  int first_query;  // queries [first_query, end_query) of the chunk's real tokens
  int end_query;
  int causal_key_end;  // keys visible to query end_query - 1 by causality alone
  std::int32_t t0;     // position of the chunk's first real token
  const float* q;      // q + i * q_stride + g * head_dim: query i, head g of the group
  std::size_t q_stride;
  float scale;
  float* out;  // same layout as q
  std::size_t out_stride;
  float* lse;  // [queries][G] of this row
};

/// One prompt-score work item.
template <class T>
struct prefill_score_args {
  prefill_keys<T> keys;
  int block;  // key block
  int head_dim;
  int dpad;
  int group;
  int queries_per_tile;
  int num_queries;  // real tokens of the chunk
  std::int32_t t0;
  const float* q;
  std::size_t q_stride;
  float scale;
  const float* lse;         // [queries][G] of this row, from prefill_tile
  const std::uint8_t* how;  // [queries] the policy's score_update for each query
  float* const* target;     // [count] where each key's score lives
};

}  // namespace cpu::detail
DMS_NAMESPACE_END

DMS_CPU_DIAGNOSTICS_BEGIN

DMS_NAMESPACE_BEGIN
namespace cpu::simd::scalar {
#include "dms/cpu/prefill_kernel.inl"
}  // namespace cpu::simd::scalar
DMS_NAMESPACE_END

#if DMS_CPU_HAS_VECTOR_EXTENSIONS
DMS_NAMESPACE_BEGIN
namespace cpu::simd::vec128 {
#include "dms/cpu/prefill_kernel.inl"
}  // namespace cpu::simd::vec128
DMS_NAMESPACE_END
#endif

#if DMS_CPU_HAS_X86_TARGETS
DMS_CPU_TARGET_AVX2_BEGIN
DMS_NAMESPACE_BEGIN
namespace cpu::simd::avx2 {
#include "dms/cpu/prefill_kernel.inl"
}  // namespace cpu::simd::avx2
DMS_NAMESPACE_END
DMS_CPU_TARGET_END

DMS_CPU_TARGET_AVX512_BEGIN
DMS_NAMESPACE_BEGIN
namespace cpu::simd::avx512 {
#include "dms/cpu/prefill_kernel.inl"
}  // namespace cpu::simd::avx512
DMS_NAMESPACE_END
DMS_CPU_TARGET_END
#endif

DMS_CPU_DIAGNOSTICS_END

DMS_NAMESPACE_BEGIN
namespace cpu::detail {

inline constexpr int prefill_key_block = 64;

template <class T>
struct prefill_kernels {
  void (*tile)(const prefill_tile_args<T>&) noexcept;
  void (*scores)(const prefill_score_args<T>&) noexcept;
  int width;
};

template <class T>
prefill_kernels<T> prefill_kernels_for(simd_level level) {
  switch (level) {
#if DMS_CPU_HAS_X86_TARGETS
    case simd_level::avx512:
      return {&simd::avx512::prefill_tile<T>, &simd::avx512::prefill_scores<T>,
              simd::avx512::width};
    case simd_level::avx2:
      return {&simd::avx2::prefill_tile<T>, &simd::avx2::prefill_scores<T>, simd::avx2::width};
#endif
#if DMS_CPU_HAS_VECTOR_EXTENSIONS
    case simd_level::vec128:
      return {&simd::vec128::prefill_tile<T>, &simd::vec128::prefill_scores<T>,
              simd::vec128::width};
#endif
    default:
      return {&simd::scalar::prefill_tile<T>, &simd::scalar::prefill_scores<T>,
              simd::scalar::width};
  }
}

}  // namespace cpu::detail
DMS_NAMESPACE_END
