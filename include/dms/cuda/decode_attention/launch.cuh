// SPDX-License-Identifier: Apache-2.0
#pragma once

// Launching the attend kernel: the one point where head_dim and the head tile become
// compile-time constants, and the grid from the occupancy. Part of dms/cuda/decode_attention.cuh,
// whose header comment describes the three kernels.

#if !defined(__CUDACC__)
#error \
    "dms/cuda/decode_attention/launch.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dms/config.hpp"
#include "dms/cuda/check.cuh"
#include "dms/cuda/decode_attention/attend.cuh"

DMS_NAMESPACE_BEGIN
namespace cuda {
namespace detail {
namespace decode {

inline bool supported_head_dim(int d) {
  return d == 64 || d == 128 || d == 256;
}

// As many blocks as fit on the device at once (occupancy is a host query, no synchronization),
// but no more than there can be work items.
template <class T, int D, int GT>
cudaError_t launch_attend(const attend_args<T>& a, int num_sms, int max_items,
                          cudaStream_t stream) {
  int per_sm = 0;
  DMS_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, attend_kernel<T, D, GT>,
                                                             decode_tuning::threads, 0));
  const std::int64_t blocks = std::int64_t{num_sms} * (per_sm > 0 ? per_sm : 1);
  const int grid = int(blocks < max_items ? blocks : max_items);
  attend_kernel<T, D, GT><<<grid, decode_tuning::threads, 0, stream>>>(a);
  return cudaGetLastError();
}

// The one point where (head_dim, head tile) become compile-time constants.
template <class T, int D>
cudaError_t launch_attend_tiles(attend_args<T> a, int padded_group, int num_sms, int max_items,
                                cudaStream_t stream) {
  using S = attend_shape<T, D>;
  const int gt = padded_group < S::max_heads ? padded_group : S::max_heads;
  a.head_tiles = padded_group / gt;
  switch (gt) {
    case 1:
      return launch_attend<T, D, 1>(a, num_sms, max_items, stream);
    case 2:
      return launch_attend<T, D, 2>(a, num_sms, max_items, stream);
    case 4:
      return launch_attend<T, D, 4>(a, num_sms, max_items, stream);
    case 8:
      if constexpr (S::max_heads >= 8) return launch_attend<T, D, 8>(a, num_sms, max_items, stream);
      break;
    default:
      break;
  }
  return cudaErrorInvalidValue;
}

template <class T>
cudaError_t launch_attend_dispatch(const attend_args<T>& a, int head_dim, int padded_group,
                                   int num_sms, int max_items, cudaStream_t stream) {
  switch (head_dim) {
    case 64:
      return launch_attend_tiles<T, 64>(a, padded_group, num_sms, max_items, stream);
    case 128:
      return launch_attend_tiles<T, 128>(a, padded_group, num_sms, max_items, stream);
    case 256:
      return launch_attend_tiles<T, 256>(a, padded_group, num_sms, max_items, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace decode
}  // namespace detail
}  // namespace cuda
DMS_NAMESPACE_END
