// SPDX-License-Identifier: Apache-2.0
#pragma once

// Annotation and namespace macros: the only place that knows whether nvcc is compiling.
// Everything outside include/dms/cuda/ uses DMS_HOST_DEVICE instead of raw CUDA keywords, so the
// same policy logic builds with g++ for the CPU path and with nvcc for the kernels.

#include "dms/version.hpp"

#if defined(__CUDACC__)
#define DMS_HOST_DEVICE __host__ __device__ __forceinline__
#define DMS_DEVICE __device__ __forceinline__
#else
#define DMS_HOST_DEVICE inline
#define DMS_DEVICE inline
#endif

// A versioned inline namespace: two vendored copies of different versions cannot collide at link
// time, while users keep writing dms::paged_cache.
#define DMS_PP_CAT_(a, b, c) a##_##b##_##c
#define DMS_PP_CAT(a, b, c) DMS_PP_CAT_(a, b, c)
#define DMS_ABI_NAMESPACE DMS_PP_CAT(v, DMS_VERSION_MAJOR, DMS_VERSION_MINOR)
#define DMS_NAMESPACE_BEGIN \
  namespace dms {           \
  inline namespace DMS_ABI_NAMESPACE {
#define DMS_NAMESPACE_END \
  }                       \
  }
