// SPDX-License-Identifier: Apache-2.0
#pragma once

// SIMD level "vec128": 4 lanes (GCC/Clang vector extensions): SSE2 on x86-64, NEON on AArch64.
// The primitives live in namespace dms::cpu::simd::vec128 (see ops.inl); the kernels are added to
// the same namespace by the kernel headers.

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dms/config.hpp"
#include "dms/cpu/simd/target.hpp"
#include "dms/numeric.hpp"

#if DMS_CPU_HAS_VECTOR_EXTENSIONS
DMS_CPU_DIAGNOSTICS_BEGIN

DMS_NAMESPACE_BEGIN
namespace cpu::simd::vec128 {
#define DMS_CPU_W 4
#define DMS_CPU_ISA 0
#include "dms/cpu/simd/ops.inl"
#undef DMS_CPU_ISA
#undef DMS_CPU_W
}  // namespace cpu::simd::vec128
DMS_NAMESPACE_END

DMS_CPU_DIAGNOSTICS_END
#endif  // DMS_CPU_HAS_VECTOR_EXTENSIONS
