// SPDX-License-Identifier: Apache-2.0
#pragma once

// The out-of-line primitives of every SIMD level, picked at run time: widen (storage type to
// float) and exp_array (the kernels' vector exp). Prefill packs K/V blocks with widen; the tests
// check every level's conversions and exp through this table.

#include "dms/config.hpp"
#include "dms/cpu/simd/avx2.hpp"
#include "dms/cpu/simd/avx512.hpp"
#include "dms/cpu/simd/level.hpp"
#include "dms/cpu/simd/scalar.hpp"
#include "dms/cpu/simd/vec128.hpp"
#include "dms/numeric.hpp"

DMS_NAMESPACE_BEGIN
namespace cpu::detail {

template <class T>
struct simd_functions {
  void (*widen)(const T*, int, float*) noexcept;
  void (*exp_array)(const float*, int, float*) noexcept;
};

template <class T>
simd_functions<T> simd_functions_for(simd_level level) {
  switch (level) {
#if DMS_CPU_HAS_X86_TARGETS
    case simd_level::avx512:
      return {&simd::avx512::widen<T>, &simd::avx512::exp_array};
    case simd_level::avx2:
      return {&simd::avx2::widen<T>, &simd::avx2::exp_array};
#endif
#if DMS_CPU_HAS_VECTOR_EXTENSIONS
    case simd_level::vec128:
      return {&simd::vec128::widen<T>, &simd::vec128::exp_array};
#endif
    default:
      return {&simd::scalar::widen<T>, &simd::scalar::exp_array};
  }
}

}  // namespace cpu::detail
DMS_NAMESPACE_END
