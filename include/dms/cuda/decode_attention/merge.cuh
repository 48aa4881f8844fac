// SPDX-License-Identifier: Apache-2.0
#pragma once

// Kernel 3 of decode attention, merge and fold: each batch row's partials merged by
// log-sum-exp into out and lse, and the probabilities folded into the slots' scores. Part of
// dms/cuda/decode_attention.cuh, whose header comment describes the three kernels.

#if !defined(__CUDACC__)
#error \
    "dms/cuda/decode_attention/merge.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cstdint>

#include "dms/config.hpp"
#include "dms/cuda/decode_attention/layout.cuh"

DMS_NAMESPACE_BEGIN
namespace cuda {
namespace detail {
namespace decode {

template <class Q>
struct merge_args {
  batch_layout layout;
  int rows;
  int group_size;
  int head_dim;
  const std::int32_t* offsets;
  const int4* work;
  const float* part_lse;
  const float* part_out;
  const float* logits;  // null: no fold
  Q* out;
  float* lse;
  float* score;
  bool add;
};

DMS_DEVICE float warp_max(float x) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}
DMS_DEVICE float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

template <int Threads, class Q>
__global__ void __launch_bounds__(Threads) merge_kernel(merge_args<Q> a) {
  __shared__ float row_lse[decode_tuning::max_group_size];
  const int tid = int(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const int G = a.group_size, D = a.head_dim;
  const int num_items = a.offsets[a.rows];
  const int tasks = a.rows + (a.logits != nullptr ? num_items : 0);

  for (int t = int(blockIdx.x); t < tasks; t += int(gridDim.x)) {
    const bool fold = t >= a.rows;
    const int4 w = fold ? a.work[t - a.rows] : make_int4(t, 0, 0, 0);
    const int i = w.x;
    const int lo = a.offsets[i], hi = a.offsets[i + 1];

    __syncthreads();  // the previous task has finished reading row_lse
    for (int g = warp; g < G; g += Threads / 32) {
      float M = neg_inf();
      for (int k = lo + lane; k < hi; k += 32) M = fmaxf(M, a.part_lse[std::int64_t{k} * G + g]);
      M = warp_max(M);
      float sum = 0.0f;
      if (M != neg_inf())
        for (int k = lo + lane; k < hi; k += 32)
          sum += exp2f(a.part_lse[std::int64_t{k} * G + g] - M);
      sum = warp_sum(sum);
      if (lane == 0) row_lse[g] = M == neg_inf() ? M : M + log2f(sum);
    }
    __syncthreads();

    if (!fold) {
      for (int idx = tid; idx < G * D; idx += Threads) {
        const int g = idx / D, c = idx % D;
        const float L = row_lse[g];
        float o = 0.0f;
        if (L != neg_inf())
          for (int k = lo; k < hi; ++k)
            o = fmaf(exp2f(a.part_lse[std::int64_t{k} * G + g] - L),
                     a.part_out[(std::int64_t{k} * G + g) * D + c], o);
        a.out[(std::int64_t{i} * G + g) * D + c] = from_float<Q>(o);
      }
      if (a.lse != nullptr)
        for (int g = tid; g < G; g += Threads)
          a.lse[std::int64_t{i} * G + g] = row_lse[g] == neg_inf() ? neg_inf() : row_lse[g] * ln2;
    } else {
      // Every slot this chunk read was read by exactly this chunk, so the updates do not race.
      const row_reader rd = a.layout.reader(i, a.layout.cache_row(i));
      for (int j = w.y + tid; j < w.z; j += Threads) {
        const int at = rd.slot(j);
        if (at < 0) continue;
        float p = 0.0f;
        for (int g = 0; g < G; ++g) p += exp2f(a.logits[std::int64_t{at} * G + g] - row_lse[g]);
        a.score[at] = a.add ? a.score[at] + p : p;
      }
    }
  }
}

}  // namespace decode
}  // namespace detail
}  // namespace cuda
DMS_NAMESPACE_END
