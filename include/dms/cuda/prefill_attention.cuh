// SPDX-License-Identifier: Apache-2.0
#pragma once

// Prefill attention on the GPU for one chunk of the prompts of a batch of sequences: the chunk's
// queries attend to (a) the live slots the device cache already holds for the row and (b) the
// chunk's own keys, causally, under DMS's delayed-eviction rule for DMS caches (everything
// visible otherwise), with left padding. The semantics are dms::reference::prefill_chunk's, which
// the GPU tests compare against; this header only reads the cache (prefill.cuh appends the chunk).
//
// Visibility, as one test per (query, key). Query i of the chunk (a real token) has position
// t0 + i - pad, where t0 is the row's tokens seen before the chunk and pad the chunk's leading
// padding. Every key carries (pos, deadline): it is visible to a query at position t iff
// pos <= t <= deadline. deadline = pos + window if the key is flagged (DMS), else "forever":
//   * a cached slot: flagged per the row's ring (dms_rule::flagged), except the newest cached
//     token, which the logit of the chunk's first real token flags (the shift rule); holes and
//     slots no query of the chunk can see are dropped from the key list;
//   * chunk token j: flagged iff the decision logit of token j+1 is > 0 (unknown, i.e. kept, for
//     the chunk's last token); padding tokens are not keys.
//
// Work: a pre-pass builds, per row, a compacted key list: the visible cached slots, then the chunk
// tokens that are unflagged (survivors). A tile of queries whose earliest real token is i0 reads
//   the key list up to the survivors before lo = max(pad, i0 - window)   (all visible to the tile)
//   + the chunk tokens [lo, last query of the tile]                         (masked per element)
// so, for DMS, it reads survivors + window + the tile rather than every earlier chunk token:
// one-shot prefill of a long prompt costs about what chunked prefill does.
//
// Two kernels compute the same thing:
//   * tensor cores (sm_80+, half/bfloat16, head_dim 64 or 128): flash-attention style, one CTA per
//     64 query rows of one KV head, rows packed (token, query head of the group) so the G heads
//     share every K/V tile; mma.sync m16n8k16 with fp32 accumulation, online softmax in fp32,
//     cp.async double-buffered K/V tiles of 64 keys in XOR-swizzled shared memory, P rounded to
//     the storage type for the P.V product (as flash-attention does); a tile whose keys every
//     query row of the CTA sees skips the per-element mask;
//   * SIMT (any storage type, head_dim <= 256): one warp per query row, fp32 throughout. Float
//     caches and shapes the tensor-core kernel does not take use it.
//
// Outputs: out [batch][tokens][num_query_heads][head_dim] in the storage type (0 for padding
// tokens), lse [batch][tokens][num_query_heads] (natural log, -inf for padding), optional.
//
// API in CUB's shape: views and a stream in, cudaError_t out, two-phase temporary storage (call
// with d_temp == nullptr to get temp_bytes; it holds a key list of every slot a row may span plus
// the chunk, 8 bytes per entry per row of the batch). Sequences that are not active in the cache
// output zeros (the append that follows records bad_sequence in the cache's status).
//
// The pieces, one layer each, under dms/cuda/prefill_attention/: options.cuh (prefill_batch,
// prefill_traits, prefill_tuning), keys.cuh (the key list and its pre-pass kernel),
// mma_kernel.cuh and simt_kernel.cuh (the two attention kernels), launch.cuh (which kernel runs);
// this file is the entry.

#if !defined(__CUDACC__)
#error \
    "dms/cuda/prefill_attention.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cuda_runtime_api.h>

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "dms/config.hpp"
#include "dms/cuda/check.cuh"
#include "dms/cuda/prefill_attention/keys.cuh"
#include "dms/cuda/prefill_attention/launch.cuh"
#include "dms/cuda/prefill_attention/options.cuh"
#include "dms/step/cache_state.hpp"

DMS_NAMESPACE_BEGIN
namespace cuda {

/// Temporary storage prefill_attention needs for a chunk of `length` tokens of `batch` sequences.
template <class T>
[[nodiscard]] std::size_t prefill_attention_temp_bytes(const cache_state<T>& st, int batch,
                                                       int length) {
  return detail::prefill_keys::bytes(batch * st.num_kv_heads, length,
                                     detail::key_capacity(st, length));
}

/// Attention of the chunk [begin, begin + length) of `in`'s prompts: each real query attends to
/// its row's cached live slots and to the chunk's keys up to itself, under `policy`'s visibility
/// (DMS's delayed eviction, or everything). Reads the cache only. Writes in.out (and in.lse) for
/// the chunk's tokens. head_dim <= 256 (64 and 128 on tensor cores).
/// d_temp == nullptr: only sets temp_bytes.
template <class T, class DevicePolicy>
[[nodiscard]] cudaError_t prefill_attention(void* d_temp, std::size_t& temp_bytes,
                                            const cache_state<T>& st, const DevicePolicy& policy,
                                            const prefill_batch<T>& in, int begin, int length,
                                            cudaStream_t stream = nullptr) {
  if (in.batch < 0 || begin < 0 || length < 0 ||
      std::int64_t{begin} + length > std::int64_t{in.tokens})
    return cudaErrorInvalidValue;
  const std::size_t need = prefill_attention_temp_bytes(st, in.batch, length);
  if (d_temp == nullptr) {
    temp_bytes = need;
    return cudaSuccess;
  }
  if (temp_bytes < need) return cudaErrorInvalidValue;
  if (in.batch == 0 || length == 0) return cudaSuccess;
  if (!in.seq_ids || !in.q || !in.k || !in.v || !in.out || in.batch > 65535 ||
      std::int64_t{length} * st.group_size > INT_MAX - prefill_tuning::mma_block_m ||
      st.head_dim > 256)
    return cudaErrorInvalidValue;

  const detail::chunk_params<T> c{in, begin, length};
  const std::int32_t window = prefill_traits<DevicePolicy>::window(policy);
  const auto tmp = detail::prefill_keys::carve(d_temp, in.batch * st.num_kv_heads, length,
                                               detail::key_capacity(st, length));
  constexpr int threads = prefill_tuning::keys_threads;
  detail::prefill_keys_kernel<threads, T>
      <<<in.batch * st.num_kv_heads, threads, 0, stream>>>(st, c, window, tmp);
  DMS_CUDA_TRY(cudaGetLastError());
  const float scale =
      in.softmax_scale > 0.0f ? in.softmax_scale : 1.0f / std::sqrt(float(st.head_dim));
  return detail::launch_prefill(st, c, window, tmp, scale * 1.4426950408889634f, stream);
}

}  // namespace cuda
DMS_NAMESPACE_END
