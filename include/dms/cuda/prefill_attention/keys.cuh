// SPDX-License-Identifier: Apache-2.0
#pragma once

// The key list of prefill attention: the chunk's parameters, the temporary storage, the
// pre-pass kernel that compacts each row's visible cached slots and the chunk's survivors, and
// key_at, through which both attention kernels read a key. Part of dms/cuda/prefill_attention.cuh,
// whose header comment describes the design.

#if !defined(__CUDACC__)
#error \
    "dms/cuda/prefill_attention/keys.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cub/block/block_scan.cuh>
#include <type_traits>

#include "dms/config.hpp"
#include "dms/cuda/prefill_attention/options.cuh"
#include "dms/numeric.hpp"
#include "dms/policy/dms.hpp"
#include "dms/step/batch_step.hpp"
#include "dms/step/cache_state.hpp"

DMS_NAMESPACE_BEGIN
namespace cuda {
namespace detail {

inline std::size_t prefill_align(std::size_t n) {
  return (n + 255) / 256 * 256;
}

// The chunk the kernels work on, with the strides resolved.
template <class T>
struct chunk_params {
  prefill_batch<T> in;
  int begin;   // first token of the chunk within the arrays
  int length;  // C: tokens of the chunk (padding included)

  // Index of token i (of the chunk) of batch entry b in the token-major arrays.
  DMS_HOST_DEVICE std::int64_t token(int b, int i) const {
    return std::int64_t{b} * in.tokens + begin + i;
  }
  // The chunk's leading padding tokens for batch entry b.
  DMS_HOST_DEVICE int padding(int b) const {
    if (in.padding == nullptr) return 0;
    const int p = in.padding[b] - begin;
    return p < 0 ? 0 : (p > length ? length : p);
  }
  DMS_HOST_DEVICE float logit(int b, int i, int h, int num_kv_heads) const {
    return in.decision_logits ? in.decision_logits[token(b, i) * num_kv_heads + h] : 0.0f;
  }
};

// Temporary storage of the attention: per row of the batch (b * num_kv_heads + h), the compacted
// key list and the chunk's key metadata.
struct prefill_keys {
  std::int32_t* src;       // [rows][capacity] >= 0: flat cache slot; < 0: chunk token -1-src
  std::int32_t* deadline;  // [rows][capacity] last query position that sees the key
  std::int32_t* cached;    // [rows] entries of the list that are cache slots (the first)
  std::int32_t* t0;        // [rows] tokens seen before the chunk; -1: inactive sequence
  std::int32_t* survivors_before;  // [rows][chunk + 1] unflagged chunk tokens before token j
  std::int32_t* chunk_deadline;    // [rows][chunk] deadline of chunk token j (-1: padding)
  int capacity;

  static std::size_t bytes(int rows, int chunk, int capacity) {
    const auto r = std::size_t(rows);
    return 2 * prefill_align(sizeof(std::int32_t) * r * std::size_t(capacity)) +
           2 * prefill_align(sizeof(std::int32_t) * r) +
           prefill_align(sizeof(std::int32_t) * r * (std::size_t(chunk) + 1)) +
           prefill_align(sizeof(std::int32_t) * r * std::size_t(chunk));
  }
  static prefill_keys carve(void* d_temp, int rows, int chunk, int capacity) {
    auto* p = static_cast<unsigned char*>(d_temp);
    const auto r = std::size_t(rows);
    const auto take = [&p](std::size_t n) {
      auto* out = reinterpret_cast<std::int32_t*>(p);
      p += prefill_align(sizeof(std::int32_t) * n);
      return out;
    };
    prefill_keys t{};
    t.src = take(r * std::size_t(capacity));
    t.deadline = take(r * std::size_t(capacity));
    t.cached = take(r);
    t.t0 = take(r);
    t.survivors_before = take(r * (std::size_t(chunk) + 1));
    t.chunk_deadline = take(r * std::size_t(chunk));
    t.capacity = capacity;
    return t;
  }
};

// Every slot a row can span, plus the chunk's survivors.
template <class T>
int key_capacity(const cache_state<T>& st, int chunk) {
  const std::int64_t slots =
      std::min<std::int64_t>(st.max_row_slots, std::int64_t{st.max_pages} * st.page_size);
  return int(slots) + chunk;
}

// Loads and stores of the storage types with the hardware conversions (round to nearest even,
// the same rounding as dms::from_float).
template <class T>
DMS_DEVICE float load_float(const T* p) {
  if constexpr (std::is_same_v<T, half>) {
    return __half2float(__ushort_as_half(p->bits));
  } else if constexpr (std::is_same_v<T, bfloat16>) {
    return __uint_as_float(std::uint32_t{p->bits} << 16);
  } else {
    return *p;
  }
}
template <class T>
DMS_DEVICE T store_value(float x) {
  if constexpr (std::is_same_v<T, half>) {
    return half::from_bits(__half_as_ushort(__float2half_rn(x)));
  } else if constexpr (std::is_same_v<T, bfloat16>) {
    return bfloat16::from_bits(__bfloat16_as_ushort(__float2bfloat16_rn(x)));
  } else {
    return x;
  }
}

// Pre-pass, one block per row of the batch: the row's key list (visible cached slots in slot
// order, then the chunk's survivors in token order) and the chunk's key metadata.
template <int Threads, class T>
__global__ void __launch_bounds__(Threads)
    prefill_keys_kernel(cache_state<T> st, chunk_params<T> c, std::int32_t window,
                        prefill_keys tmp) {
  using block_scan = cub::BlockScan<int, Threads>;
  __shared__ typename block_scan::TempStorage scan_storage;
  const int H = st.num_kv_heads, C = c.length;
  const int r = int(blockIdx.x), b = r / H, h = r % H;
  const int seq = c.in.seq_ids[b];
  if (!step::valid_sequence(st.active, st.max_sequences, seq)) {
    if (threadIdx.x == 0) {
      tmp.t0[r] = -1;
      tmp.cached[r] = 0;
    }
    return;
  }
  const int row = seq * H + h;
  const std::int32_t t0 = st.seen[row];
  const int length = st.row_length[row];
  const int pad = c.padding(b);
  const bool dms = window >= 0;
  const std::uint8_t* ring =
      dms && st.ring_flag ? st.ring_flag + std::int64_t{row} * st.ring_length : nullptr;
  // The shift rule: the chunk's first real token flags the newest cached token.
  const bool newest_flagged = dms && pad < C && dms_rule::evicts(c.logit(b, pad, h, H));
  const std::int64_t list = std::int64_t{r} * tmp.capacity;

  int total = 0;
  for (int s0 = 0; s0 < length; s0 += Threads) {
    const int s = s0 + int(threadIdx.x);
    int keep = 0;
    std::int32_t flat = 0, deadline = INT_MAX;
    if (s < length) {
      const std::int64_t at = st.slot_index(row, s);
      const std::int32_t p = st.position[at];
      if (p >= 0) {
        const bool flagged =
            dms && (p == t0 - 1 ? newest_flagged
                                : ring != nullptr && dms_rule::flagged(ring, p, t0, window));
        deadline = flagged ? p + window : INT_MAX;
        keep = deadline >= t0 ? 1 : 0;  // else no query of the chunk sees it
        flat = std::int32_t(at);
      }
    }
    int offset = 0, added = 0;
    block_scan(scan_storage).ExclusiveSum(keep, offset, added);
    if (keep) {
      tmp.src[list + total + offset] = flat;
      tmp.deadline[list + total + offset] = deadline;
    }
    total += added;
    __syncthreads();  // scan_storage is reused
  }
  const int cached = total;

  const std::int64_t meta = std::int64_t{r} * C, before = std::int64_t{r} * (C + 1);
  for (int j0 = 0; j0 < C; j0 += Threads) {
    const int j = j0 + int(threadIdx.x);
    int survivor = 0;
    if (j < C) {
      std::int32_t deadline = -1;  // padding: not a key
      if (j >= pad) {
        const bool flagged = dms && j + 1 < C && dms_rule::evicts(c.logit(b, j + 1, h, H));
        deadline = flagged ? t0 + (j - pad) + window : INT_MAX;
        survivor = dms && !flagged ? 1 : 0;
      }
      tmp.chunk_deadline[meta + j] = deadline;
    }
    int offset = 0, added = 0;
    block_scan(scan_storage).ExclusiveSum(survivor, offset, added);
    if (j < C) tmp.survivors_before[before + j] = total - cached + offset;
    if (survivor) {
      tmp.src[list + total + offset] = -1 - j;
      tmp.deadline[list + total + offset] = INT_MAX;
    }
    total += added;
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    tmp.survivors_before[before + C] = total - cached;
    tmp.cached[r] = cached;
    tmp.t0[r] = t0;
  }
}

// Key kidx of a query tile: entries [0, n_list) of the row's key list, then chunk tokens from lo.
// Visible to a query at position t iff pos <= t <= deadline; past n_keys nothing (zero-filled).
template <class T>
struct key_source {
  const T* k;
  const T* v;
  std::int32_t pos;
  std::int32_t deadline;
  bool valid;
};

template <class T>
DMS_DEVICE key_source<T> key_at(const cache_state<T>& st, const chunk_params<T>& c,
                                const prefill_keys& tmp, int r, int b, int h, int kidx, int n_list,
                                int n_keys, int lo, std::int32_t t0, int pad) {
  const int H = st.num_kv_heads, D = st.head_dim;
  if (kidx >= n_keys) return {c.in.k, c.in.v, INT_MAX, -1, false};
  int j;
  std::int32_t pos, deadline;
  if (kidx < n_list) {
    const std::int64_t e = std::int64_t{r} * tmp.capacity + kidx;
    const std::int32_t src = tmp.src[e];
    deadline = tmp.deadline[e];
    pos = INT_MIN + 1;  // before every real query (a masked query row has position INT_MIN)
    if (src >= 0) {
      const std::int64_t at = std::int64_t{src} * D;
      return {st.k + at, st.v + at, pos, deadline, true};
    }
    j = -1 - src;
  } else {
    j = lo + (kidx - n_list);
    pos = t0 + (j - pad);
    deadline = tmp.chunk_deadline[std::int64_t{r} * c.length + j];
  }
  const std::int64_t at = (c.token(b, j) * H + h) * D;
  return {c.in.k + at, c.in.v + at, pos, deadline, true};
}

}  // namespace detail
}  // namespace cuda
DMS_NAMESPACE_END
