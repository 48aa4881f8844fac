// SPDX-License-Identifier: Apache-2.0
#pragma once

// Kernel 1 of decode attention, plan: one block cuts every batch row's read domain into work
// items of one chunk length. Part of dms/cuda/decode_attention.cuh, whose header comment describes
// the three kernels.

#if !defined(__CUDACC__)
#error \
    "dms/cuda/decode_attention/plan.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "dms/config.hpp"
#include "dms/cuda/decode_attention/layout.cuh"

DMS_NAMESPACE_BEGIN
namespace cuda {
namespace detail {
namespace decode {

struct plan_args {
  batch_layout layout;
  const std::int32_t* status;  // [1] or null: nonzero = the step failed, plan no work
  int rows;
  int target_items;
  std::int32_t* offsets;  // [rows + 2]
  int4* work;             // [max_items]
};

template <int Threads>
__global__ void __launch_bounds__(Threads) plan_kernel(plan_args a) {
  using block_reduce = cub::BlockReduce<long long, Threads>;
  using block_scan = cub::BlockScan<int, Threads>;
  __shared__ union {
    typename block_reduce::TempStorage reduce;
    typename block_scan::TempStorage scan;
  } storage;
  __shared__ long long total;
  __shared__ int carry;

  const int tid = int(threadIdx.x);
  // A failed step plans no items: the merge then writes out = 0, lse = -inf for every row.
  const bool failed = a.status != nullptr && *a.status != 0;
  long long mine = 0;
  if (!failed)
    for (int i = tid; i < a.rows; i += Threads) mine += a.layout.domain(i);
  const long long sum = block_reduce(storage.reduce).Sum(mine);
  if (tid == 0) {
    total = sum;
    carry = 0;
  }
  __syncthreads();  // total is visible; storage is free for the scan

  // chunk >= total / target_items bounds the item count by target_items + rows.
  long long chunk64 = (total + a.target_items - 1) / a.target_items;
  if (chunk64 < decode_tuning::min_chunk) chunk64 = decode_tuning::min_chunk;
  if (chunk64 > 0x7fffffffLL) chunk64 = 0x7fffffffLL;
  const long long chunk = chunk64;

  for (int base = 0; base < a.rows; base += Threads) {
    const int i = base + tid;
    int items = 0;
    if (i < a.rows && !failed) items = int((a.layout.domain(i) + chunk - 1) / chunk);
    int first = 0, count = 0;
    block_scan(storage.scan).ExclusiveSum(items, first, count);
    if (i < a.rows) a.offsets[i] = carry + first;
    __syncthreads();  // everyone read carry; the scan storage is free again
    if (tid == 0) carry += count;
    __syncthreads();
  }
  if (tid == 0) {
    a.offsets[a.rows] = carry;
    a.offsets[a.rows + 1] = 0;  // the attend kernel's work counter
  }
  __syncthreads();  // the offsets (global, written by this block) are visible to the block

  const int num_items = carry;
  for (int k = tid; k < num_items; k += Threads) {
    // The last batch row whose first item is <= k (rows without items share their successor's
    // offset, so the search skips them).
    int lo = 0, hi = a.rows - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (a.offsets[mid] <= k) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    const long long n = a.layout.domain(lo);
    const long long begin = (k - a.offsets[lo]) * chunk;
    const long long end = begin + chunk < n ? begin + chunk : n;
    a.work[k] = make_int4(lo, int(begin), int(end), 0);
  }
}

}  // namespace decode
}  // namespace detail
}  // namespace cuda
DMS_NAMESPACE_END
