// SPDX-License-Identifier: Apache-2.0
#pragma once

// The device form of a policy: a small, trivially copyable value whose hooks are DMS_HOST_DEVICE,
// so one definition runs in the CUDA bookkeeping kernels (one thread per row) and in the serial
// CPU execution of the same algorithm (dms/step/batch_step.hpp) that the tests compare against
// the host cache. A host policy opts into the device path with
//
//   DevicePolicy device_form() const;                   // its parameters, by value
//   void pack_row_state(const row_state&, std::int32_t* ring_slot, std::uint8_t* ring_flag) const;
//   void unpack_row_state(row_state&, const std::int32_t*, const std::uint8_t*) const;
//
// (the last two only if its row_state is not empty). Device hooks, all optional but the first:
//
//  Hook                                                  | Default
//  ------------------------------------------------------|-------------------------------------
//  int choose_victim(const row_context&, const token_info&) | required: slot to overwrite or -1
//  void on_append(const row_context&, const token_info&, int slot) | nothing
//  int ring_length() const; static constexpr bool ring_flags | 0, false: no per-row ring
//  static constexpr bool evicts_by_score                 | false
//  int budget() const; std::int32_t protected_from(seen) | after attention, while live > budget,
//                                                        | evict the lowest-score slot among
//                                                        | positions < protected_from(seen)
//  static constexpr score_update decode_score            | none: how decode folds probabilities
//  static constexpr bool keeps_scores, needs_page_bounds,| false
//      selects_pages; int page_budget(page_size) const   | (Quest)
//
// Prompt compression (the device form of compress_prompt; dms/step/prompt_compression.hpp):
//
//  score_update prompt_score(query_position, prompt_end) | none: how prefill folds a prompt
//      const                                             | query's probabilities into scores
//  static constexpr prompt_reduction reduces_prompt      | none: finish_prompt does nothing
//  bool prompt_candidate(position, seen) const           | -: the live tokens it may evict
//  int prompt_evictions(live, candidates) const          | -: how many, the lowest (score,
//                                                        | position) first; < 0 leaves the row
//                                                        | untouched (not even compacted)
//  int pool_kernel() const; bool pool_max() const        | (SnapKV) 1-D pooling of the scores
//  void on_slot_moved(const row_context&, position, to)  | nothing: compaction moved a token

#include <cstdint>
#include <type_traits>

#include "dms/config.hpp"
#include "dms/policy/policy.hpp"

DMS_NAMESPACE_BEGIN

/// What a device policy hook sees of one row. ring_* point at the row's own ring (null if the
/// policy keeps none).
struct row_context {
  std::int32_t length;      // slots spanned
  std::int32_t live;        // slots holding a token
  std::int32_t seen;        // tokens appended so far (the new token's position, in choose_victim)
  std::int32_t* ring_slot;  // [ring_length]
  std::uint8_t* ring_flag;  // [ring_length], only if ring_flags
};

/// How a device policy reduces a finished prompt. The candidates (prompt_candidate) of a row are
/// ranked by (score, position), lowest first (evicts_before), and the first prompt_evictions of
/// them are evicted; then the row is compacted.
///   by_score:        the slot's score (0 if the cache keeps none);
///   by_pooled_score: the candidates' scores in position order, pooled over pool_kernel()
///                    neighbours (max, or average with divisor pool_kernel()): SnapKV.
enum class prompt_reduction : std::uint8_t { none, by_score, by_pooled_score };

/// Defaults for the optional device hooks. Derive and shadow what the policy needs.
struct device_policy_base {
  static constexpr bool ring_flags = false;
  static constexpr bool evicts_by_score = false;
  static constexpr bool keeps_scores = false;
  static constexpr bool needs_page_bounds = false;
  static constexpr bool selects_pages = false;
  static constexpr score_update decode_score = score_update::none;
  static constexpr prompt_reduction reduces_prompt = prompt_reduction::none;

  DMS_HOST_DEVICE int ring_length() const { return 0; }
  DMS_HOST_DEVICE void on_append(const row_context&, const token_info&, int) const {}
  DMS_HOST_DEVICE int budget() const { return 0x7fffffff; }
  DMS_HOST_DEVICE std::int32_t protected_from(std::int32_t seen) const { return seen; }
  DMS_HOST_DEVICE int page_budget(int) const { return 0x7fffffff; }
  DMS_HOST_DEVICE score_update prompt_score(std::int32_t, std::int32_t) const {
    return score_update::none;
  }
  DMS_HOST_DEVICE bool prompt_candidate(std::int32_t, std::int32_t) const { return false; }
  DMS_HOST_DEVICE int prompt_evictions(int, int) const { return -1; }
  DMS_HOST_DEVICE int pool_kernel() const { return 1; }
  DMS_HOST_DEVICE bool pool_max() const { return true; }
  DMS_HOST_DEVICE void on_slot_moved(const row_context&, std::int32_t, int) const {}
};

/// A host policy that has a device form.
template <class P>
concept has_device_form = requires(const P& p) {
  {p.device_form()};
  requires std::is_trivially_copyable_v<decltype(p.device_form())>;
};

template <class P>
using device_form_t = decltype(std::declval<const P&>().device_form());

DMS_NAMESPACE_END
