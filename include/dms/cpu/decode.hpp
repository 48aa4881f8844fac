// SPDX-License-Identifier: Apache-2.0
#pragma once

// CPU fast decode: drop-in equivalents of dms::reference::decode_attention and decode_step
// (same arguments, same validation, same reads counted, same score folding, same Quest pages),
// plus batched forms that run a whole batch as one parallel job. Switching a caller is one line:
//   dms::reference::decode_attention(cache, seq, q, out, extras);
//   dms::cpu::decode_attention(cache, seq, q, out, extras);          // default thread pool
//   dms::cpu::decode_attention(cache, seq, q, out, extras, my_exec); // an engine's executor
// Results equal the reference's within float rounding (docs/design.md, "CPU fast path", gives
// the tolerances) and are bit for bit the same for any thread count.
//
// Thread safety: calls on different caches may run concurrently. Calls on the same cache must not
// (a decode step writes scores and the read counter), exactly as with the reference.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "dms/config.hpp"
#include "dms/cpu/decode_kernel.hpp"
#include "dms/cpu/decode_plan.hpp"
#include "dms/cpu/executor.hpp"
#include "dms/cpu/simd/level.hpp"
#include "dms/cpu/thread_pool.hpp"
#include "dms/error.hpp"
#include "dms/numeric.hpp"
#include "dms/paged_cache.hpp"
#include "dms/reference/attend.hpp"
#include "dms/reference/decode.hpp"

DMS_NAMESPACE_BEGIN
namespace cpu {

/// The reference's optional outputs, unchanged: lse, probs, softmax_scale.
using decode_extras = reference::decode_extras;

/// Optional outputs of the batched entry points.
struct batch_decode_extras {
  std::span<float> lse = {};   // [batch][num_query_heads] log-sum-exp of the scaled logits
  float softmax_scale = 0.0f;  // 0 = 1 / sqrt(head_dim)
};

namespace detail {

template <storage_type T, class P>
void check_batch(paged_cache<T, P>& cache, std::span<const int> seqs, const char* who) {
  for (std::size_t b = 0; b < seqs.size(); ++b) {
    (void)cache.sequence(seqs[b]);  // throws on an unknown id, naming the valid ones
    for (std::size_t c = 0; c < b; ++c)
      if (seqs[c] == seqs[b])
        ::dms::detail::fail(who, ": sequence ", seqs[b], " appears twice in the batch (at ", c,
                            " and ", b, ")");
  }
}

/// The batched decode attention behind every entry point. Validation happened in the caller.
/// q, out: [batch][H][d]; lse: [batch][H] or empty; probs: only for seqs[0] (single-sequence API).
/// Non-finite q of a batch, named by [head][channel] and the sequence it belongs to.
template <storage_type T, class P>
void check_batch_q(paged_cache<T, P>& cache, std::span<const int> seqs, std::span<const float> q,
                   const char* what) {
  const std::size_t per = std::size_t(cache.config().num_query_heads()) * cache.config().head_dim;
  for (std::size_t b = 0; b < seqs.size(); ++b)
    ::dms::detail::check_finite(what, q.subspan(b * per, per), 0,
                                std::size_t(cache.config().head_dim), 0, "sequence", seqs[b],
                                [](float x) { return x; });
}

template <storage_type T, class P>
void decode_batch(paged_cache<T, P>& cache, std::span<const int> seqs, std::span<const float> q,
                  std::span<float> out, std::span<float> lse, std::vector<float>* probs,
                  float softmax_scale, executor& exec) {
  const cache_config& cfg = cache.config();
  const int G = cfg.group_size, d = cfg.head_dim, Hk = cfg.num_kv_heads, ps = cfg.page_size;
  const std::size_t qrow = std::size_t(cfg.num_query_heads()) * d;
  const int batch = int(seqs.size());
  const float scale = reference::softmax_scale_or_default(softmax_scale, d);

  const decode_kernels<T> kernels = decode_kernels_for<T>(active_simd_level());
  const int cw = 2 * kernels.width;
  const int dpad = (d + cw - 1) / cw * cw;
  const auto view = cache.view();
  const cache_view<const T> cview = view.read_only();

  decode_workspace& ws = thread_decode_workspace();
  const int nrows = batch * Hk;
  ws.rows.assign(std::size_t(nrows), {});
  ws.lanes.resize(std::size_t(d));
  for (int e = 0; e < d; ++e) ws.lanes[std::size_t(e)] = e / cw * cw + kernels.lane(e % cw);

  // Rows, and Quest's page selections (one task per row: each scores every page of its row).
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < Hk; ++h) {
      decode_row& rp = ws.rows[std::size_t(b * Hk + h)];
      rp.row = cache.row_index(seqs[std::size_t(b)], h);
      rp.batch = b;
      rp.kv_head = h;
      rp.length = cache.row_length(rp.row);
      if constexpr (P::keeps_scores)
        rp.fold = cache.policy().score_for_query(cache.tokens_seen(rp.row) - 1, -1);
    }
  ws.pages.clear();
  if constexpr (P::selects_pages) {
    if (ws.selections.size() < std::size_t(nrows)) ws.selections.resize(std::size_t(nrows));
    std::vector<typename paged_cache<T, P>::row_ref> refs;
    refs.reserve(std::size_t(nrows));
    for (const decode_row& rp : ws.rows)
      refs.push_back(cache.row(seqs[std::size_t(rp.batch)], rp.kv_head));
    const P& policy = cache.policy();
    auto select = [&](std::size_t r) {
      const decode_row& rp = ws.rows[r];
      policy.select_pages(refs[r],
                          q.data() + std::size_t(rp.batch) * qrow + std::size_t(rp.kv_head) * G * d,
                          G, d, ws.selections[r]);
    };
    exec.parallel_for(std::size_t(nrows), task_ref(select));
    for (int r = 0; r < nrows; ++r) {
      decode_row& rp = ws.rows[std::size_t(r)];
      rp.pages_at = ws.pages.size();
      rp.num_pages = int(ws.selections[std::size_t(r)].size());
      ws.pages.insert(ws.pages.end(), ws.selections[std::size_t(r)].begin(),
                      ws.selections[std::size_t(r)].end());
    }
  } else {
    for (decode_row& rp : ws.rows) rp.num_pages = (rp.length + ps - 1) / ps;
  }

  // Items: each row's page list in chunks of a fixed number of pages.
  const int chunk_pages = decode_chunk_pages(ps);
  const int cap = chunk_pages * ps;
  const int items = plan_decode_items(ws, chunk_pages);
  bool keep_logits = probs != nullptr;
  for (const decode_row& rp : ws.rows) keep_logits = keep_logits || rp.fold != score_update::none;
  const std::size_t item_floats = std::size_t(G) * (dpad + 2);
  ws.partial.resize(std::size_t(items) * item_floats);
  ws.counts.assign(std::size_t(items), 0);
  if (keep_logits) {
    ws.logits.resize(std::size_t(items) * G * cap);
    ws.slots.resize(std::size_t(items) * cap);
  }
  if (ws.remaining_size < std::size_t(nrows)) {
    ws.remaining = std::make_unique<std::atomic<int>[]>(std::size_t(nrows));
    ws.remaining_size = std::size_t(nrows);
  }
  for (int r = 0; r < nrows; ++r)
    ws.remaining[std::size_t(r)].store(ws.rows[std::size_t(r)].num_items,
                                       std::memory_order_relaxed);

  // Queries: scaled once, permuted into the level's chunk layout, zero-padded to dpad.
  ws.q.assign(std::size_t(nrows) * G * dpad, 0.0f);
  for (int r = 0; r < nrows; ++r) {
    const decode_row& rp = ws.rows[std::size_t(r)];
    const float* src = q.data() + std::size_t(rp.batch) * qrow + std::size_t(rp.kv_head) * G * d;
    float* dst = ws.q.data() + std::size_t(r) * G * dpad;
    for (int g = 0; g < G; ++g)
      for (int e = 0; e < d; ++e)
        dst[std::size_t(g) * dpad + ws.lanes[std::size_t(e)]] = src[std::size_t(g) * d + e] * scale;
  }

  int stride = 0;
  if (probs) {
    for (int h = 0; h < Hk; ++h) stride = std::max(stride, ws.rows[std::size_t(h)].length);
    probs->assign(std::size_t(cfg.num_query_heads()) * stride, 0.0f);
  }
  const decode_outputs outputs{out.data(), lse.empty() ? nullptr : lse.data(), probs, stride,
                               view.score};

  const auto item_args = [&](int item) {
    const int r = ws.item_row[std::size_t(item)];
    const decode_row& rp = ws.rows[std::size_t(r)];
    const int first = (item - rp.first_item) * chunk_pages;
    const int n = std::min(chunk_pages, rp.num_pages - first);
    float* part = ws.partial.data() + std::size_t(item) * item_floats;
    return decode_chunk_args<T>{
        cview,
        rp.row,
        rp.length,
        P::selects_pages ? ws.pages.data() + rp.pages_at + first : nullptr,
        first,
        n,
        G,
        dpad,
        ws.q.data() + std::size_t(r) * G * dpad,
        part,
        part + std::size_t(G) * dpad,
        part + std::size_t(G) * dpad + G,
        keep_logits ? ws.logits.data() + std::size_t(item) * G * cap : nullptr,
        keep_logits ? ws.slots.data() + std::size_t(item) * cap : nullptr,
        cap,
        ws.counts.data() + item};
  };
  // Jobs of several items, but at least 4 per thread, so that every thread gets work and the
  // shared counter can balance it (a job of 8 items at 4K tokens is all of a row's chunks).
  const int per_job = std::clamp(items / (4 * exec.concurrency()), 1, decode_max_lockstep);
  plan_decode_jobs(ws, cview, chunk_pages, P::selects_pages, per_job);
  auto run = [&](std::size_t job) {
    const int begin = ws.job_first[job], end = ws.job_first[job + 1];
    decode_chunk_args<T> args[decode_max_lockstep]{};
    for (int i = begin; i < end; ++i) args[i - begin] = item_args(ws.job_items[std::size_t(i)]);
    kernels.chunks(args, end - begin);
    for (int i = begin; i < end; ++i) {
      const int r = ws.item_row[std::size_t(ws.job_items[std::size_t(i)])];
      if (ws.remaining[std::size_t(r)].fetch_sub(1, std::memory_order_acq_rel) == 1)
        merge_decode_row(ws, ws.rows[std::size_t(r)], kernels, cview, G, dpad, cap, outputs);
    }
  };
  exec.parallel_for(ws.job_first.size() - 1, task_ref(run));
  for (const decode_row& rp : ws.rows)  // rows with nothing to read have no item to merge them
    if (rp.num_items == 0) merge_decode_row(ws, rp, kernels, cview, G, dpad, cap, outputs);

  std::int64_t reads = 0;
  for (int i = 0; i < items; ++i) reads += ws.counts[std::size_t(i)];
  cache.record_reads(reads);
}

}  // namespace detail

/// Drop-in for dms::reference::decode_attention: q is [num_query_heads][head_dim] of the token
/// just appended to `seq`; out has the same shape.
template <storage_type T, class P>
void decode_attention(paged_cache<T, P>& cache, int seq, std::span<const float> q,
                      std::span<float> out, decode_extras extras = {},
                      executor& exec = default_executor()) {
  const cache_config& cfg = cache.config();
  const std::size_t heads = std::size_t(cfg.num_query_heads());
  ::dms::detail::check_size("decode_attention: q", q.size(), heads * cfg.head_dim);
  ::dms::detail::check_size("decode_attention: out", out.size(), heads * cfg.head_dim);
  if (!extras.lse.empty())
    ::dms::detail::check_size("decode_attention: lse", extras.lse.size(), heads);
  (void)cache.sequence(seq);  // validates seq
  ::dms::detail::check_finite("decode_attention: q", q, 0, std::size_t(cfg.head_dim), 0, "sequence",
                              seq, [](float x) { return x; });
  const int seqs[1] = {seq};
  detail::decode_batch(cache, std::span<const int>(seqs), q, out, extras.lse, extras.probs,
                       extras.softmax_scale, exec);
}

/// Decode attention for a batch of distinct sequences, one parallel job.
/// q, out: [batch][num_query_heads][head_dim], batch = seqs.size().
template <storage_type T, class P>
void decode_attention(paged_cache<T, P>& cache, std::span<const int> seqs, std::span<const float> q,
                      std::span<float> out, batch_decode_extras extras = {},
                      executor& exec = default_executor()) {
  const cache_config& cfg = cache.config();
  const std::size_t heads = std::size_t(cfg.num_query_heads());
  ::dms::detail::check_size("decode_attention: q", q.size(), seqs.size() * heads * cfg.head_dim);
  ::dms::detail::check_size("decode_attention: out", out.size(),
                            seqs.size() * heads * cfg.head_dim);
  if (!extras.lse.empty())
    ::dms::detail::check_size("decode_attention: lse", extras.lse.size(), seqs.size() * heads);
  detail::check_batch(cache, seqs, "decode_attention");
  detail::check_batch_q(cache, seqs, q, "decode_attention: q");
  detail::decode_batch(cache, seqs, q, out, extras.lse, nullptr, extras.softmax_scale, exec);
}

/// Drop-in for dms::reference::decode_step: append the token's K/V (and decision logits), attend,
/// let the policy evict. q, out: [num_query_heads][head_dim]; k, v: [num_kv_heads][head_dim].
template <storage_type T, class P>
void decode_step(paged_cache<T, P>& cache, int seq, std::span<const float> q,
                 std::span<const float> k, std::span<const float> v,
                 std::span<const float> decision_logits, std::span<float> out,
                 decode_extras extras = {}, executor& exec = default_executor()) {
  // Validate what attention would reject before append mutates the cache.
  const std::size_t qn = std::size_t(cache.config().num_query_heads()) * cache.config().head_dim;
  ::dms::detail::check_size("decode_step: q", q.size(), qn);
  ::dms::detail::check_size("decode_step: out", out.size(), qn);
  if (!extras.lse.empty())
    ::dms::detail::check_size("decode_step: lse", extras.lse.size(),
                              std::size_t(cache.config().num_query_heads()));
  if (!cache.contains(seq))
    cache.sequence(seq);  // throws the unknown-sequence error before q is looked at
  ::dms::detail::check_finite("decode_step: q", q, 0, std::size_t(cache.config().head_dim), 0,
                              "sequence", seq, [](float x) { return x; });
  (void)reference::softmax_scale_or_default(extras.softmax_scale, cache.config().head_dim);
  cache.append(seq, k, v, decision_logits);
  decode_attention(cache, seq, q, out, extras, exec);
  cache.finish_step(seq);
}

namespace detail {

/// Pages held for the appends of a batched step, so that appends of other sequences on other
/// threads cannot take them; what the appends did not use goes back on the way out.
template <class Cache>
class batch_reservation {
 public:
  explicit batch_reservation(Cache& c) : cache_(c) {}
  batch_reservation(const batch_reservation&) = delete;
  batch_reservation& operator=(const batch_reservation&) = delete;
  ~batch_reservation() {
    for (const auto& [seq, pages] : held_)
      cache_.release_reserved_pages(seq, std::min(pages, cache_.reserved_pages(seq)));
  }
  /// Reserves `pages` more for `seq` beyond what it holds; throws (the destructor gives back
  /// what was taken so far) if the pool has too few.
  void add(int seq, int pages, std::size_t batch) {
    const int more = std::max(0, pages - cache_.reserved_pages(seq));
    if (more == 0) return;
    if (more > cache_.available_pages())
      ::dms::detail::fail("page pool exhausted: decode step of ", batch,
                          " sequences needs more new pages than the ", cache_.available_pages(),
                          " free (cache_config.max_pages = ", cache_.config().max_pages,
                          "); sequence ", seq, " alone needs ", pages);
    cache_.reserve_pages(seq, more);
    held_.emplace_back(seq, more);
  }

 private:
  Cache& cache_;
  std::vector<std::pair<int, int>> held_;
};

/// Checks that one decode append to every sequence of `seqs` can succeed, and reserves the new
/// pages they need, so a batched step fails before it appends anything. Mirrors
/// paged_cache::append's checks through the public API (the policy's victim choice is const): a
/// row without a victim and without a hole grows, and a row that grows at a page boundary takes
/// a page.
template <storage_type T, class P>
void reserve_decode_capacity(paged_cache<T, P>& cache, std::span<const int> seqs,
                             std::span<const float> decision_logits,
                             batch_reservation<paged_cache<T, P>>& reservation) {
  const cache_config& cfg = cache.config();
  const int Hk = cfg.num_kv_heads;
  std::vector<int> pages(seqs.size(), 0);
  for (std::size_t b = 0; b < seqs.size(); ++b)
    for (int h = 0; h < Hk; ++h) {
      const auto row = cache.row(seqs[b], h);
      const float logit =
          decision_logits.empty() ? 0.0f : decision_logits[b * std::size_t(Hk) + std::size_t(h)];
      const token_info tok{row.tokens_seen(), logit, false};
      if (cache.policy().choose_victim(row, tok) != -1 || row.live() < row.length()) continue;
      if (row.length() >= cfg.max_row_slots)
        ::dms::detail::fail("decode_step: row of sequence ", seqs[b], ", kv head ", h,
                            " is full: ", row.length(),
                            " slots (cache_config.max_row_slots = ", cfg.max_row_slots, ")");
      if (row.length() % cfg.page_size == 0) ++pages[b];
    }
  std::int64_t total = 0, held = 0;
  for (std::size_t b = 0; b < seqs.size(); ++b) {
    total += pages[b];
    held += std::min(pages[b], cache.reserved_pages(seqs[b]));
  }
  if (total - held > cache.available_pages())
    ::dms::detail::fail("page pool exhausted: decode step of ", seqs.size(), " sequences needs ",
                        total, " new pages, ", cache.available_pages() + held,
                        " of cache_config.max_pages = ", cfg.max_pages, " are free");
  for (std::size_t b = 0; b < seqs.size(); ++b) reservation.add(seqs[b], pages[b], seqs.size());
}

}  // namespace detail

/// A decode step for a batch of distinct sequences: every append, then one parallel attention
/// job, then every finish_step. q, out: [batch][num_query_heads][head_dim]; k, v:
/// [batch][num_kv_heads][head_dim]; decision_logits: [batch][num_kv_heads] (or empty for
/// policies that take none). Everything, capacity included, is checked before the first append,
/// so a step that throws leaves the cache as it was.
template <storage_type T, class P>
void decode_step(paged_cache<T, P>& cache, std::span<const int> seqs, std::span<const float> q,
                 std::span<const float> k, std::span<const float> v,
                 std::span<const float> decision_logits, std::span<float> out,
                 batch_decode_extras extras = {}, executor& exec = default_executor()) {
  const cache_config& cfg = cache.config();
  const std::size_t B = seqs.size(), Hk = std::size_t(cfg.num_kv_heads);
  const std::size_t qn = std::size_t(cfg.num_query_heads()) * cfg.head_dim;
  const std::size_t kn = Hk * cfg.head_dim;
  ::dms::detail::check_size("decode_step: q", q.size(), B * qn);
  ::dms::detail::check_size("decode_step: out", out.size(), B * qn);
  ::dms::detail::check_size("decode_step: k", k.size(), B * kn);
  ::dms::detail::check_size("decode_step: v", v.size(), B * kn);
  if (!extras.lse.empty())
    ::dms::detail::check_size("decode_step: lse", extras.lse.size(),
                              B * std::size_t(cfg.num_query_heads()));
  if (P::uses_decision_logits || !decision_logits.empty())
    ::dms::detail::check_size("decode_step: decision_logits", decision_logits.size(), B * Hk);
  if constexpr (P::uses_decision_logits)
    for (std::size_t i = 0; i < decision_logits.size(); ++i)
      if (!std::isfinite(decision_logits[i]))
        ::dms::detail::fail("decode_step: decision_logits[", i / Hk, "][", i % Hk,
                            "] = ", decision_logits[i], " is not finite (sequence ", seqs[i / Hk],
                            ")");
  detail::check_batch(cache, seqs, "decode_step");
  detail::check_batch_q(cache, seqs, q, "decode_step: q");
  (void)reference::softmax_scale_or_default(extras.softmax_scale, cfg.head_dim);
  detail::batch_reservation<paged_cache<T, P>> reservation(cache);
  detail::reserve_decode_capacity(cache, seqs, decision_logits, reservation);
  for (std::size_t b = 0; b < B; ++b)
    cache.append(seqs[b], k.subspan(b * kn, kn), v.subspan(b * kn, kn),
                 decision_logits.empty() ? decision_logits : decision_logits.subspan(b * Hk, Hk));
  detail::decode_batch(cache, seqs, q, out, extras.lse, nullptr, extras.softmax_scale, exec);
  for (std::size_t b = 0; b < B; ++b) cache.finish_step(seqs[b]);
}

}  // namespace cpu
DMS_NAMESPACE_END
