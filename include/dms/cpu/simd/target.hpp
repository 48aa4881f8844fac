// SPDX-License-Identifier: Apache-2.0
#pragma once

// Target regions: everything defined between DMS_CPU_TARGET_<ISA>_BEGIN and DMS_CPU_TARGET_END
// is compiled for that instruction set, whatever flags the translation unit has — function
// templates included, wherever they are later instantiated (GCC `#pragma GCC target`, Clang
// `#pragma clang attribute ... target`, as Google Highway does it). The kernels are written once,
// in fragments (`*.inl`), and included into one namespace per level inside its region, so the
// library needs no -march flag, and a CPU without the instruction set never reaches that code:
// dispatch (simd/level.hpp) picks the namespace at run time.
//
// Why regions and not a target attribute on each kernel: a kernel is a template over the vector
// ops, and a function template cannot take a target that depends on its arguments. Without a
// target the ops could not use intrinsics (GCC and Clang refuse to inline a function with a
// target into one without), and GCC warns (-Wpsabi) about every function that returns a 32- or
// 64-byte vector outside an AVX target, at a location it cannot attribute, so the warning could
// not even be silenced locally.
//
// Rules inside a region: include nothing (every header a fragment needs is included before the
// region opens, so library code is never recompiled for a target), and only call code that is
// either defined in the region or free of target-specific intrinsics.

#include "dms/cpu/simd/level.hpp"

#if DMS_CPU_HAS_X86_TARGETS
#include <immintrin.h>

// clang-format off
#if defined(__clang__)
// _Pragma takes exactly one string literal, hence the long lines.
#define DMS_CPU_TARGET_AVX2_BEGIN _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c\"))), apply_to = function)")
#define DMS_CPU_TARGET_AVX512_BEGIN _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c\"))), apply_to = function)")
#define DMS_CPU_TARGET_END _Pragma("clang attribute pop")
#else
#define DMS_CPU_TARGET_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define DMS_CPU_TARGET_AVX512_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c\")")
#define DMS_CPU_TARGET_END _Pragma("GCC pop_options")
#endif
// clang-format on
#endif  // DMS_CPU_HAS_X86_TARGETS

// Small helpers that must be inlined into the kernels of whatever region they are defined in.
#if defined(__GNUC__)
#define DMS_CPU_INLINE inline __attribute__((always_inline))
#define DMS_CPU_PREFETCH(p) __builtin_prefetch(p, 0, 2)
#define DMS_CPU_RESTRICT __restrict__
#else
#define DMS_CPU_INLINE inline
#define DMS_CPU_PREFETCH(p) ((void)(p))
#define DMS_CPU_RESTRICT
#endif

// Before a kernel's short loop of known trip count (over the heads of a tile, the chunks of a
// compiled head_dim, the vectors of a block): unrolled completely, so that its arrays of vectors
// live in registers. GCC does this by itself at -O3 but not at -O2, where the AVX-512 decode
// kernel then ran 1.7-2x slower (docs/performance/cpu_fast_path_xeon.md); Clang reads the
// same pragma. NVCC's front end rejects it (host code in a .cu file keeps the compiler's own
// unrolling).
#if defined(__GNUC__) && !defined(__CUDACC__)
#define DMS_CPU_UNROLL _Pragma("GCC unroll 16")
#else
#define DMS_CPU_UNROLL
#endif

// The fragments warn about nothing in their own code, but keep GCC/Clang quiet about vector
// extensions under -Wpedantic and about ABI notes of wide vectors passed between inlined helpers.
#if defined(__GNUC__)
#define DMS_CPU_DIAGNOSTICS_BEGIN \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wpsabi\"")
#define DMS_CPU_DIAGNOSTICS_END _Pragma("GCC diagnostic pop")
#else
#define DMS_CPU_DIAGNOSTICS_BEGIN
#define DMS_CPU_DIAGNOSTICS_END
#endif
