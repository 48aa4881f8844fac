// SPDX-License-Identifier: Apache-2.0
#pragma once

// The SIMT kernel of prefill attention (any storage type, head_dim <= 256): one warp per query
// row, fp32 throughout. Part of dms/cuda/prefill_attention.cuh, whose header comment describes the
// design.

#if !defined(__CUDACC__)
#error \
    "dms/cuda/prefill_attention/simt_kernel.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cmath>
#include <cstdint>

#include "dms/config.hpp"
#include "dms/cuda/prefill_attention/keys.cuh"
#include "dms/cuda/prefill_attention/options.cuh"
#include "dms/step/cache_state.hpp"

DMS_NAMESPACE_BEGIN
namespace cuda {
namespace detail {

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

}  // namespace detail
}  // namespace cuda
DMS_NAMESPACE_END
