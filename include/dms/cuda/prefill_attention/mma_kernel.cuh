// SPDX-License-Identifier: Apache-2.0
#pragma once

// The tensor-core kernel of prefill attention (sm_80+, half/bfloat16, head_dim 64 or 128):
// flash-attention tiles of 64 query rows on mma.sync m16n8k16, cp.async double-buffered K/V.
// Part of dms/cuda/prefill_attention.cuh, whose header comment describes the design.

#if !defined(__CUDACC__)
#error \
    "dms/cuda/prefill_attention/mma_kernel.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "dms/config.hpp"
#include "dms/cuda/prefill_attention/keys.cuh"
#include "dms/cuda/prefill_attention/options.cuh"
#include "dms/numeric.hpp"
#include "dms/step/cache_state.hpp"

DMS_NAMESPACE_BEGIN
namespace cuda {
namespace detail {

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

}  // namespace detail
}  // namespace cuda
DMS_NAMESPACE_END
