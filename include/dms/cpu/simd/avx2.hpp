// SPDX-License-Identifier: Apache-2.0
#pragma once

// SIMD level "avx2": 8 lanes, compiled for AVX2 + FMA + F16C whatever the translation unit's flags.
// The primitives live in namespace dms::cpu::simd::avx2 (see ops.inl); the kernels are added to
// the same namespace by the kernel headers.

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dms/config.hpp"
#include "dms/cpu/simd/target.hpp"
#include "dms/numeric.hpp"

#if DMS_CPU_HAS_X86_TARGETS
DMS_CPU_DIAGNOSTICS_BEGIN
DMS_CPU_TARGET_AVX2_BEGIN
DMS_NAMESPACE_BEGIN
namespace cpu::simd::avx2 {
#define DMS_CPU_W 8
#define DMS_CPU_ISA 2
#include "dms/cpu/simd/ops.inl"
#undef DMS_CPU_ISA
#undef DMS_CPU_W
}  // namespace cpu::simd::avx2
DMS_NAMESPACE_END
DMS_CPU_TARGET_END
DMS_CPU_DIAGNOSTICS_END
#endif  // DMS_CPU_HAS_X86_TARGETS
