// SPDX-License-Identifier: Apache-2.0
#pragma once

// The policy interface: a small CRTP base. A policy decides, per row, which slot a new token may
// reuse (before it is appended) and which slots to drop once attention has run. The cache calls
// the hooks through policy<Derived>; the base supplies defaults for the optional ones.
//
//  Hook (* = required)                               | Called                         | Default
//  --------------------------------------------------|--------------------------------|----------------
//* const char* name() const                          | reports                        | -
//* int choose_victim(const Row&, const token_info&)  | before each append; const; the | -
//      const -> slot to overwrite, or -1             | cache checks capacity first    |
//* void after_attention(Seq&)                        | after each decode step's       | -
//                                                    | attention (finish_step)        |
//  using row_state = ...; void init_row(row_state&)  | per row, on add_sequence       | empty
//  state;
//                                                    | (required with a row_state)    |
//                                                    static_assert
//  void on_append(Row&, const token_info&, int slot) | after a token lands in a slot  | nothing
//  void on_evict(Row&, int slot)                     | before any eviction (policy's, | nothing
//                                                    | user's, an append's victim)    |
//  score_update score_for_query(int query_position,  | by attention, per query, to    | none
//      int prompt_end) const                         | fold probabilities into scores |
//  void on_slot_moved(Row&, int from, int to)        | when compaction moves a slot   | nothing
//  void compress_prompt(Seq&)                        | once, after the prompt's last  | nothing
//                                                    | prefill chunk                  |
//  void select_pages(const Row&, const float* q,     | by decode attention: the pages | all pages
//      int G, int head_dim, std::vector<int>& pages) | to read (q is [G][head_dim]);  |
//      const; static constexpr bool selects_pages    | ascending logical page ids     |
//  static constexpr bool keeps_scores                | allocates per-slot scores      | false
//  static constexpr bool needs_page_bounds           | keeps per-page key min/max     | false
//  static constexpr bool uses_decision_logits        | append requires one logit per  | false
//                                                    | KV head; prefill applies the   |
//                                                    | delayed-eviction rule          |
//  void check_config(const cache_config&) const      | by the cache's constructor:    | nothing
//                                                    | throw if the policy's          |
//                                                    | parameters cannot fit          |
//  static constexpr bool hooks_never_throw           | promises the hooks never throw | false
//                                                    | (the cache then skips the undo |
//                                                    | log; library policies set it)  |
//
// Row is a handle with length(), live(), tokens_seen(), num_pages(), page_size(), head_dim(),
// position(slot), score(slot), key(slot), value(slot) (spans of the storage type, dms::to_float
// converts), page_min/max(page), state(), evict(slot), compact(); Seq has num_rows() and
// row(kv_head). Slot and page arguments are checked. Policies with uses_decision_logits also
// provide window() and flagged(const row_state&, position, tokens_seen) for the prefill
// visibility rule. A missing required hook fails to compile with a static_assert that names it
// (see check_policy_hooks below).
//
// Exceptions: if a hook throws (after_attention, compress_prompt, on_append, on_evict,
// on_slot_moved, init_row), the call that ran it restores the cache -- slots, K/V, holes, pages,
// counters and the row state of every row the hook touched -- before the exception propagates.

#include <concepts>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "dms/config.hpp"

DMS_NAMESPACE_BEGIN

/// What the cache tells a policy about the token being appended.
struct token_info {
  std::int32_t position;  // token index within the sequence (0-based)
  float decision_logit;   // this token's eviction logit for the row (DMS); 0 when unused
  bool in_prompt;         // appended by prefill rather than by a decode step
};

/// How an attention pass folds one query's probabilities (summed over the G heads of the group)
/// into a slot's score. Written once here so the CPU reference and the kernels agree.
enum class score_update : std::uint8_t { none, add, assign };

/// A policy's per-row state when it needs none.
struct no_row_state {};

namespace detail {

// Archetypes: the smallest handles a policy's hooks may rely on. The hook checks below call the
// hooks with these, so a policy that uses anything beyond the documented handle API fails here,
// close to its definition, rather than deep inside the cache.
template <class State>
struct row_archetype {
  int length() const;
  int live() const;
  std::int32_t tokens_seen() const;
  std::int32_t position(int slot) const;
  float score(int slot) const;
  State& state() const;
  void evict(int slot) const;
  void compact() const;
};
template <class State>
struct seq_archetype {
  int num_rows() const;
  row_archetype<State>& row(int kv_head) const;
};

template <class P>
using row_state_of = typename P::row_state;

template <class P>
concept has_name = requires(const P& p) {
  { p.name() } -> std::convertible_to<const char*>;
};
template <class P>
concept has_choose_victim = requires(const P& p, const row_archetype<row_state_of<P>>& row,
                                     const token_info& t) {
  { p.choose_victim(row, t) } -> std::convertible_to<int>;
};
template <class P>
concept has_after_attention = requires(P& p, seq_archetype<row_state_of<P>>& seq) {
  p.after_attention(seq);
};

}  // namespace detail

/// All three required hooks present.
template <class P>
concept eviction_policy =
    detail::has_name<P> && detail::has_choose_victim<P> && detail::has_after_attention<P>;

/// CRTP base. Derive as `struct my_policy : dms::policy<my_policy> { ... };`.
template <class Derived>
struct policy {
  using row_state = no_row_state;
  static constexpr bool keeps_scores = false;
  static constexpr bool needs_page_bounds = false;
  static constexpr bool uses_decision_logits = false;
  static constexpr bool hooks_never_throw = false;

  /// A policy that declares its own row_state must say how a new row starts.
  template <class State>
  void init_row(State&) const {
    static_assert(std::is_same_v<State, no_row_state>,
                  "dms policy: a policy that declares `row_state` must define the hook "
                  "`void init_row(row_state&) const` (called for every row of a new sequence)");
  }
  template <class Row>
  void on_append(Row&, const token_info&, int) const {}
  template <class Row>
  void on_evict(Row&, int) const {}
  template <class Config>
  void check_config(const Config&) const {}
  constexpr score_update score_for_query(int, int) const { return score_update::none; }
  template <class Row>
  void on_slot_moved(Row&, int, int) const {}
  template <class Seq>
  void compress_prompt(Seq&) const {}
  /// Default: read every page of the row.
  template <class Row>
  void select_pages(const Row& row, const float*, int, int, std::vector<int>& pages) const {
    pages.clear();
    const int n = row.num_pages();
    for (int p = 0; p < n; ++p) pages.push_back(p);
  }
  static constexpr bool selects_pages = false;

  /// The derived policy, with its contract checked where the type is complete.
  Derived& derived() {
    check_policy_hooks();
    return static_cast<Derived&>(*this);
  }
  const Derived& derived() const {
    check_policy_hooks();
    return static_cast<const Derived&>(*this);
  }

 private:
  static constexpr void check_policy_hooks() {
    static_assert(std::is_base_of_v<policy<Derived>, Derived>,
                  "dms policy: Derived must inherit dms::policy<Derived>");
    static_assert(detail::has_name<Derived>,
                  "dms policy: missing required hook `const char* name() const`");
    static_assert(detail::has_choose_victim<Derived>,
                  "dms policy: missing required hook `int choose_victim(const Row&, const "
                  "token_info&) const` (return -1 to take a fresh slot)");
    static_assert(detail::has_after_attention<Derived>,
                  "dms policy: missing required hook `void after_attention(Seq&)` (may be empty)");
  }
};

DMS_NAMESPACE_END
