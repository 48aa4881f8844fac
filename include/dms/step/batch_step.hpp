// SPDX-License-Identifier: Apache-2.0
#pragma once

// The bookkeeping of one batched decode step, written once as DMS_HOST_DEVICE per-row functions:
// the CUDA kernels (dms/cuda/bookkeeping.cuh) run them one thread per row, and the serial
// drivers at the bottom of this file run them in a loop on a cache_image. The tests check the
// serial drivers against paged_cache (same slots, same pages, same evictions), which pins the
// algorithm the kernels execute.
//
// A batch is a list of sequence ids; row i of the batch is (seq_ids[i / H], kv head i % H). The
// new token's K and V are [batch][H][head_dim], its decision logits [batch][H] (may be null).
//
// Append, in three phases so that a step that cannot complete changes nothing:
//   plan    per row: the policy's victim, whether a fresh page is needed, errors   (read-only)
//   check   pages needed (an exclusive scan gives each row its page) <= free pages, no errors
//   commit  per row: evict the victim, take a hole or grow (popping the page free stack in row
//           order), write position/score, counters, policy.on_append; then per (row, channel):
//           write K/V and widen Quest's page bounds.

#include <cstdint>
#include <span>
#include <vector>

#include "dms/config.hpp"
#include "dms/numeric.hpp"
#include "dms/policy/device_policy.hpp"
#include "dms/policy/ranking.hpp"
#include "dms/step/cache_state.hpp"

DMS_NAMESPACE_BEGIN
namespace step {

/// Phase 1's verdict for one row.
struct row_plan {
  std::int32_t victim;  // slot the policy overwrites, or -1
  std::int32_t fresh;   // 1 if the row needs a new page
  step_status error;    // ok, or why the step cannot run
};

/// Where phase 3 put the new token of a row.
struct row_slot {
  std::int32_t slot;   // slot written
  std::int32_t fresh;  // 1 if it opened a new page (Quest resets the page's bounds)
};

DMS_HOST_DEVICE bool valid_sequence(const std::uint8_t* active, int max_sequences, int seq) {
  return seq >= 0 && seq < max_sequences && active[seq] != 0;
}

/// Duplicate sequence ids in one batch: the first occurrence (lowest batch index) is the entry
/// that counts, and every later one fails with duplicate_sequence. first_entry[seq] holds the
/// lowest batch index of each valid id in the batch (no_entry for the others). A minimum is the
/// same whatever order the updates come in, so the kernel can take it with atomicMin from many
/// threads and still flag exactly the entries that the serial driver flags: which duplicate
/// fails, and so which error a step records, cannot depend on thread scheduling.
inline constexpr std::int32_t no_entry = 0x7fffffff;

/// first_entry[seq] = min(first_entry[seq], b) for a valid id (the serial form of the kernel's
/// atomicMin). Invalid ids are skipped: their entries fail with bad_sequence anyway.
DMS_HOST_DEVICE void note_entry(std::int32_t* first_entry, const std::uint8_t* active,
                                int max_sequences, int seq, int b) {
  if (valid_sequence(active, max_sequences, seq) && b < first_entry[seq]) first_entry[seq] = b;
}

/// Flags batch entry b as a duplicate if an earlier entry holds the same id. Only the entry's
/// first row (kv head 0) carries the error, and only if its plan had none: plan_append reads the
/// cache alone, so every entry of one id gets the same plan, and when that plan fails, its
/// first entry fails first in row order anyway.
DMS_HOST_DEVICE void flag_duplicate(row_plan& plan, const std::int32_t* first_entry, int seq, int b,
                                    int kv_head) {
  if (kv_head == 0 && plan.error == step_status::ok && first_entry[seq] < b)
    plan.error = step_status::duplicate_sequence;
}

/// Phase 1 for one row: what the policy wants and what the row needs. Reads only.
template <class T, class DevicePolicy>
DMS_HOST_DEVICE row_plan plan_append(const cache_state<T>& st, const DevicePolicy& policy, int seq,
                                     int kv_head, float logit, bool in_prompt) {
  if (!valid_sequence(st.active, st.max_sequences, seq)) return {-1, 0, step_status::bad_sequence};
  const int row = seq * st.num_kv_heads + kv_head;
  const row_context ctx = st.context(row);
  const token_info tok{ctx.seen, logit, in_prompt};
  const int victim = policy.choose_victim(ctx, tok);
  if (victim != -1) {
    if (victim < 0 || victim >= ctx.length || st.position[st.slot_index(row, victim)] < 0)
      return {victim, 0, step_status::bad_victim};
    return {victim, 0, step_status::ok};
  }
  if (st.hole_head[row] >= 0) return {-1, 0, step_status::ok};
  if (ctx.length >= st.max_row_slots) return {-1, 0, step_status::row_full};
  return {-1, ctx.length % st.page_size == 0 ? 1 : 0, step_status::ok};
}

/// Phase 3 for one row. page_rank: this row's index among the rows that need a fresh page
/// (exclusive scan of plan.fresh in row order); the page comes from free_pages[free_top - 1 -
/// page_rank], and the caller lowers free_top by the total once every row has committed.
template <class T, class DevicePolicy>
DMS_HOST_DEVICE row_slot commit_append(const cache_state<T>& st, const DevicePolicy& policy,
                                       int seq, int kv_head, float logit, bool in_prompt,
                                       const row_plan& plan, int page_rank) {
  const int row = seq * st.num_kv_heads + kv_head;
  if (plan.victim >= 0) st.push_hole(row, plan.victim);
  int slot;
  if (st.hole_head[row] >= 0) {
    slot = st.pop_hole(row);
  } else {
    slot = st.row_length[row];
    if (plan.fresh)
      st.page_entry(row, slot / st.page_size) = st.free_pages[*st.free_top - 1 - page_rank];
    st.row_length[row] = slot + 1;
  }
  const std::int32_t position = st.seen[row];
  const std::int64_t at = st.slot_index(row, slot);
  st.position[at] = position;
  if (st.score) st.score[at] = 0.0f;
  st.seen[row] = position + 1;
  st.live[row] += 1;
  if (st.live[row] > st.peak[row]) st.peak[row] = st.live[row];
  policy.on_append(st.context(row), token_info{position, logit, in_prompt}, slot);
  return {slot, plan.fresh};
}

/// Phase 3, per (row, channel): stores the new K/V channel (rounded to T) and widens the page's
/// key bounds. Rows own disjoint pages and each channel has one writer, so this is race-free.
template <class T, class In>
DMS_HOST_DEVICE void write_channel(const cache_state<T>& st, int row, const row_slot& where,
                                   int channel, In k_in, In v_in) {
  const std::int64_t at = st.slot_index(row, where.slot) * st.head_dim + channel;
  const T kq = from_float<T>(to_float(k_in));
  st.k[at] = kq;
  st.v[at] = from_float<T>(to_float(v_in));
  if (st.page_min) {
    const std::int64_t b =
        std::int64_t{st.page_entry(row, where.slot / st.page_size)} * st.head_dim + channel;
    const float x = to_float(kq);
    if (where.fresh) {
      st.page_min[b] = x;
      st.page_max[b] = x;
    } else {
      st.page_min[b] = x < st.page_min[b] ? x : st.page_min[b];
      st.page_max[b] = x > st.page_max[b] ? x : st.page_max[b];
    }
  }
}

/// A row of a cache_state as detail::lowest_slot sees it (length and positions).
template <class T>
struct state_row {
  const cache_state<T>& st;
  int row;
  [[nodiscard]] int length() const { return st.row_length[row]; }
  [[nodiscard]] std::int32_t position(int slot) const {
    return st.position[st.slot_index(row, slot)];
  }
  [[nodiscard]] float score(int slot) const { return st.score[st.slot_index(row, slot)]; }
};

/// After attention, score-evicting policies (TOVA, H2O) shrink the row to their budget, lowest
/// (score, position) first among the unprotected positions: the host cache's rule
/// (detail::lowest_slot). The GPU runs the same comparison (evicts_before) as a block-wide
/// reduction (evict_by_score_kernel); the order is total, so both pick the same slot.
template <class T, class DevicePolicy>
void evict_row_by_score(const cache_state<T>& st, const DevicePolicy& policy, int row) {
  if constexpr (DevicePolicy::evicts_by_score) {
    const std::int32_t limit = policy.protected_from(st.seen[row]);
    const state_row<T> r{st, row};
    while (st.live[row] > policy.budget()) {
      const int victim = detail::lowest_slot(r, limit, [&](int s) { return r.score(s); });
      if (victim < 0) break;
      st.push_hole(row, victim);
    }
  } else {
    (void)st, (void)policy, (void)row;
  }
}

/// Frees every page of a sequence (pushed on the free stack in logical order per row, as the
/// host cache releases them), resets its rows and ring, and marks the id free. Out-of-range ids
/// are ignored.
template <class T>
DMS_HOST_DEVICE void release_sequence(const cache_state<T>& st, int seq) {
  if (seq < 0 || seq >= st.max_sequences) return;
  for (int h = 0; h < st.num_kv_heads; ++h) {
    const int row = seq * st.num_kv_heads + h;
    const int pages = (st.row_length[row] + st.page_size - 1) / st.page_size;
    for (int p = 0; p < pages; ++p) {
      st.free_pages[(*st.free_top)++] = st.page_entry(row, p);
      st.page_entry(row, p) = -1;
    }
    st.row_length[row] = st.live[row] = st.seen[row] = st.peak[row] = 0;
    st.hole_head[row] = -1;
    const std::int64_t ring = std::int64_t{row} * st.ring_length;
    for (int j = 0; j < st.ring_length; ++j) {
      if (st.ring_slot) st.ring_slot[ring + j] = -1;
      if (st.ring_flag) st.ring_flag[ring + j] = 0;
    }
  }
  st.active[seq] = 0;
}

// ---- serial drivers: the same algorithm, one row at a time --------------------------------

/// Appends one token to every row of every sequence in seq_ids. Returns ok, or the first error
/// in row order (recorded in *st.status), in which case nothing changed. Does nothing and
/// returns the recorded status if an earlier step failed.
template <class T, class DevicePolicy, class In>
step_status append_batch(const cache_state<T>& st, const DevicePolicy& policy,
                         std::span<const std::int32_t> seq_ids, const In* k, const In* v,
                         const float* decision_logits, bool in_prompt) {
  if (*st.status != 0) return step_status(*st.status);
  const int H = st.num_kv_heads;
  const int rows = int(seq_ids.size()) * H;
  std::vector<std::int32_t> first_entry(static_cast<std::size_t>(st.max_sequences), no_entry);
  for (std::size_t b = 0; b < seq_ids.size(); ++b)
    note_entry(first_entry.data(), st.active, st.max_sequences, seq_ids[b], int(b));
  std::vector<row_plan> plans(static_cast<std::size_t>(rows));
  std::vector<int> rank(static_cast<std::size_t>(rows));
  step_status error = step_status::ok;
  int pages = 0;
  for (int i = 0; i < rows; ++i) {
    const float logit = decision_logits ? decision_logits[i] : 0.0f;
    plans[i] = plan_append(st, policy, seq_ids[i / H], i % H, logit, in_prompt);
    flag_duplicate(plans[i], first_entry.data(), seq_ids[i / H], i / H, i % H);
    if (plans[i].error != step_status::ok && error == step_status::ok) error = plans[i].error;
    rank[i] = pages;
    pages += plans[i].fresh;
  }
  if (error == step_status::ok && pages > *st.free_top) error = step_status::pool_exhausted;
  if (error != step_status::ok) {
    *st.status = std::int32_t(error);
    return error;
  }
  for (int i = 0; i < rows; ++i) {
    const int seq = seq_ids[i / H], h = i % H, row = seq * H + h;
    const float logit = decision_logits ? decision_logits[i] : 0.0f;
    const row_slot where = commit_append(st, policy, seq, h, logit, in_prompt, plans[i], rank[i]);
    for (int c = 0; c < st.head_dim; ++c)
      write_channel(st, row, where, c, k[std::size_t(i) * st.head_dim + c],
                    v[std::size_t(i) * st.head_dim + c]);
  }
  *st.free_top -= pages;
  return step_status::ok;
}

/// After attention: every row of the batch evicts down to the policy's budget (skipped while a
/// failed step's status is set, like every other step).
template <class T, class DevicePolicy>
void evict_batch(const cache_state<T>& st, const DevicePolicy& policy,
                 std::span<const std::int32_t> seq_ids) {
  if (*st.status != 0) return;
  for (const std::int32_t seq : seq_ids)
    for (int h = 0; h < st.num_kv_heads; ++h)
      evict_row_by_score(st, policy, seq * st.num_kv_heads + h);
}

}  // namespace step
DMS_NAMESPACE_END
