// SPDX-License-Identifier: Apache-2.0
#pragma once

// StreamingLLM — attention sinks + recent window (spec: "StreamingLLM"). A row keeps its first
// `sinks` tokens and its `recent` newest ones. In decode the token that falls out of the window
// is overwritten by the new one, so the query at position t attends to the sinks and tokens
// t-recent+1 .. t. Keys are stored after RoPE, so nothing is re-rotated.
//
// Choice: the prompt is attended densely (like the other training-free policies) and reduced to
// sinks + recent once, at finish_prompt; this keeps chunked prefill identical to one-shot.

#include <cstdint>
#include <vector>

#include "dms/cache_config.hpp"
#include "dms/config.hpp"
#include "dms/error.hpp"
#include "dms/policy/device_policy.hpp"
#include "dms/policy/policy.hpp"

DMS_NAMESPACE_BEGIN

namespace streaming_rule {

/// Ring index of a non-sink position (position >= sinks): a ring of `recent` slots.
DMS_HOST_DEVICE std::int32_t ring_index(std::int32_t position, std::int32_t sinks,
                                        std::int32_t recent) {
  return (position - sinks) % recent;
}

/// Decode: token t overwrites token t - recent once that one is a non-sink token, unless it is
/// gone already (its ring entry is -1 after a user eviction; the row is then one under budget and
/// token t simply takes a slot).
DMS_HOST_DEVICE int victim(const std::int32_t* ring_slot, std::int32_t t, std::int32_t sinks,
                           std::int32_t recent) {
  if (t - recent < sinks) return -1;
  return ring_slot[ring_index(t, sinks, recent)];
}

}  // namespace streaming_rule

/// Device form: decode's ring of `recent` slots (the prompt is reduced by compress_prompt).
struct streaming_device_policy : device_policy_base {
  std::int32_t sinks;
  std::int32_t recent;
  DMS_HOST_DEVICE int ring_length() const { return recent; }
  DMS_HOST_DEVICE int choose_victim(const row_context& row, const token_info& tok) const {
    if (tok.in_prompt) return -1;
    return streaming_rule::victim(row.ring_slot, tok.position, sinks, recent);
  }
  DMS_HOST_DEVICE void on_append(const row_context& row, const token_info& tok, int slot) const {
    if (tok.position >= sinks)
      row.ring_slot[streaming_rule::ring_index(tok.position, sinks, recent)] = slot;
  }
  // Prompt: everything between the sinks and the `recent` newest goes.
  static constexpr prompt_reduction reduces_prompt = prompt_reduction::by_score;
  DMS_HOST_DEVICE bool prompt_candidate(std::int32_t position, std::int32_t seen) const {
    return position >= sinks && position < seen - recent;
  }
  DMS_HOST_DEVICE int prompt_evictions(int, int candidates) const { return candidates; }
  DMS_HOST_DEVICE void on_slot_moved(const row_context& row, std::int32_t position, int to) const {
    if (position >= sinks && position >= row.seen - recent)
      row.ring_slot[streaming_rule::ring_index(position, sinks, recent)] = to;
  }
};

struct streaming_params {
  int sinks = 4;
  int recent = 508;
};

struct streaming_llm_policy : policy<streaming_llm_policy> {
  static constexpr bool hooks_never_throw = true;
  struct row_state {
    std::vector<std::int32_t>
        ring_slot;  // [recent] slot of non-sink token p at (p - sinks) % recent
  };

  streaming_llm_policy() : streaming_llm_policy(streaming_params{}) {}
  explicit streaming_llm_policy(streaming_params p) : params_(p) {
    detail::check_range("streaming_params.sinks", p.sinks, 0, 1 << 30);
    detail::check_range("streaming_params.recent", p.recent, 1, 1 << 30);
  }
  const char* name() const { return "StreamingLLM"; }
  [[nodiscard]] const streaming_params& params() const { return params_; }
  [[nodiscard]] int budget() const { return params_.sinks + params_.recent; }

  void init_row(row_state& s) const { s.ring_slot.assign(std::size_t(params_.recent), -1); }

  template <class Row>
  int choose_victim(const Row& row, const token_info& tok) const {
    if (tok.in_prompt) return -1;
    return streaming_rule::victim(row.state().ring_slot.data(), tok.position, params_.sinks,
                                  params_.recent);
  }
  /// A user eviction: forget the token's ring entry (see streaming_rule::victim).
  template <class Row>
  void on_evict(Row& row, int slot) const {
    const std::int32_t p = row.position(slot);
    if (p < params_.sinks) return;
    auto& ring = row.state().ring_slot;
    const auto i = std::size_t(streaming_rule::ring_index(p, params_.sinks, params_.recent));
    if (ring[i] == slot) ring[i] = -1;
  }
  void check_config(const cache_config& cfg) const {
    if (std::int64_t{params_.sinks} + params_.recent > cfg.max_row_slots)
      detail::fail("streaming_params: sinks + recent = ", params_.sinks, " + ", params_.recent,
                   " slots per row is more than cache_config.max_row_slots = ", cfg.max_row_slots);
  }
  template <class Row>
  void on_append(Row& row, const token_info& tok, int slot) const {
    if (tok.position >= params_.sinks)
      row.state()
          .ring_slot[streaming_rule::ring_index(tok.position, params_.sinks, params_.recent)] =
          slot;
  }
  template <class Row>
  void on_slot_moved(Row& row, int, int to) const {
    const std::int32_t p = row.position(to);
    if (p >= params_.sinks && p >= row.tokens_seen() - params_.recent)
      row.state().ring_slot[streaming_rule::ring_index(p, params_.sinks, params_.recent)] = to;
  }
  template <class Seq>
  void after_attention(Seq&) const {}  // eviction happens when the next token arrives

  [[nodiscard]] streaming_device_policy device_form() const {
    return {{}, params_.sinks, params_.recent};
  }
  void pack_row_state(const row_state& s, std::int32_t* slot, std::uint8_t*) const {
    for (std::size_t i = 0; i < s.ring_slot.size(); ++i) slot[i] = s.ring_slot[i];
  }
  void unpack_row_state(row_state& s, const std::int32_t* slot, const std::uint8_t*) const {
    init_row(s);
    for (std::size_t i = 0; i < s.ring_slot.size(); ++i) s.ring_slot[i] = slot[i];
  }

  template <class Seq>
  void compress_prompt(Seq& seq) const {
    for (int h = 0; h < seq.num_rows(); ++h) {
      auto& row = seq.row(h);
      const std::int32_t recent_from = row.tokens_seen() - params_.recent;
      for (int s = 0; s < row.length(); ++s) {
        const std::int32_t p = row.position(s);
        if (p >= params_.sinks && p < recent_from) row.evict(s);
      }
      row.compact();
    }
  }

 private:
  streaming_params params_;
};

DMS_NAMESPACE_END
