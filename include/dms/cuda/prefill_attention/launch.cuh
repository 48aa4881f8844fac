// SPDX-License-Identifier: Apache-2.0
#pragma once

// Launching prefill attention: the kernel for the storage type, head_dim, alignment and device
// (tensor cores where they apply, SIMT otherwise). Part of dms/cuda/prefill_attention.cuh, whose
// header comment describes the design.

#if !defined(__CUDACC__)
#error \
    "dms/cuda/prefill_attention/launch.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "dms/config.hpp"
#include "dms/cuda/check.cuh"
#include "dms/cuda/prefill_attention/keys.cuh"
#include "dms/cuda/prefill_attention/mma_kernel.cuh"
#include "dms/cuda/prefill_attention/options.cuh"
#include "dms/cuda/prefill_attention/simt_kernel.cuh"
#include "dms/numeric.hpp"
#include "dms/step/cache_state.hpp"

DMS_NAMESPACE_BEGIN
namespace cuda {
namespace detail {

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
}  // namespace cuda
DMS_NAMESPACE_END
