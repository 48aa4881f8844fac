// SPDX-License-Identifier: Apache-2.0
#pragma once

// The decode kernel of the CPU fast path, for one work item of the split-K plan: the G query
// heads of one row's group attend to a run of that row's pages, in one pass over their K/V. One
// call may walk several items block by block in turn (decode_chunks; see decode_plan.hpp).
//
// Per block of up to 16 live keys (holes skipped; bf16/fp16 widened in registers, never copied):
//   QK  s[g][j] = q_g . k_j           two keys at a time; one load of a key feeds every head of
//                                     the tile, one load of a query chunk both keys
//   softmax  running max m_g, sum l_g (online: earlier output shrinks by exp(m_old - m_new))
//   PV  acc_g += exp(s[g][j] - m_g) v_j   chunk by chunk of 2 * width channels: a chunk's
//                                     accumulators stay in registers while every key of the
//                                     block adds to them
// While a block is computed, the next one's keys (during QK) and values (during PV) are
// prefetched, a row for every row consumed.
// The item's (m, l, acc) is merged with the row's other items by decode_plan.hpp, in chunk order,
// so the result never depends on which thread ran which item. Each key's logits can be kept for
// the policies that fold probabilities into scores (TOVA, H2O) once the row's lse is known.
//
// The kernel is written once (decode_kernel.inl) and compiled for every SIMD level in that
// level's namespace and target region, with a walk for head_dim 64 and 128 besides the one for
// any head_dim; decode_kernels_for() picks the level at run time.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include "dms/cache_view.hpp"
#include "dms/config.hpp"
#include "dms/cpu/simd/avx2.hpp"
#include "dms/cpu/simd/avx512.hpp"
#include "dms/cpu/simd/level.hpp"
#include "dms/cpu/simd/scalar.hpp"
#include "dms/cpu/simd/target.hpp"
#include "dms/cpu/simd/vec128.hpp"
#include "dms/numeric.hpp"

DMS_NAMESPACE_BEGIN
namespace cpu::detail {

/// Work items one call of the kernel may walk in turn (decode_chunks; the plan groups rows whose
/// pages interleave in the pool). 8 is the KV heads of a sequence in common models: at bf16, 16
/// slots and head_dim 128, one 32 KiB run of K and one of V per page step.
inline constexpr int decode_max_lockstep = 8;

/// Everything one work item reads and writes. Plain pointers into the plan's workspace.
template <class T>
struct decode_chunk_args {
  cache_view<const T> view;
  int row;                    // cache row
  int length;                 // slots spanned by the row
  const std::int32_t* pages;  // [num_pages] logical pages to read, ascending; null: first_page + i
  int first_page;
  int num_pages;
  int group;            // G: query heads of the row's group
  int dpad;             // head_dim rounded up to whole chunks of 2 * width channels
  const float* q;       // [G][dpad] the group's queries, scaled, in the level's chunk layout
  float* acc;           // [G][dpad] out: sum of exp(s - m) v, same layout
  float* m;             // [G] out: max logit (-inf when no key was read)
  float* l;             // [G] out: sum of exp(s - m)
  float* logits;        // [G][cap] out: every key's logits in read order, or null
  std::int32_t* slots;  // [cap] out: every key's slot in read order, or null
  int cap;              // keys logits and slots can hold (the item's slot span)
  int* count;           // out: keys read (live slots)
};

}  // namespace cpu::detail
DMS_NAMESPACE_END

DMS_CPU_DIAGNOSTICS_BEGIN

DMS_NAMESPACE_BEGIN
namespace cpu::simd::scalar {
#include "dms/cpu/decode_kernel.inl"
}  // namespace cpu::simd::scalar
DMS_NAMESPACE_END

#if DMS_CPU_HAS_VECTOR_EXTENSIONS
DMS_NAMESPACE_BEGIN
namespace cpu::simd::vec128 {
#include "dms/cpu/decode_kernel.inl"
}  // namespace cpu::simd::vec128
DMS_NAMESPACE_END
#endif

#if DMS_CPU_HAS_X86_TARGETS
DMS_CPU_TARGET_AVX2_BEGIN
DMS_NAMESPACE_BEGIN
namespace cpu::simd::avx2 {
#include "dms/cpu/decode_kernel.inl"
}  // namespace cpu::simd::avx2
DMS_NAMESPACE_END
DMS_CPU_TARGET_END

DMS_CPU_TARGET_AVX512_BEGIN
DMS_NAMESPACE_BEGIN
namespace cpu::simd::avx512 {
#include "dms/cpu/decode_kernel.inl"
}  // namespace cpu::simd::avx512
DMS_NAMESPACE_END
DMS_CPU_TARGET_END
#endif

DMS_CPU_DIAGNOSTICS_END

DMS_NAMESPACE_BEGIN
namespace cpu::detail {

/// The kernels of one level for storage type T.
template <class T>
struct decode_kernels {
  /// n in [1, decode_max_lockstep] work items, block by block in turn; each item's result is
  /// the same as when it is walked alone.
  void (*chunks)(const decode_chunk_args<T>*, int) noexcept;
  void (*group_probability)(const float*, int, int, int, const float*, float*) noexcept;
  void (*head_probability)(const float*, int, float, float*) noexcept;
  int width;
  /// Index in a chunk's layout of channel e of the chunk (0 <= e < 2 * width).
  int (*lane)(int);
};

template <class T>
decode_kernels<T> decode_kernels_for(simd_level level) {
  switch (level) {
#if DMS_CPU_HAS_X86_TARGETS
    case simd_level::avx512:
      return {&simd::avx512::decode_chunks<T>, &simd::avx512::group_probability,
              &simd::avx512::head_probability, simd::avx512::width, &simd::avx512::pair_lane<T>};
    case simd_level::avx2:
      return {&simd::avx2::decode_chunks<T>, &simd::avx2::group_probability,
              &simd::avx2::head_probability, simd::avx2::width, &simd::avx2::pair_lane<T>};
#endif
#if DMS_CPU_HAS_VECTOR_EXTENSIONS
    case simd_level::vec128:
      return {&simd::vec128::decode_chunks<T>, &simd::vec128::group_probability,
              &simd::vec128::head_probability, simd::vec128::width, &simd::vec128::pair_lane<T>};
#endif
    default:
      return {&simd::scalar::decode_chunks<T>, &simd::scalar::group_probability,
              &simd::scalar::head_probability, simd::scalar::width, &simd::scalar::pair_lane<T>};
  }
}

}  // namespace cpu::detail
DMS_NAMESPACE_END
