// SPDX-License-Identifier: Apache-2.0
#pragma once

// Prompt compression (the device form of paged_cache::finish_prompt), written once: the pieces
// the CUDA kernels (dms/cuda/prompt_compression.cuh) and the serial driver at the bottom of this
// file share, so the tests can pin the algorithm against the host policies' compress_prompt.
//
// Per row of a finished prompt, with the device policy's hooks (dms/policy/device_policy.hpp):
//   1. candidates: the live tokens with prompt_candidate(position, seen);
//   2. n = prompt_evictions(live, candidates); n < 0 leaves the row exactly as it is;
//   3. rank the candidates by eviction_key(score, position), the order of evicts_before (lowest
//      score first, the older token first among equals); by_pooled_score first replaces each
//      score by pooled_score over the candidates in position order (SnapKV);
//   4. evict the first n; then compact: the i-th lowest hole takes the i-th highest live slot
//      while that slot lies above it (the host cache's two-pointer walk), and the pages past the
//      new length go back to the free stack, rows in batch order, pages in logical order.
// Evicting the n lowest of a total order at once equals the host's repeated arg-min, and the
// compaction pairing equals its walk, so the result is the host cache's, bit for bit.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <span>
#include <utility>
#include <vector>

#include "dms/config.hpp"
#include "dms/policy/device_policy.hpp"
#include "dms/step/batch_step.hpp"
#include "dms/step/cache_state.hpp"

DMS_NAMESPACE_BEGIN
namespace step {

/// (score, position) as one unsigned key whose ascending order is evicts_before's: the float's
/// bits made order-preserving (-0 and +0 are equal, as they compare), then the position
/// (positions of live tokens are >= 0).
DMS_HOST_DEVICE std::uint64_t eviction_key(float score, std::int32_t position) {
  if (score == 0.0f) score = 0.0f;  // -0 -> +0
  std::uint32_t bits;
  std::memcpy(&bits, &score, sizeof bits);
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (std::uint64_t{bits} << 32) | std::uint32_t(position);
}

/// SnapKV's pooled score of candidate i of n (in position order), score_at(j) giving the score
/// of candidate j: max over [i - kernel/2, i + kernel/2] clipped to [0, n) (torch's max_pool1d
/// pads with -inf), or the sum over it divided by kernel (avg_pool1d pads with zeros). The same
/// operations in the same order as snapkv_policy::pooled_prefix, so the results are equal.
template <class ScoreAt>
DMS_HOST_DEVICE float pooled_score(ScoreAt score_at, int n, int i, int kernel, bool max_pool) {
  const int half = kernel / 2;
  const int lo = i - half < 0 ? 0 : i - half;
  const int hi = i + half > n - 1 ? n - 1 : i + half;
  const std::uint32_t minus_inf_bits = 0xff800000u;
  float acc = 0.0f;
  if (max_pool) std::memcpy(&acc, &minus_inf_bits, sizeof acc);
  for (int j = lo; j <= hi; ++j) {
    const float x = score_at(j);
    acc = max_pool ? (acc < x ? x : acc) : acc + x;
  }
  return max_pool ? acc : acc / float(kernel);
}

/// Moves the token of live slot `from` into the hole `to` (position, score, the policy's
/// bookkeeping); the K/V channels move separately (move_channel).
template <class T, class DevicePolicy>
DMS_HOST_DEVICE void move_token(const cache_state<T>& st, const DevicePolicy& policy, int row,
                                int from, int to) {
  const std::int64_t a = st.slot_index(row, from), b = st.slot_index(row, to);
  const std::int32_t position = st.position[a];
  st.position[b] = position;
  st.position[a] = -1;
  if (st.score) {
    st.score[b] = st.score[a];
    st.score[a] = 0.0f;
  }
  policy.on_slot_moved(st.context(row), position, to);
}

/// Copies K/V channel c of slot `from` to slot `to`.
template <class T>
DMS_HOST_DEVICE void move_channel(const cache_state<T>& st, int row, int from, int to, int c) {
  const std::int64_t a = st.slot_index(row, from) * st.head_dim + c;
  const std::int64_t b = st.slot_index(row, to) * st.head_dim + c;
  st.k[b] = st.k[a];
  st.v[b] = st.v[a];
}

/// Widens channel c of the key bounds of slot's page by the slot's key (bounds only widen).
template <class T>
DMS_HOST_DEVICE void widen_channel(const cache_state<T>& st, int row, int slot, int c) {
  if (!st.page_min) return;
  const float x = to_float(st.k[st.slot_index(row, slot) * st.head_dim + c]);
  const std::int64_t p = std::int64_t{st.page_entry(row, slot / st.page_size)} * st.head_dim + c;
  st.page_min[p] = x < st.page_min[p] ? x : st.page_min[p];
  st.page_max[p] = x > st.page_max[p] ? x : st.page_max[p];
}

/// Pages a row gives back when it shrinks from `length` to `new_length` slots.
DMS_HOST_DEVICE int pages_released(int length, int new_length, int page_size) {
  return (length + page_size - 1) / page_size - (new_length + page_size - 1) / page_size;
}

/// Shrinks a dense row to new_length slots: its pages past the end go to the free stack at
/// free_pages[*free_top + rank ...] in logical order (the caller raises free_top by the total
/// once every row is done), and the row has no holes left.
template <class T>
DMS_HOST_DEVICE void shrink_row(const cache_state<T>& st, int row, int new_length, int rank) {
  const int keep = (new_length + st.page_size - 1) / st.page_size;
  const int had = (st.row_length[row] + st.page_size - 1) / st.page_size;
  for (int p = keep; p < had; ++p) {
    st.free_pages[*st.free_top + rank + (p - keep)] = st.page_entry(row, p);
    st.page_entry(row, p) = -1;
  }
  st.row_length[row] = new_length;
  st.hole_head[row] = -1;
}

// ---- serial driver: the same algorithm, one row at a time --------------------------------

/// Reduces one row of a finished prompt (steps 1-4 above) and returns the pages it released at
/// free_pages[*free_top + rank ...]; the caller raises free_top.
template <class T, class DevicePolicy>
int compress_prompt_row(const cache_state<T>& st, const DevicePolicy& policy, int row, int rank) {
  const int length = st.row_length[row];
  const std::int32_t seen = st.seen[row];
  std::vector<std::pair<std::uint64_t, int>> cand;  // (key, slot)
  for (int s = 0; s < length; ++s) {
    const std::int32_t p = st.position[st.slot_index(row, s)];
    if (p >= 0 && policy.prompt_candidate(p, seen))
      cand.emplace_back(std::uint64_t(std::uint32_t(p)), s);
  }
  const int n = int(cand.size());
  int evict = policy.prompt_evictions(st.live[row], n);
  if (evict < 0) return 0;
  evict = evict < n ? evict : n;
  const auto score_of = [&](int slot) {
    return st.score ? st.score[st.slot_index(row, slot)] : 0.0f;
  };
  if constexpr (DevicePolicy::reduces_prompt == prompt_reduction::by_pooled_score) {
    std::sort(cand.begin(), cand.end());  // by position
    std::vector<float> pooled(cand.size());
    for (int i = 0; i < n; ++i)
      pooled[i] = pooled_score([&](int j) { return score_of(cand[j].second); }, n, i,
                               policy.pool_kernel(), policy.pool_max());
    for (int i = 0; i < n; ++i)
      cand[i].first = eviction_key(pooled[i], std::int32_t(cand[i].first));
  } else {
    for (auto& c : cand) c.first = eviction_key(score_of(c.second), std::int32_t(c.first));
  }
  std::sort(cand.begin(), cand.end());
  for (int i = 0; i < evict; ++i) {
    const std::int64_t at = st.slot_index(row, cand[i].second);
    st.position[at] = -1;
    if (st.score) st.score[at] = 0.0f;
  }
  st.live[row] -= evict;

  std::vector<int> holes, lives;  // holes ascending, live slots descending
  for (int s = 0; s < length; ++s)
    if (st.position[st.slot_index(row, s)] < 0) holes.push_back(s);
  for (int s = length - 1; s >= 0; --s)
    if (st.position[st.slot_index(row, s)] >= 0) lives.push_back(s);
  for (std::size_t i = 0; i < holes.size() && i < lives.size() && lives[i] > holes[i]; ++i) {
    move_token(st, policy, row, lives[i], holes[i]);
    for (int c = 0; c < st.head_dim; ++c) {
      move_channel(st, row, lives[i], holes[i], c);
      widen_channel(st, row, holes[i], c);
    }
  }
  const int released = pages_released(length, st.live[row], st.page_size);
  shrink_row(st, row, st.live[row], rank);
  return released;
}

/// Ends the prompts of `seq_ids` (paged_cache::finish_prompt for each, in order). Returns ok, or
/// why nothing changed (an unknown or repeated sequence id, or an earlier failed step).
template <class T, class DevicePolicy>
step_status finish_prompts(const cache_state<T>& st, const DevicePolicy& policy,
                           std::span<const std::int32_t> seq_ids) {
  if (*st.status != 0) return step_status(*st.status);
  std::vector<std::uint8_t> seen_id(static_cast<std::size_t>(st.max_sequences), 0);
  for (const std::int32_t seq : seq_ids) {
    const step_status error = !valid_sequence(st.active, st.max_sequences, seq)
                                  ? step_status::bad_sequence
                              : seen_id[seq]++ != 0 ? step_status::duplicate_sequence
                                                    : step_status::ok;
    if (error != step_status::ok) {
      *st.status = std::int32_t(error);
      return error;
    }
  }
  if constexpr (DevicePolicy::reduces_prompt != prompt_reduction::none) {
    int released = 0;
    for (const std::int32_t seq : seq_ids)
      for (int h = 0; h < st.num_kv_heads; ++h)
        released += compress_prompt_row(st, policy, seq * st.num_kv_heads + h, released);
    *st.free_top += released;
  }
  return step_status::ok;
}

}  // namespace step
DMS_NAMESPACE_END
