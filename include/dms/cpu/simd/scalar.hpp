// SPDX-License-Identifier: Apache-2.0
#pragma once

// SIMD level "scalar": 1 lane, plain C++: the portable fallback, any compiler and CPU.
// The primitives live in namespace dms::cpu::simd::scalar (see ops.inl); the kernels are added to
// the same namespace by the kernel headers.

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dms/config.hpp"
#include "dms/cpu/simd/target.hpp"
#include "dms/numeric.hpp"

DMS_CPU_DIAGNOSTICS_BEGIN

DMS_NAMESPACE_BEGIN
namespace cpu::simd::scalar {
#define DMS_CPU_W 1
#define DMS_CPU_ISA 0
#include "dms/cpu/simd/ops.inl"
#undef DMS_CPU_ISA
#undef DMS_CPU_W
}  // namespace cpu::simd::scalar
DMS_NAMESPACE_END

DMS_CPU_DIAGNOSTICS_END
