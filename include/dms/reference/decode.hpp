// SPDX-License-Identifier: Apache-2.0
#pragma once

// CPU reference decode: one new query token per sequence attends to what its policy lets it
// read — every live slot of each row, or Quest's selected pages. The query's probabilities are
// folded into the per-slot scores for the policies that keep them (TOVA, H2O), and the number of
// slots read is added to the cache's KV-token-read counter.

#include <cstdint>
#include <span>
#include <vector>

#include "dms/config.hpp"
#include "dms/error.hpp"
#include "dms/numeric.hpp"
#include "dms/paged_cache.hpp"
#include "dms/reference/attend.hpp"

DMS_NAMESPACE_BEGIN
namespace reference {

/// Optional outputs of decode_attention.
struct decode_extras {
  std::span<float> lse = {};            // [num_query_heads] log-sum-exp of the scaled logits
  std::vector<float>* probs = nullptr;  // [num_query_heads][stride]: probability per slot, where
                                        // stride = longest row of the sequence; 0 if not read
  float softmax_scale = 0.0f;           // 0 = 1 / sqrt(head_dim)
};

/// q: [num_query_heads][head_dim] of the token just appended to `seq`; out: same shape.
/// Throws, changing nothing, on wrong sizes, an unknown sequence, a non-finite q (naming the
/// element and the sequence) or an invalid softmax_scale.
template <storage_type T, class P>
void decode_attention(paged_cache<T, P>& cache, int seq, std::span<const float> q,
                      std::span<float> out, decode_extras extras = {}) {
  const cache_config& cfg = cache.config();
  const int G = cfg.group_size, d = cfg.head_dim;
  const std::size_t heads = std::size_t(cfg.num_query_heads());
  detail::check_size("decode_attention: q", q.size(), heads * d);
  detail::check_size("decode_attention: out", out.size(), heads * d);
  if (!extras.lse.empty()) detail::check_size("decode_attention: lse", extras.lse.size(), heads);
  auto seq_ref = cache.sequence(seq);  // validates seq
  detail::check_finite("decode_attention: q", q, 0, std::size_t(d), 0, "sequence", seq,
                       [](float x) { return x; });
  const float scale = softmax_scale_or_default(extras.softmax_scale, d);
  const auto view = cache.view();

  int stride = 0;
  for (int h = 0; h < cfg.num_kv_heads; ++h) stride = std::max(stride, seq_ref.row(h).length());
  if (extras.probs) extras.probs->assign(heads * stride, 0.0f);

  std::vector<int> slots, pages;
  std::vector<float> kbuf, vbuf, probs, lse(G);
  for (int h = 0; h < cfg.num_kv_heads; ++h) {
    auto& row = seq_ref.row(h);
    const int r = row.index();
    const float* qg = q.data() + std::size_t(h) * G * d;
    // Which slots to read: Quest narrows to its pages; holes are skipped.
    slots.clear();
    if constexpr (P::selects_pages) {
      cache.policy().select_pages(row, qg, G, d, pages);
      for (int p : pages)
        for (int s = p * cfg.page_size; s < std::min(row.length(), (p + 1) * cfg.page_size); ++s)
          if (row.position(s) >= 0) slots.push_back(s);
    } else {
      for (int s = 0; s < row.length(); ++s)
        if (row.position(s) >= 0) slots.push_back(s);
    }
    const int n = int(slots.size());
    // Pad the transposed keys' stride: a power-of-two stride maps every channel's row to the
    // same cache sets (measured: 2.5x slower dense decode at 1K slots).
    const int ldk = n + 16;
    kbuf.resize(std::size_t(ldk) * d);
    vbuf.resize(std::size_t(n) * d);
    for (int j = 0; j < n; ++j) {
      const T* ks = view.key(r, slots[j]);
      const T* vs = view.value(r, slots[j]);
      for (int c = 0; c < d; ++c) {
        kbuf[std::size_t(c) * ldk + j] = to_float(ks[c]);  // transposed, see attend_group
        vbuf[std::size_t(j) * d + c] = to_float(vs[c]);
      }
    }
    probs.resize(std::size_t(G) * n);
    attend_group(qg, G, d, kbuf.data(), ldk, vbuf.data(), n, nullptr, scale,
                 out.data() + std::size_t(h) * G * d, lse.data(), probs.data());
    cache.record_reads(n);
    if (!extras.lse.empty())
      std::copy(lse.begin(), lse.end(), extras.lse.begin() + std::size_t(h) * G);
    if (extras.probs)
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < n; ++j)
          (*extras.probs)[(std::size_t(h) * G + g) * stride + slots[j]] =
              probs[std::size_t(g) * n + j];

    if constexpr (P::keeps_scores) {
      const score_update how = cache.policy().score_for_query(row.tokens_seen() - 1, -1);
      if (how == score_update::none) continue;
      for (int j = 0; j < n; ++j) {
        float p = 0.0f;
        for (int g = 0; g < G; ++g) p += probs[std::size_t(g) * n + j];
        float& sc = view.score[view.slot_index(r, slots[j])];
        sc = how == score_update::add ? sc + p : p;
      }
    }
  }
}

/// A whole decode step for one sequence: append the token's K/V (and decision logits), attend,
/// let the policy evict. q, out: [num_query_heads][head_dim]; k, v: [num_kv_heads][head_dim].
template <storage_type T, class P>
void decode_step(paged_cache<T, P>& cache, int seq, std::span<const float> q,
                 std::span<const float> k, std::span<const float> v,
                 std::span<const float> decision_logits, std::span<float> out,
                 decode_extras extras = {}) {
  // Validate what attention would reject before append mutates the cache.
  const std::size_t qn = std::size_t(cache.config().num_query_heads()) * cache.config().head_dim;
  detail::check_size("decode_step: q", q.size(), qn);
  detail::check_size("decode_step: out", out.size(), qn);
  if (!extras.lse.empty())
    detail::check_size("decode_step: lse", extras.lse.size(),
                       std::size_t(cache.config().num_query_heads()));
  if (!cache.contains(seq))
    cache.sequence(seq);  // throws the unknown-sequence error before q is looked at
  detail::check_finite("decode_step: q", q, 0, std::size_t(cache.config().head_dim), 0, "sequence",
                       seq, [](float x) { return x; });
  (void)softmax_scale_or_default(extras.softmax_scale, cache.config().head_dim);
  cache.append(seq, k, v, decision_logits);
  decode_attention(cache, seq, q, out, extras);
  cache.finish_step(seq);
}

}  // namespace reference
DMS_NAMESPACE_END
