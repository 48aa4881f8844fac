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

#if !defined(__CUDACC__)
#error \
    "dms/cuda/prefill_attention.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <cub/block/block_scan.cuh>
#include <type_traits>

#include "dms/config.hpp"
#include "dms/cuda/check.cuh"
#include "dms/numeric.hpp"
#include "dms/policy/dense.hpp"
#include "dms/policy/dms.hpp"
#include "dms/policy/h2o.hpp"
#include "dms/policy/quest.hpp"
#include "dms/policy/snapkv.hpp"
#include "dms/policy/streaming_llm.hpp"
#include "dms/policy/tova.hpp"
#include "dms/step/batch_step.hpp"
#include "dms/step/cache_state.hpp"

DMS_NAMESPACE_BEGIN
namespace cuda {

/// Prompts of a batch of sequences, token-major, in device memory. Token i of sequence b is at
/// index b * tokens + i of every array; the entry points take a chunk [begin, begin + length) of
/// it. Sequences shorter than `tokens` are left-padded: their first padding[b] tokens are not
/// tokens at all (not cached, no position, outputs 0 and lse -inf).
template <class T>
struct prefill_batch {
  const std::int32_t* seq_ids = nullptr;  // [batch] cache sequence ids, distinct and active
  int batch = 0;
  int tokens = 0;                          // tokens per sequence in the arrays (padding included)
  const T* q = nullptr;                    // [batch][tokens][num_query_heads][head_dim]
  const T* k = nullptr;                    // [batch][tokens][num_kv_heads][head_dim]
  const T* v = nullptr;                    // [batch][tokens][num_kv_heads][head_dim]
  const float* decision_logits = nullptr;  // [batch][tokens][num_kv_heads], or null: no token
                                           // flagged (DMS); ignored by other policies
  const std::int32_t* padding = nullptr;   // [batch] leading padding tokens, or null: none
  T* out = nullptr;                        // [batch][tokens][num_query_heads][head_dim]
  float* lse = nullptr;                    // [batch][tokens][num_query_heads], or null
  float softmax_scale = 0.0f;              // <= 0: 1 / sqrt(head_dim)
  bool allow_tensor_cores = true;          // false: always the SIMT kernel (tests, debugging)
};

/// How prefill treats a device policy. `known`: its choose_victim names no slot inside the prompt
/// (or DMS's shift rule does), which the chunk append relies on. `dms`: DMS visibility with
/// window(policy). Specialize for a policy of your own.
template <class DevicePolicy>
struct prefill_traits {
  static constexpr bool known = std::is_same_v<DevicePolicy, dense_device_policy> ||
                                std::is_same_v<DevicePolicy, quest_device_policy> ||
                                std::is_same_v<DevicePolicy, tova_device_policy> ||
                                std::is_same_v<DevicePolicy, h2o_device_policy> ||
                                std::is_same_v<DevicePolicy, snapkv_device_policy> ||
                                std::is_same_v<DevicePolicy, streaming_device_policy>;
  static constexpr bool dms = false;
  static std::int32_t window(const DevicePolicy&) { return -1; }
};
template <>
struct prefill_traits<dms_device_policy> {
  static constexpr bool known = true;
  static constexpr bool dms = true;
  static std::int32_t window(const dms_device_policy& p) { return p.window; }
};

/// Launch shapes, as plain data.
struct prefill_tuning {
  static constexpr int keys_threads = 256;  // key-list pre-pass: one block per row
  static constexpr int mma_block_m = 64;    // query rows (token, head) per CTA: 4 warps x 16
  static constexpr int mma_block_n = 64;    // keys per tile
  static constexpr int mma_threads = 128;
  static constexpr int simt_warps = 4;  // query rows per block of the SIMT kernel
};

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

// ---- tensor-core kernel ------------------------------------------------------------------------

DMS_DEVICE unsigned shared_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; zero-filled when !valid (src is then not read).
DMS_DEVICE void cp_async_16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)),
               "l"(src), "r"(valid ? 16 : 0));
#else
  (void)dst, (void)src, (void)valid;
#endif
}
DMS_DEVICE void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int Pending>
DMS_DEVICE void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
#endif
}

DMS_DEVICE void ldmatrix_x4(std::uint32_t (&r)[4], const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(p)));
#else
  (void)p;
  r[0] = r[1] = r[2] = r[3] = 0;
#endif
}
DMS_DEVICE void ldmatrix_x4_trans(std::uint32_t (&r)[4], const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(p)));
#else
  (void)p;
  r[0] = r[1] = r[2] = r[3] = 0;
#endif
}

// D += A (16x16, row-major fragment) * B (16x8, column-major fragment), fp32 accumulators.
template <class T>
struct mma_ops;
template <>
struct mma_ops<half> {
  DMS_DEVICE static std::uint32_t pack(float lo, float hi) {
    const __half2 x = __floats2half2_rn(lo, hi);
    std::uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    return u;
  }
  DMS_DEVICE static void mma(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                             std::uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    (void)d, (void)a, (void)b0, (void)b1;
#endif
  }
};
template <>
struct mma_ops<bfloat16> {
  DMS_DEVICE static std::uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 x = __floats2bfloat162_rn(lo, hi);
    std::uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    return u;
  }
  DMS_DEVICE static void mma(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                             std::uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    (void)d, (void)a, (void)b0, (void)b1;
#endif
  }
};

template <class T, int D>
struct mma_shape {
  static constexpr int bm = prefill_tuning::mma_block_m;
  static constexpr int bn = prefill_tuning::mma_block_n;
  static constexpr int threads = prefill_tuning::mma_threads;
  static constexpr int chunks = D / 8;  // 16-byte chunks per row of Q, K or V
  static constexpr int q_elems = bm * D;
  static constexpr int kv_elems = bn * D;
  // Q, K and V double-buffered, key positions and deadlines double-buffered.
  static constexpr std::size_t smem_bytes =
      std::size_t(q_elems + 4 * kv_elems) * sizeof(T) + 4 * bn * sizeof(std::int32_t);
  static_assert(D == 64 || D == 128, "tensor-core prefill: head_dim 64 or 128");
  static_assert(bm == 16 * (threads / 32), "each warp owns 16 query rows");
  static_assert(bn * 2 == threads, "two threads load each key of a tile");
  static_assert(bn % 16 == 0 && chunks % 2 == 0, "tile shapes");
};

// Element offset of 16-byte chunk `chunk` of row `row` in a [rows][D] tile. XOR-swizzling the
// chunk with the row keeps ldmatrix (8 rows, same logical chunk) free of bank conflicts.
template <int D>
DMS_DEVICE int swizzle(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

template <class T>
DMS_DEVICE void write_empty_rows(const chunk_params<T>& c, int b, int h, int G, int H, int D,
                                 int m0, int rows, int rows_total) {
  const int Hq = H * G;
  for (int e = int(threadIdx.x); e < rows * D; e += int(blockDim.x)) {
    const int m = m0 + e / D, col = e % D;
    if (m >= rows_total) continue;
    const int token = m / G, head = h * G + m % G;
    c.in.out[(c.token(b, token) * Hq + head) * D + col] = T{};
    if (col == 0 && c.in.lse) c.in.lse[c.token(b, token) * Hq + head] = -INFINITY;
  }
}

template <class T, int D>
__global__ void __launch_bounds__(prefill_tuning::mma_threads)
    prefill_mma_kernel(cache_state<T> st, chunk_params<T> c, std::int32_t window, prefill_keys tmp,
                       float scale_log2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using shape = mma_shape<T, D>;
  using ops = mma_ops<T>;
  constexpr int BM = shape::bm, BN = shape::bn, NT = BN / 8, DT = D / 8, KS = D / 16;
  extern __shared__ __align__(16) unsigned char prefill_smem[];
  T* sq = reinterpret_cast<T*>(prefill_smem);
  T* sk = sq + shape::q_elems;                                              // [2][BN][D]
  T* sv = sk + 2 * shape::kv_elems;                                         // [2][BN][D]
  auto* skpos = reinterpret_cast<std::int32_t*>(sv + 2 * shape::kv_elems);  // [2][BN]
  std::int32_t* skdl = skpos + 2 * BN;                                      // [2][BN]

  const int H = st.num_kv_heads, G = st.group_size, Hq = H * G, C = c.length;
  const int b = int(blockIdx.z), h = int(blockIdx.y), r = b * H + h;
  // Heaviest tiles (latest queries) first, for a shorter tail.
  const int m0 = (int(gridDim.x) - 1 - int(blockIdx.x)) * BM;
  const int rows_total = C * G;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int pad = c.padding(b);
  const std::int32_t t0 = tmp.t0[r];
  const int tq0 = m0 / G, tq1 = min(C - 1, (m0 + BM - 1) / G);
  if (t0 < 0 || tq1 < pad) {
    write_empty_rows(c, b, h, G, H, D, m0, BM, rows_total);
    return;
  }
  const int i0 = max(tq0, pad);  // earliest real query token of the tile
  const int lo = window >= 0 ? max(pad, i0 - window) : pad;
  const int n_list =
      tmp.cached[r] + (window >= 0 ? tmp.survivors_before[std::int64_t{r} * (C + 1) + lo] : 0);
  const int n_keys = n_list + (tq1 - lo + 1);
  const int n_tiles = (n_keys + BN - 1) / BN;

  // Q tile: rows (token, query head of the group); padding and rows past the chunk are zeros.
  for (int e = int(threadIdx.x); e < BM * DT; e += shape::threads) {
    const int row = e / DT, ch = e % DT, m = m0 + row, token = m / G;
    const bool ok = m < rows_total && token >= pad;
    const T* src = ok ? c.in.q + (c.token(b, token) * Hq + h * G + m % G) * D + ch * 8 : c.in.q;
    cp_async_16(sq + swizzle<D>(row, ch), src, ok);
  }
  // Query positions of the tile's real rows span [q_first, q_last]. A key every one of them sees
  // needs no mask; a tile of such keys skips the masking altogether (one __syncthreads_and).
  const std::int32_t q_first = t0 + (i0 - pad), q_last = t0 + (tq1 - pad);
  bool seen_by_all[2] = {false, false};
  const auto load_tile = [&](int tile, int buf) {
    const int key = int(threadIdx.x) / 2, part = int(threadIdx.x) % 2;
    const key_source<T> src =
        key_at(st, c, tmp, r, b, h, tile * BN + key, n_list, n_keys, lo, t0, pad);
    const bool all = src.valid && src.pos <= q_first && src.deadline >= q_last;
    if (buf == 0) {
      seen_by_all[0] = all;
    } else {
      seen_by_all[1] = all;
    }
    if (part == 0) {
      skpos[buf * BN + key] = src.pos;
      skdl[buf * BN + key] = src.deadline;
    }
    T* dk = sk + buf * shape::kv_elems;
    T* dv = sv + buf * shape::kv_elems;
#pragma unroll
    for (int x = 0; x < DT / 2; ++x) {
      const int ch = part * (DT / 2) + x;
      cp_async_16(dk + swizzle<D>(key, ch), src.valid ? src.k + ch * 8 : src.k, src.valid);
      cp_async_16(dv + swizzle<D>(key, ch), src.valid ? src.v + ch * 8 : src.v, src.valid);
    }
  };

  // This thread's two query rows (lane / 4 and lane / 4 + 8 of the warp's 16).
  std::int32_t qpos[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int m = m0 + warp * 16 + lane / 4 + 8 * i, token = m / G;
    qpos[i] = m < rows_total && token >= pad ? t0 + (token - pad) : INT_MIN;
  }

  std::uint32_t qf[KS][4];
  float o[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};

  load_tile(0, 0);
  cp_async_commit();  // group 0: Q and the first tile
  for (int tile = 0; tile < n_tiles; ++tile) {
    const int buf = tile & 1;
    // The other buffer was last read in the previous iteration, which ended with a barrier.
    if (tile + 1 < n_tiles) load_tile(tile + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // everything but the group just committed has landed
    const bool unmasked = __syncthreads_and(buf == 0 ? seen_by_all[0] : seen_by_all[1]) != 0;
    if (tile == 0) {
#pragma unroll
      for (int kk = 0; kk < KS; ++kk)
        ldmatrix_x4(qf[kk], sq + swizzle<D>(warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                            kk * 2 + (lane >> 4)));
    }
    const T* kt = sk + buf * shape::kv_elems;
    const T* vt = sv + buf * shape::kv_elems;
    const std::int32_t* kpos = skpos + buf * BN;
    const std::int32_t* kdl = skdl + buf * BN;

    // S = Q K^T: 16 rows x 64 keys per warp.
    float s[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
      for (int p = 0; p < NT / 2; ++p) {
        std::uint32_t kb[4];
        ldmatrix_x4(
            kb, kt + swizzle<D>(p * 16 + (lane & 7) + (lane >> 4) * 8, kk * 2 + ((lane >> 3) & 1)));
        ops::mma(s[2 * p], qf[kk], kb[0], kb[1]);
        ops::mma(s[2 * p + 1], qf[kk], kb[2], kb[3]);
      }
    }

    // Mask, scale (log2 domain), online softmax.
    float tile_max[2] = {-INFINITY, -INFINITY};
    if (unmasked) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[nt][e] *= scale_log2;
          tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[nt][e]);
        }
      }
    } else {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = nt * 8 + (lane & 3) * 2 + (e & 1);
          const std::int32_t t = qpos[e >> 1];
          const bool visible = t >= kpos[col] && t <= kdl[col];
          s[nt][e] = visible ? s[nt][e] * scale_log2 : -INFINITY;
          tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[nt][e]);
        }
      }
    }
    float base[2], alpha[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 1));
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 2));
      const float mx = fmaxf(row_max[i], tile_max[i]);
      base[i] = mx == -INFINITY ? 0.0f : mx;  // a row with nothing visible yet: no -inf - -inf
      alpha[i] = exp2f(row_max[i] - base[i]);
      row_max[i] = mx;
      row_sum[i] *= alpha[i];
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = exp2f(s[nt][e] - base[e >> 1]);
        s[nt][e] = p;
        row_sum[e >> 1] += p;
      }
    }
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }

    // O += P V: the accumulator layout of S is the A-operand layout of the next product.
#pragma unroll
    for (int ks = 0; ks < BN / 16; ++ks) {
      const std::uint32_t pa[4] = {ops::pack(s[2 * ks][0], s[2 * ks][1]),
                                   ops::pack(s[2 * ks][2], s[2 * ks][3]),
                                   ops::pack(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                                   ops::pack(s[2 * ks + 1][2], s[2 * ks + 1][3])};
#pragma unroll
      for (int nd = 0; nd < D / 16; ++nd) {
        std::uint32_t vb[4];
        ldmatrix_x4_trans(vb, vt + swizzle<D>(ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                              nd * 2 + (lane >> 4)));
        ops::mma(o[2 * nd], pa, vb[0], vb[1]);
        ops::mma(o[2 * nd + 1], pa, vb[2], vb[3]);
      }
    }
    __syncthreads();  // this buffer is refilled by the next iteration's load
  }

  // Normalize and store (rows of padding tokens: 0 and -inf).
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row_sum[i] += __shfl_xor_sync(0xffffffffu, row_sum[i], 1);
    row_sum[i] += __shfl_xor_sync(0xffffffffu, row_sum[i], 2);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int m = m0 + warp * 16 + lane / 4 + 8 * i;
    if (m >= rows_total) continue;
    const int token = m / G, head = h * G + m % G;
    const bool some = token >= pad && row_sum[i] > 0.0f;
    const float inv = some ? 1.0f / row_sum[i] : 0.0f;
    T* dst = c.in.out + (c.token(b, token) * Hq + head) * D;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      const int col = dt * 8 + (lane & 3) * 2;
      *reinterpret_cast<std::uint32_t*>(dst + col) =
          ops::pack(o[dt][2 * i] * inv, o[dt][2 * i + 1] * inv);
    }
    if (c.in.lse && (lane & 3) == 0)
      c.in.lse[c.token(b, token) * Hq + head] =
          some ? (row_max[i] + log2f(row_sum[i])) * 0.6931471805599453f : -INFINITY;
  }
#else
  (void)st, (void)c, (void)window, (void)tmp, (void)scale_log2;
#endif
}

// ---- SIMT kernel -------------------------------------------------------------------------------

// One warp per query row (token, query head); lane l holds channels l, l + 32, ...
template <class T, int PerLane>
__global__ void __launch_bounds__(prefill_tuning::simt_warps * 32)
    prefill_simt_kernel(cache_state<T> st, chunk_params<T> c, std::int32_t window, prefill_keys tmp,
                        float scale_log2) {
  const int H = st.num_kv_heads, G = st.group_size, Hq = H * G, D = st.head_dim, C = c.length;
  const int b = int(blockIdx.z), h = int(blockIdx.y), r = b * H + h;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int m = int(blockIdx.x) * prefill_tuning::simt_warps + warp;
  if (m >= C * G) return;
  const int token = m / G, head = h * G + m % G;
  const int pad = c.padding(b);
  const std::int32_t t0 = tmp.t0[r];
  T* dst = c.in.out + (c.token(b, token) * Hq + head) * D;
  float* lse = c.in.lse ? c.in.lse + c.token(b, token) * Hq + head : nullptr;
  if (t0 < 0 || token < pad) {
    for (int x = lane; x < D; x += 32) dst[x] = T{};
    if (lse && lane == 0) *lse = -INFINITY;
    return;
  }
  const std::int32_t qpos = t0 + (token - pad);
  const T* qsrc = c.in.q + (c.token(b, token) * Hq + head) * D;
  float q[PerLane], o[PerLane];
#pragma unroll
  for (int x = 0; x < PerLane; ++x) {
    const int ch = lane + 32 * x;
    q[x] = ch < D ? load_float(qsrc + ch) : 0.0f;
    o[x] = 0.0f;
  }
  const int lo = window >= 0 ? max(pad, token - window) : pad;
  const int n_list =
      tmp.cached[r] + (window >= 0 ? tmp.survivors_before[std::int64_t{r} * (C + 1) + lo] : 0);
  const int n_keys = n_list + (token - lo + 1);
  float mx = -INFINITY, sum = 0.0f;
  for (int kidx = 0; kidx < n_keys; ++kidx) {
    const key_source<T> key = key_at(st, c, tmp, r, b, h, kidx, n_list, n_keys, lo, t0, pad);
    if (!(qpos >= key.pos && qpos <= key.deadline)) continue;  // uniform across the warp
    float dot = 0.0f;
#pragma unroll
    for (int x = 0; x < PerLane; ++x) {
      const int ch = lane + 32 * x;
      if (ch < D) dot += q[x] * load_float(key.k + ch);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    const float sc = dot * scale_log2;
    const float nm = fmaxf(mx, sc);
    const float alpha = exp2f(mx - nm), p = exp2f(sc - nm);
    sum = sum * alpha + p;
#pragma unroll
    for (int x = 0; x < PerLane; ++x) {
      const int ch = lane + 32 * x;
      if (ch < D) o[x] = o[x] * alpha + p * load_float(key.v + ch);
    }
    mx = nm;
  }
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
#pragma unroll
  for (int x = 0; x < PerLane; ++x) {
    const int ch = lane + 32 * x;
    if (ch < D) dst[ch] = store_value<T>(o[x] * inv);
  }
  if (lse && lane == 0) *lse = sum > 0.0f ? (mx + log2f(sum)) * 0.6931471805599453f : -INFINITY;
}

template <class T, int D>
cudaError_t launch_prefill_mma(const cache_state<T>& st, const chunk_params<T>& c,
                               std::int32_t window, const prefill_keys& tmp, float scale_log2,
                               cudaStream_t stream) {
  using shape = mma_shape<T, D>;
  const auto kernel = prefill_mma_kernel<T, D>;
  DMS_CUDA_TRY(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    int(shape::smem_bytes)));
  const std::int64_t rows = std::int64_t{c.length} * st.group_size;
  const dim3 grid(unsigned((rows + shape::bm - 1) / shape::bm), unsigned(st.num_kv_heads),
                  unsigned(c.in.batch));
  kernel<<<grid, shape::threads, shape::smem_bytes, stream>>>(st, c, window, tmp, scale_log2);
  return cudaGetLastError();
}

template <class T, int PerLane>
cudaError_t launch_prefill_simt(const cache_state<T>& st, const chunk_params<T>& c,
                                std::int32_t window, const prefill_keys& tmp, float scale_log2,
                                cudaStream_t stream) {
  constexpr int warps = prefill_tuning::simt_warps;
  const std::int64_t rows = std::int64_t{c.length} * st.group_size;
  const dim3 grid(unsigned((rows + warps - 1) / warps), unsigned(st.num_kv_heads),
                  unsigned(c.in.batch));
  prefill_simt_kernel<T, PerLane><<<grid, warps * 32, 0, stream>>>(st, c, window, tmp, scale_log2);
  return cudaGetLastError();
}

inline bool aligned_16(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

// Picks the kernel: tensor cores for half/bfloat16, head_dim 64/128, 16-byte aligned arrays on
// sm_80+; SIMT otherwise.
template <class T>
cudaError_t launch_prefill(const cache_state<T>& st, const chunk_params<T>& c, std::int32_t window,
                           const prefill_keys& tmp, float scale_log2, cudaStream_t stream) {
  const int D = st.head_dim;
  if constexpr (!std::is_same_v<T, float>) {
    if (c.in.allow_tensor_cores && (D == 64 || D == 128) && aligned_16(c.in.q) &&
        aligned_16(c.in.k) && aligned_16(c.in.v) && aligned_16(c.in.out)) {
      int device = 0, major = 0;
      DMS_CUDA_TRY(cudaGetDevice(&device));
      DMS_CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
      if (major >= 8)
        return D == 64 ? launch_prefill_mma<T, 64>(st, c, window, tmp, scale_log2, stream)
                       : launch_prefill_mma<T, 128>(st, c, window, tmp, scale_log2, stream);
    }
  }
  if (D <= 64) return launch_prefill_simt<T, 2>(st, c, window, tmp, scale_log2, stream);
  if (D <= 128) return launch_prefill_simt<T, 4>(st, c, window, tmp, scale_log2, stream);
  if (D <= 256) return launch_prefill_simt<T, 8>(st, c, window, tmp, scale_log2, stream);
  return cudaErrorInvalidValue;
}

}  // namespace detail

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
