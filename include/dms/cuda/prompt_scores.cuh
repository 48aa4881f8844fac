// SPDX-License-Identifier: Apache-2.0
#pragma once

// Prompt scores on the GPU: after a prefill chunk is appended, fold the chunk's attention
// probabilities into the per-slot scores the training-free policies rank the prompt by, without
// materializing the T x T matrix. The probability of key j for query i, head g, is recomputed
// from the query, the cached key and the query's log-sum-exp (which prefill attention wrote):
// p = exp(scale * q.k - lse), the second pass flash-attention's backward makes. Summed over the
// G heads of the group, it is folded by the policy's prompt_score(query position, prompt end)
// exactly as dms::reference::prefill_chunk folds score_for_query:
//   add     score += p        (H2O: column sums; SnapKV: the observation window's votes)
//   assign  score  = p        (TOVA: the last query decides)
// The queries are visited newest first, so a key's fold is p(last assigning query) + the adds of
// the queries after it, and a key tile stops as soon as every key in it has been assigned: TOVA
// costs one query per chunk, SnapKV its window, H2O every (query, earlier key) pair.
//
// One block per (row, tile of 32 slots): the tile's keys stay in shared memory in fp32 while the
// chunk's queries stream past, a few at a time; each warp owns some (query, head) pairs and each
// lane one key. fp32 throughout. Keys are seen causally (position <= query position); the
// policies that score (TOVA, H2O, SnapKV) attend densely inside a prompt, so there is no DMS
// visibility rule here.

#if !defined(__CUDACC__)
#error \
    "dms/cuda/prompt_scores.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cuda_runtime_api.h>

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "dms/config.hpp"
#include "dms/cuda/check.cuh"
#include "dms/cuda/prefill_attention.cuh"
#include "dms/policy/policy.hpp"
#include "dms/step/batch_step.hpp"
#include "dms/step/cache_state.hpp"

DMS_NAMESPACE_BEGIN
namespace cuda {

/// Launch shape, as plain data.
struct prompt_score_tuning {
  static constexpr int keys = 32;            // slots per block: one per lane
  static constexpr int warps = 8;            // each owns some (query, head) pairs of a batch
  static constexpr int query_floats = 2048;  // shared fp32 query rows per batch of queries
  static constexpr int max_queries = 16;     // queries per batch at most
};

namespace detail {

template <class DevicePolicy, class T>
__global__ void __launch_bounds__(prompt_score_tuning::warps * 32)
    prompt_score_kernel(cache_state<T> st, DevicePolicy policy, chunk_params<T> c, const float* lse,
                        float scale) {
  using tuning = prompt_score_tuning;
  constexpr int K = tuning::keys, W = tuning::warps, Q = tuning::max_queries;
  constexpr int max_pairs = 32;               // (query, head) pairs per batch: group_size <= 32
  __shared__ float ks[K][257];                // the tile's keys, fp32, padded rows
  __shared__ float qs[tuning::query_floats];  // [pair][head_dim] query rows of the batch
  __shared__ float probs[max_pairs][K];       // p of each (pair, key)
  __shared__ int batch_query[Q];              // chunk index of each query of the batch
  __shared__ int batch_size, next_query, done;
  __shared__ std::int32_t key_position[K];

  const int H = st.num_kv_heads, G = st.group_size, D = st.head_dim, Hq = H * G;
  const int r = int(blockIdx.y), b = r / H, h = r % H;
  const int seq = c.in.seq_ids[b];
  if (*st.status != 0 || !step::valid_sequence(st.active, st.max_sequences, seq)) return;
  const int row = seq * H + h;
  const int s0 = int(blockIdx.x) * K;
  const int length = st.row_length[row];
  if (s0 >= length) return;

  const int pad = c.padding(b);
  const int n = c.length - pad;  // real queries of the chunk
  const std::int32_t seen = st.seen[row];
  const std::int32_t t0 = seen - n;  // position of the chunk's first real query
  const std::int32_t prompt_end = seen + (c.in.tokens - (c.begin + c.length));
  // Queries per batch: as many as probs holds (at most Q); their query rows are loaded
  // pairs_per_load (query, head) pairs at a time.
  const int per_batch = max(1, min(Q, max_pairs / G));
  const int pairs_per_load = min(max_pairs, tuning::query_floats / D);

  const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
  // The tile's keys (holes and slots past the row get position -1).
  if (threadIdx.x < K) {
    const int s = s0 + int(threadIdx.x);
    key_position[threadIdx.x] = s < length ? st.position[st.slot_index(row, s)] : -1;
  }
  __syncthreads();
  std::int32_t min_position = INT_MAX;
  for (int j = 0; j < K; ++j)
    if (key_position[j] >= 0 && key_position[j] < min_position) min_position = key_position[j];
  if (min_position == INT_MAX) return;  // no live key in the tile
  for (int e = int(threadIdx.x); e < K * D; e += W * 32) {
    const int j = e / D, ch = e % D;
    ks[j][ch] =
        key_position[j] >= 0 ? load_float(st.k + st.slot_index(row, s0 + j) * D + ch) : 0.0f;
  }
  if (threadIdx.x == 0) {
    next_query = c.length - 1;
    done = 0;
  }

  // Lane j of warp 0 folds key j.
  const std::int32_t my_position = key_position[lane];
  float acc = 0.0f;
  bool assigned = false, touched = false;

  for (;;) {
    __syncthreads();
    // Thread 0 picks the next batch: the newest unvisited queries that vote and can see a key of
    // the tile (position >= min_position).
    if (threadIdx.x == 0) {
      int count = 0, i = next_query;
      for (; i >= pad && count < per_batch; --i) {
        const std::int32_t t = t0 + (i - pad);
        if (t < min_position) {
          i = pad - 1;
          break;
        }
        if (policy.prompt_score(t, prompt_end) != score_update::none) batch_query[count++] = i;
      }
      next_query = i;
      batch_size = done ? 0 : count;
    }
    __syncthreads();
    const int nq = batch_size;
    if (nq == 0) break;
    const int pairs = nq * G;
    for (int p0 = 0; p0 < pairs; p0 += pairs_per_load) {
      const int chunk = min(pairs_per_load, pairs - p0);
      for (int e = int(threadIdx.x); e < chunk * D; e += W * 32) {
        const int pair = p0 + e / D, ch = e % D;
        const int i = batch_query[pair / G], g = pair % G;
        qs[e] = load_float(c.in.q + (c.token(b, i) * Hq + h * G + g) * D + ch);
      }
      __syncthreads();
      // Warp w takes pairs w, w + W, w + 2W, w + 3W at once: each key channel read from shared
      // memory feeds up to four dot products.
      for (int x0 = warp; x0 < chunk; x0 += 4 * W) {
        const int count = min(4, (chunk - x0 + W - 1) / W);
        float dot[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int ch = 0; ch < D; ++ch) {
          const float kc = ks[lane][ch];
#pragma unroll
          for (int u = 0; u < 4; ++u)
            if (u < count) dot[u] += qs[(x0 + u * W) * D + ch] * kc;
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          if (u >= count) break;
          const int pair = p0 + x0 + u * W;
          const int i = batch_query[pair / G], g = pair % G;
          const std::int32_t t = t0 + (i - pad);
          probs[pair][lane] = my_position >= 0 && my_position <= t
                                  ? expf(dot[u] * scale - lse[c.token(b, i) * Hq + h * G + g])
                                  : 0.0f;
        }
      }
      __syncthreads();
    }
    if (warp == 0) {
      for (int q = 0; q < nq && !assigned; ++q) {  // newest first
        const std::int32_t t = t0 + (batch_query[q] - pad);
        if (my_position < 0 || my_position > t) continue;
        float p = 0.0f;
        for (int g = 0; g < G; ++g) p += probs[q * G + g][lane];
        acc += p;
        touched = true;
        if (policy.prompt_score(t, prompt_end) == score_update::assign) assigned = true;
      }
      const bool all = __all_sync(0xffffffffu, assigned || my_position < 0);
      if (lane == 0 && all) done = 1;
    }
  }
  if (warp == 0 && touched) {
    float& score = st.score[st.slot_index(row, s0 + lane)];
    score = assigned ? acc : score + acc;
  }
}

}  // namespace detail

/// Folds the probabilities of the chunk [begin, begin + length) of in's prompts into the cache's
/// per-slot scores, after append_prompt appended that chunk (so the cache holds its keys) and
/// prefill_attention wrote the chunk's log-sum-exp into lse ([batch][tokens][num_query_heads],
/// natural log). Policies whose prompt_score is none everywhere, or whose cache keeps no scores,
/// need not call it. Skipped (like every step) while cache_state::status is set.
template <class T, class DevicePolicy>
[[nodiscard]] cudaError_t prompt_scores(const cache_state<T>& st, const DevicePolicy& policy,
                                        const prefill_batch<T>& in, int begin, int length,
                                        const float* lse, cudaStream_t stream = nullptr) {
  static_assert(!prefill_traits<DevicePolicy>::dms,
                "dms::cuda::prompt_scores: DMS prompts are not scored (no visibility rule here)");
  if (in.batch < 0 || begin < 0 || length < 0 ||
      std::int64_t{begin} + length > std::int64_t{in.tokens} || st.head_dim > 256)
    return cudaErrorInvalidValue;
  if (in.batch == 0 || length == 0 || !DevicePolicy::keeps_scores) return cudaSuccess;
  if (!in.seq_ids || !in.q || !lse || !st.score || in.batch * st.num_kv_heads > 65535 ||
      st.group_size > 32)
    return cudaErrorInvalidValue;
  using tuning = prompt_score_tuning;
  const int slots =
      int(std::min<std::int64_t>(st.max_row_slots, std::int64_t{st.max_pages} * st.page_size));
  const dim3 grid(unsigned((slots + tuning::keys - 1) / tuning::keys),
                  unsigned(in.batch * st.num_kv_heads));
  const float scale =
      in.softmax_scale > 0.0f ? in.softmax_scale : 1.0f / std::sqrt(float(st.head_dim));
  detail::prompt_score_kernel<DevicePolicy, T><<<grid, tuning::warps * 32, 0, stream>>>(
      st, policy, detail::chunk_params<T>{in, begin, length}, lse, scale);
  return cudaGetLastError();
}

}  // namespace cuda
DMS_NAMESPACE_END
