// SPDX-License-Identifier: Apache-2.0
#pragma once

// The boundary between the device API (returns cudaError_t, never throws) and the owning host
// wrappers (throw dms::error naming the call that failed).

#if !defined(__CUDACC__)
#error "dms/cuda/check.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cuda_runtime_api.h>

#include "dms/config.hpp"
#include "dms/error.hpp"

DMS_NAMESPACE_BEGIN
namespace cuda {

/// Throws dms::error("dms: <what> failed: <CUDA error name>: <description>") unless ok.
inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    ::dms::detail::fail(what, " failed: ", cudaGetErrorName(status), ": ",
                        cudaGetErrorString(status));
}

}  // namespace cuda
DMS_NAMESPACE_END

/// Propagates a non-success cudaError_t to the caller (for functions that return one).
#define DMS_CUDA_TRY(expr)                                                \
  do {                                                                    \
    const cudaError_t dms_cuda_try_status_ = (expr);                      \
    if (dms_cuda_try_status_ != cudaSuccess) return dms_cuda_try_status_; \
  } while (0)
