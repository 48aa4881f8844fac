// SPDX-License-Identifier: Apache-2.0
#pragma once

// The split-K plan of a batched decode step and the merge of its partial results.
//
// Every row (sequence, KV head) of the batch reads a list of pages: all of them, or Quest's
// selection. The list is cut into chunks of decode_chunk_pages() pages, one work item each; the
// items of every row of the batch form one parallel loop over jobs, a job being one item or the
// same chunk of up to decode_max_lockstep rows whose pages interleave (plan_decode_jobs), walked
// in turn so that they read the pool in runs. An item leaves (m, l, acc) per head;
// the last item of a row to finish merges the row's items in chunk order:
//   M = max_c m_c,  L = sum_c l_c e^(m_c - M),  out = sum_c acc_c e^(m_c - M) / L,  lse = M + ln L
// and folds the row's probabilities into its scores (TOVA, H2O) or into extras.probs. The chunk
// size is a constant and the merge order is fixed, so the result is bit for bit the same for any
// number of threads and any executor.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <vector>

#include "dms/cache_view.hpp"
#include "dms/config.hpp"
#include "dms/cpu/decode_kernel.hpp"
#include "dms/policy/policy.hpp"

DMS_NAMESPACE_BEGIN
namespace cpu::detail {

/// Slots per work item (rounded to whole pages, at least one page). A constant: the plan must not
/// depend on the thread count. 512 slots of bf16 K/V at head_dim 128 are 256 KiB: big enough
/// that per-item costs vanish, small enough that one 4K-token row splits into 8 items.
inline constexpr int decode_chunk_slots = 512;

constexpr int decode_chunk_pages(int page_size) {
  return page_size >= decode_chunk_slots ? 1 : decode_chunk_slots / page_size;
}

/// One row of the batch.
struct decode_row {
  int row = 0;    // cache row
  int batch = 0;  // index of its sequence in the batch
  int kv_head = 0;
  int length = 0;            // slots spanned
  std::size_t pages_at = 0;  // Quest: its selection in decode_workspace::pages
  int num_pages = 0;         // pages read
  int first_item = 0;        // its items: [first_item, first_item + num_items)
  int num_items = 0;
  score_update fold = score_update::none;
};

/// Per-call scratch, reused across calls on the same thread (it only grows).
struct decode_workspace {
  std::vector<decode_row> rows;
  std::vector<int> item_row;                 // [items] index into rows
  std::vector<int> job_items;                // items, grouped into jobs (plan_decode_jobs)
  std::vector<int> job_first;                // [jobs + 1] job j: job_items[first[j], first[j+1])
  std::vector<std::int32_t> pages;           // Quest's selections, concatenated
  std::vector<std::vector<int>> selections;  // [rows] select_pages output
  std::vector<float> q;                      // [rows][G][dpad] scaled, in chunk layout
  std::vector<float> partial;                // [items][G][dpad + 2]: acc, m, l
  std::vector<int> counts;                   // [items] keys read
  std::vector<float> logits;                 // [items][G][cap] when scores or probs are needed
  std::vector<std::int32_t> slots;           // [items][cap]
  std::vector<int> lanes;                    // [head_dim] channel -> index in chunk layout
  std::unique_ptr<std::atomic<int>[]> remaining;  // [rows] items not finished yet
  std::size_t remaining_size = 0;
};

inline decode_workspace& thread_decode_workspace() {
  thread_local decode_workspace ws;
  return ws;
}

/// Cuts each row's page list (num_pages) into items of chunk_pages pages: sets the rows'
/// first_item and num_items and ws.item_row. Returns the number of items.
inline int plan_decode_items(decode_workspace& ws, int chunk_pages) {
  int items = 0;
  for (decode_row& rp : ws.rows) {
    rp.first_item = items;
    rp.num_items = (rp.num_pages + chunk_pages - 1) / chunk_pages;
    items += rp.num_items;
  }
  ws.item_row.resize(std::size_t(items));
  for (std::size_t r = 0; r < ws.rows.size(); ++r)
    for (int c = 0; c < ws.rows[r].num_items; ++c)
      ws.item_row[std::size_t(ws.rows[r].first_item + c)] = int(r);
  return items;
}

/// Groups the plan's items into jobs, the items one call of the kernel walks in turn
/// (decode_chunks). Chunk c of consecutive rows goes into one job, up to decode_max_lockstep
/// of them, while each row's chunk starts on the pool page right after the previous row's: rows
/// that grew in the same steps under page_placement::stack, whose pages interleave. Such a job
/// reads the pool in runs of pages instead of one stream per row that restarts at every page
/// (4 KiB of bf16 K at 16 slots and head_dim 128). Other items (page_placement::adjacent, rows
/// that grew apart, most of Quest's selections) are a job each. Results do not depend on the
/// grouping: a job computes each of its items exactly as alone. So the grouping may depend on
/// the thread count, which max_per_job (in [1, decode_max_lockstep]) caps it by.
template <class T>
void plan_decode_jobs(decode_workspace& ws, const cache_view<const T>& view, int chunk_pages,
                      bool selected, int max_per_job) {
  ws.job_items.clear();
  ws.job_first.clear();
  int max_items = 0;
  for (const decode_row& rp : ws.rows) max_items = std::max(max_items, rp.num_items);
  for (int c = 0; c < max_items; ++c) {
    std::int64_t prev = -2;  // the first pool page of the previous row's chunk c (-2: none)
    for (const decode_row& rp : ws.rows) {
      if (c >= rp.num_items) {
        prev = -2;
        continue;
      }
      const std::size_t at = std::size_t(c) * std::size_t(chunk_pages);
      const int lp = selected ? ws.pages[rp.pages_at + at] : int(at);
      const std::int64_t page = view.page(rp.row, lp);
      const bool joins =
          page == prev + 1 && int(ws.job_items.size()) - ws.job_first.back() < max_per_job;
      if (!joins) ws.job_first.push_back(int(ws.job_items.size()));
      ws.job_items.push_back(rp.first_item + c);
      prev = page;
    }
  }
  ws.job_first.push_back(int(ws.job_items.size()));
}

/// What the merge of a row writes.
struct decode_outputs {
  float* out;                 // [batch][H][d]
  float* lse;                 // [batch][H] or null
  std::vector<float>* probs;  // [H][stride] of the batch's sequence 0, or null
  int probs_stride;
  float* score;  // the pool's per-slot scores (TOVA, H2O)
};

/// Merges the items of row `rp` (see the top of this file).
template <class T>
void merge_decode_row(const decode_workspace& ws, const decode_row& rp,
                      const decode_kernels<T>& kernels, const cache_view<const T>& view, int group,
                      int dpad, int cap, const decode_outputs& o) noexcept {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  const int d = view.head_dim, H = view.num_kv_heads * group;
  const std::size_t item_floats = std::size_t(group) * (dpad + 2);
  thread_local std::vector<float> sum, lse, pbuf;
  sum.resize(std::size_t(dpad));
  lse.resize(std::size_t(group));

  for (int g = 0; g < group; ++g) {
    const int head = rp.kv_head * group + g;
    float* out = o.out + (std::size_t(rp.batch) * H + head) * d;
    float big_m = neg_inf;
    for (int c = 0; c < rp.num_items; ++c) {
      const float* part = ws.partial.data() + std::size_t(rp.first_item + c) * item_floats;
      big_m = std::max(big_m, part[std::size_t(group) * dpad + g]);
    }
    if (big_m == neg_inf) {  // nothing read
      std::fill(out, out + d, 0.0f);
      lse[g] = neg_inf;
    } else {
      std::fill(sum.begin(), sum.end(), 0.0f);
      float big_l = 0.0f;
      for (int c = 0; c < rp.num_items; ++c) {
        const float* part = ws.partial.data() + std::size_t(rp.first_item + c) * item_floats;
        const float m = part[std::size_t(group) * dpad + g];
        if (m == neg_inf) continue;
        const float w = std::exp(m - big_m);
        big_l += part[std::size_t(group) * dpad + group + g] * w;
        const float* acc = part + std::size_t(g) * dpad;
        for (int e = 0; e < dpad; ++e) sum[std::size_t(e)] += acc[e] * w;
      }
      const float inv = 1.0f / big_l;
      for (int e = 0; e < d; ++e) out[e] = sum[std::size_t(ws.lanes[std::size_t(e)])] * inv;
      lse[g] = big_m + std::log(big_l);
    }
    if (o.lse) o.lse[std::size_t(rp.batch) * H + head] = lse[g];
  }

  if (rp.fold == score_update::none && !(o.probs && rp.batch == 0)) return;
  pbuf.resize(std::size_t(cap));
  for (int c = 0; c < rp.num_items; ++c) {
    const int item = rp.first_item + c;
    const int n = ws.counts[std::size_t(item)];
    const float* logits = ws.logits.data() + std::size_t(item) * group * cap;
    const std::int32_t* slots = ws.slots.data() + std::size_t(item) * cap;
    if (rp.fold != score_update::none) {
      kernels.group_probability(logits, cap, n, group, lse.data(), pbuf.data());
      for (int j = 0; j < n; ++j) {
        float& sc = o.score[view.slot_index(rp.row, slots[j])];
        sc = rp.fold == score_update::add ? sc + pbuf[std::size_t(j)] : pbuf[std::size_t(j)];
      }
    }
    if (o.probs && rp.batch == 0) {
      for (int g = 0; g < group; ++g) {
        kernels.head_probability(logits + std::size_t(g) * cap, n, lse[g], pbuf.data());
        float* dst = o.probs->data() + std::size_t(rp.kv_head * group + g) * o.probs_stride;
        for (int j = 0; j < n; ++j) dst[slots[j]] = pbuf[std::size_t(j)];
      }
    }
  }
}

}  // namespace cpu::detail
DMS_NAMESPACE_END
