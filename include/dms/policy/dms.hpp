// SPDX-License-Identifier: Apache-2.0
#pragma once

// DMS — Dynamic Memory Sparsification: learned, delayed eviction (spec: "DMS").
//
// Per row, the decision logit l[t] carried by token t flags token t-1 (evict = l > 0). A flagged
// token stays visible to its own query and the next `window` queries, then its slot is reused by
// the token that arrives w+1 positions later. The row keeps a ring of the last w+1 (slot, flag)
// entries, so memory per row is (unflagged tokens older than the window) + (at most w+1 recent).
//
// Choices where the spec leaves one open:
//  * Non-finite logits: the host cache rejects them with dms::error before touching anything;
//    device code, which cannot throw, treats them as "keep" (NaN > 0 is false).
//  * The logit of a sequence's first token applies to nothing; the newest token is "keep" until
//    the next one arrives.
//  * A user eviction (row.evict(slot) outside the policy) drops the token at once: the ring
//    forgets its slot and flag (on_evict), so no later token reuses the hole through the ring
//    (the cache refills it like any hole) and the row keeps working.
//  * The window w is the checkpoint's `dms_window_size` (NVIDIA's inference code builds its cache
//    with w + 1 and tests t - j < w + 1: the same rule). A row must hold w + 1 slots, so the cache
//    rejects a window with w + 1 > cache_config.max_row_slots.

#include <cstdint>
#include <vector>

#include "dms/cache_config.hpp"
#include "dms/config.hpp"
#include "dms/error.hpp"
#include "dms/policy/device_policy.hpp"
#include "dms/policy/policy.hpp"

DMS_NAMESPACE_BEGIN

/// The DMS rules, written once for the CPU path and the kernels.
namespace dms_rule {

/// sigmoid(l) > 0.5. False for NaN, so a corrupt logit keeps its token.
DMS_HOST_DEVICE bool evicts(float logit) {
  return logit > 0.0f;
}

/// Spec rule 4: key j is visible to query t (j <= t) iff it is unflagged or t - j <= window.
DMS_HOST_DEVICE bool visible(bool flagged, std::int32_t key_position, std::int32_t query_position,
                             std::int32_t window) {
  return !flagged || query_position - key_position <= window;
}

/// The slot token t may overwrite: that of token t-w-1 if it is flagged, else -1. With w = 0 that
/// token is t-1, whose flag is t's own logit, not yet in the ring.
DMS_HOST_DEVICE int victim(const std::int32_t* ring_slot, const std::uint8_t* ring_flag,
                           std::int32_t t, std::int32_t window, float logit) {
  if (t < window + 1) return -1;
  const std::int32_t i = (t - window - 1) % (window + 1);
  const bool flagged = window == 0 ? evicts(logit) : ring_flag[i] != 0;
  return flagged ? ring_slot[i] : -1;
}

/// Records token t in `slot`: its logit flags token t-1 (the shift rule), t itself starts
/// unflagged.
DMS_HOST_DEVICE void record(std::int32_t* ring_slot, std::uint8_t* ring_flag, std::int32_t t,
                            std::int32_t window, float logit, std::int32_t slot) {
  if (t > 0) ring_flag[(t - 1) % (window + 1)] = evicts(logit) ? 1 : 0;
  ring_slot[t % (window + 1)] = slot;
  ring_flag[t % (window + 1)] = 0;
}

/// Flag of the cached token at `position` in a row that has seen `seen` tokens. Tokens older than
/// the ring are survivors (a flagged one would have been overwritten); the newest is unknown (0).
DMS_HOST_DEVICE bool flagged(const std::uint8_t* ring_flag, std::int32_t position,
                             std::int32_t seen, std::int32_t window) {
  if (position >= seen - 1 || position < seen - (window + 1)) return false;
  return ring_flag[position % (window + 1)] != 0;
}

}  // namespace dms_rule

/// Device form (dms/policy/device_policy.hpp): the same ring, one row per thread.
struct dms_device_policy : device_policy_base {
  std::int32_t window;
  static constexpr bool ring_flags = true;
  DMS_HOST_DEVICE int ring_length() const { return window + 1; }
  DMS_HOST_DEVICE int choose_victim(const row_context& row, const token_info& tok) const {
    return dms_rule::victim(row.ring_slot, row.ring_flag, tok.position, window, tok.decision_logit);
  }
  DMS_HOST_DEVICE void on_append(const row_context& row, const token_info& tok, int slot) const {
    dms_rule::record(row.ring_slot, row.ring_flag, tok.position, window, tok.decision_logit, slot);
  }
};

struct dms_params {
  /// Sliding window w: a flagged token stays visible for w more queries (512 in Qwen3-8B-DMS-8x).
  int window = 512;
};

struct dms_policy : policy<dms_policy> {
  struct row_state {
    std::vector<std::int32_t> ring_slot;  // [window + 1] slot of token p at p % (window + 1)
    std::vector<std::uint8_t> ring_flag;  // [window + 1] its eviction flag
  };
  static constexpr bool uses_decision_logits = true;
  static constexpr bool hooks_never_throw = true;

  dms_policy() : dms_policy(dms_params{}) {}
  explicit dms_policy(dms_params p) : params_(p) {
    detail::check_range("dms_params.window", p.window, 0, (1 << 30) - 1);
  }

  const char* name() const { return "DMS"; }
  [[nodiscard]] int window() const { return params_.window; }

  void init_row(row_state& s) const {
    s.ring_slot.assign(std::size_t(params_.window) + 1, -1);
    s.ring_flag.assign(std::size_t(params_.window) + 1, 0);
  }
  template <class Row>
  int choose_victim(const Row& row, const token_info& tok) const {
    const auto& s = row.state();
    return dms_rule::victim(s.ring_slot.data(), s.ring_flag.data(), tok.position, params_.window,
                            tok.decision_logit);
  }
  template <class Row>
  void on_append(Row& row, const token_info& tok, int slot) const {
    auto& s = row.state();
    dms_rule::record(s.ring_slot.data(), s.ring_flag.data(), tok.position, params_.window,
                     tok.decision_logit, slot);
  }
  template <class Seq>
  void after_attention(Seq&) const {}  // eviction is decided at append time, by the shift rule

  /// Forgets an evicted token's ring entry (see the choices above). For an append's own victim
  /// the entry is rewritten by on_append right after.
  template <class Row>
  void on_evict(Row& row, int slot) const {
    const std::int32_t p = row.position(slot), w1 = params_.window + 1;
    if (p < row.tokens_seen() - w1) return;
    auto& s = row.state();
    if (s.ring_slot[std::size_t(p % w1)] == slot) {
      s.ring_slot[std::size_t(p % w1)] = -1;
      s.ring_flag[std::size_t(p % w1)] = 0;
    }
  }
  /// Whether the ring still holds the slot of the cached token at `position` (false once a user
  /// eviction took it): prefill's capacity check counts a reuse only then.
  [[nodiscard]] bool holds_slot(const row_state& s, std::int32_t position) const {
    return s.ring_slot[std::size_t(position % (params_.window + 1))] >= 0;
  }
  void check_config(const cache_config& cfg) const {
    if (std::int64_t{params_.window} + 1 > cfg.max_row_slots)
      detail::fail("dms_params.window = ", params_.window,
                   " needs window + 1 = ", std::int64_t{params_.window} + 1,
                   " slots per row, more than cache_config.max_row_slots = ", cfg.max_row_slots,
                   " (valid: window in [0, max_row_slots - 1])");
  }

  [[nodiscard]] dms_device_policy device_form() const { return {{}, params_.window}; }
  void pack_row_state(const row_state& s, std::int32_t* slot, std::uint8_t* flag) const {
    for (std::size_t i = 0; i < s.ring_slot.size(); ++i) slot[i] = s.ring_slot[i];
    for (std::size_t i = 0; i < s.ring_flag.size(); ++i) flag[i] = s.ring_flag[i];
  }
  void unpack_row_state(row_state& s, const std::int32_t* slot, const std::uint8_t* flag) const {
    init_row(s);
    for (std::size_t i = 0; i < s.ring_slot.size(); ++i) s.ring_slot[i] = slot[i];
    for (std::size_t i = 0; i < s.ring_flag.size(); ++i) s.ring_flag[i] = flag[i];
  }

  /// Prefill asks this for keys already in the cache (the chunk's own flags come from its logits).
  [[nodiscard]] bool flagged(const row_state& s, std::int32_t position, std::int32_t seen) const {
    return dms_rule::flagged(s.ring_flag.data(), position, seen, params_.window);
  }
  template <class Row>
  void on_slot_moved(Row& row, int from, int to) const {
    auto& s = row.state();
    const std::int32_t p = row.position(to), seen = row.tokens_seen();
    if (p >= seen - (params_.window + 1) && s.ring_slot[p % (params_.window + 1)] == from)
      s.ring_slot[p % (params_.window + 1)] = to;
  }

 private:
  dms_params params_;
};

DMS_NAMESPACE_END
