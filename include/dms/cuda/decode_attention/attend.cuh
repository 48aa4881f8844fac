// SPDX-License-Identifier: Apache-2.0
#pragma once

// Kernel 2 of decode attention, attend: blocks take work items from a counter; key groups of
// lanes read each key once for all query heads of the group, with an online softmax, and merge
// into one partial per head and item. Part of dms/cuda/decode_attention.cuh, whose header comment
// describes the three kernels.

#if !defined(__CUDACC__)
#error \
    "dms/cuda/decode_attention/attend.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "dms/cache_view.hpp"
#include "dms/config.hpp"
#include "dms/cuda/decode_attention/layout.cuh"
#include "dms/numeric.hpp"

DMS_NAMESPACE_BEGIN
namespace cuda {
namespace detail {
namespace decode {

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

}  // namespace decode
}  // namespace detail
}  // namespace cuda
DMS_NAMESPACE_END
