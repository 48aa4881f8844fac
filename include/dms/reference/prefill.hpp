// SPDX-License-Identifier: Apache-2.0
#pragma once

// CPU reference prefill, chunked. A chunk's queries attend to (a) what the cache already holds
// and (b) the chunk's own keys, causally, under the DMS delayed-eviction rule for policies that
// take decision logits (dense causal for the others). Then the chunk is appended, which lets DMS
// drop what can never be visible again. When the prompt is complete the policy reduces it once
// (TOVA, H2O, SnapKV, StreamingLLM). Chunk size never changes the result beyond float rounding.
//
// Left padding: the first `padding` tokens of a sequence's prompt are not tokens at all: they
// are not cached, take no position, and their queries output zeros (lse = -inf).

#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "dms/config.hpp"
#include "dms/error.hpp"
#include "dms/numeric.hpp"
#include "dms/paged_cache.hpp"
#include "dms/policy/dms.hpp"
#include "dms/reference/attend.hpp"

DMS_NAMESPACE_BEGIN
namespace reference {

/// One chunk of a prompt, token-major.
struct prefill_chunk_inputs {
  std::span<const float> q = {};                // [tokens][num_query_heads][head_dim]
  std::span<const float> k = {};                // [tokens][num_kv_heads][head_dim]
  std::span<const float> v = {};                // [tokens][num_kv_heads][head_dim]
  std::span<const float> decision_logits = {};  // [tokens][num_kv_heads]; ignored by policies
                                                // that take none
  int padding = 0;                              // leading tokens that are left padding
};

struct prefill_outputs {
  std::span<float> out = {};  // [tokens][num_query_heads][head_dim]
  std::span<float> lse = {};  // [tokens][num_query_heads], optional
  float softmax_scale = 0.0f;
};

/// Throws unless the cache can take `n` more prompt tokens for `seq` (logits: [n][num_kv_heads]
/// of those tokens, or empty), so a prefill that would run out of pages fails before it touches
/// anything; returns the new pages the tokens need. Exact for every library policy: the
/// training-free ones never evict inside the prompt, and DMS's reuses follow from the shift rule
/// (the slot of token t-w-1 is reused iff that token is flagged and still holds its slot). A user
/// policy that evicts inside the prompt gets the no-eviction bound.
template <storage_type T, class P>
int check_prompt_capacity(paged_cache<T, P>& cache, int seq, std::span<const float> logits, int n) {
  const cache_config& cfg = cache.config();
  const int Hk = cfg.num_kv_heads;
  std::int64_t pages = 0;
  for (int h = 0; h < Hk; ++h) {
    auto row = cache.row(seq, h);
    const std::int32_t t0 = row.tokens_seen();
    if (std::int64_t{t0} + n > std::numeric_limits<std::int32_t>::max())
      detail::fail("prefill: row of sequence ", seq, ", kv head ", h, " has seen ", t0, " tokens; ",
                   n, " more would pass the limit of 2^31 - 1 (positions are int32)");
    int fresh = n;  // tokens that need a slot nobody frees for them
    if constexpr (P::uses_decision_logits) {
      const int w = cache.policy().window();
      for (std::int32_t t = t0; t < t0 + n; ++t) {
        const std::int32_t p = t - w - 1;
        if (p < 0) continue;
        const bool flagged = p >= t0 - 1
                                 ? dms_rule::evicts(logits[std::size_t(p + 1 - t0) * Hk + h])
                                 : cache.policy().flagged(row.state(), p, t0);
        // A cached token a user evicted is gone from the ring: nothing reuses its slot.
        const bool reused = flagged && (p >= t0 || cache.policy().holds_slot(row.state(), p));
        fresh -= reused ? 1 : 0;
      }
    }
    const int grow = std::max(0, fresh - (row.length() - row.live()));  // holes are refilled first
    if (std::int64_t{row.length()} + grow > cfg.max_row_slots)
      detail::fail("prefill: row of sequence ", seq, ", kv head ", h, " would need ",
                   row.length() + grow, " slots (cache_config.max_row_slots = ", cfg.max_row_slots,
                   ")");
    pages += (row.length() + grow + cfg.page_size - 1) / cfg.page_size -
             (row.length() + cfg.page_size - 1) / cfg.page_size;
  }
  const int free_pages = cache.available_pages() + cache.reserved_pages(seq);
  if (pages > free_pages)
    detail::fail("page pool exhausted: prefill of ", n, " tokens for sequence ", seq, " needs ",
                 pages, " new pages, ", free_pages, " of cache_config.max_pages = ", cfg.max_pages,
                 " are free");
  return int(pages);
}

namespace prefill_detail {
/// Non-finite checks of a prompt's real tokens (padding is not looked at): x is
/// [tokens][heads][head_dim]; the message names [token][head][channel].
inline void check_prompt_finite(const char* what, std::span<const float> x, int heads, int head_dim,
                                int padding, int seq) {
  const std::size_t per_token = std::size_t(heads) * std::size_t(head_dim);
  detail::check_finite(what, x, std::size_t(padding) * per_token, per_token, std::size_t(head_dim),
                       "sequence", seq, [](float f) { return f; });
}

/// Holds the pages a prefill chunk needs for the sequence while it appends, so that appends of
/// other sequences on other threads cannot take them; gives back what is left on the way out.
template <class Cache>
struct chunk_reservation {
  Cache& cache;
  int seq;
  int held = 0;
  chunk_reservation(Cache& c, int s, int pages) : cache(c), seq(s) {
    held = std::max(0, pages - cache.reserved_pages(seq));
    cache.reserve_pages(seq, held);
  }
  ~chunk_reservation() {
    cache.release_reserved_pages(seq, std::min(held, cache.reserved_pages(seq)));
  }
  chunk_reservation(const chunk_reservation&) = delete;
  chunk_reservation& operator=(const chunk_reservation&) = delete;
};
}  // namespace prefill_detail

/// Whether prefill_chunk ends the prompt (cache.finish_prompt) after its last chunk.
enum class end_of_prompt { finish, defer };

namespace prefill_detail {

/// The end of a prefill chunk, shared by reference::prefill_chunk and cpu::prefill_chunk: its n
/// real tokens appended (the same bookkeeping as decode, so DMS reuses expired slots as it
/// goes), the prompt scores of those that got a slot stored (chunk_score: [num_kv_heads][n],
/// policies that keep scores), and after the prompt's last chunk the policy's compress_prompt,
/// unless `end` is defer. t0: the index of the chunk's first real token.
template <storage_type T, class P>
void append_chunk(paged_cache<T, P>& cache, int seq, const prefill_chunk_inputs& in, int n,
                  std::int32_t t0, std::span<const float> chunk_score, int prompt_length,
                  end_of_prompt end) {
  const int Hk = cache.config().num_kv_heads;
  const std::size_t krow = std::size_t(Hk) * cache.config().head_dim;
  for (int i = 0; i < n; ++i) {
    const std::size_t t = std::size_t(in.padding + i);
    const auto logits =
        P::uses_decision_logits ? in.decision_logits.subspan(t * Hk, Hk) : std::span<const float>{};
    cache.append(seq, in.k.subspan(t * krow, krow), in.v.subspan(t * krow, krow), logits, true);
  }
  if constexpr (P::keeps_scores) {
    const auto view = cache.view();
    auto seq_ref = cache.sequence(seq);
    for (int h = 0; h < Hk; ++h) {
      auto& row = seq_ref.row(h);
      for (int s = 0; s < row.length(); ++s) {
        const std::int32_t p = row.position(s);
        if (p >= t0 && p < t0 + n)
          view.score[view.slot_index(row.index(), s)] = chunk_score[std::size_t(h) * n + (p - t0)];
      }
    }
  }
  if (t0 + n == prompt_length && end == end_of_prompt::finish) cache.finish_prompt(seq);
}

}  // namespace prefill_detail

/// What check_prefill_chunk found: the chunk's tokens (padding included) and the new pages its
/// appends need (to hold in a prefill_detail::chunk_reservation while they run).
struct prefill_chunk_plan {
  int tokens = 0;
  int pages = 0;
};

/// Everything prefill_chunk checks before it touches the cache (shared with dms::cpu's fast
/// prefill, so both reject the same calls with the same messages).
template <storage_type T, class P>
prefill_chunk_plan check_prefill_chunk(paged_cache<T, P>& cache, int seq,
                                       const prefill_chunk_inputs& in, int prompt_length,
                                       const prefill_outputs& o) {
  const cache_config& cfg = cache.config();
  const int Hk = cfg.num_kv_heads, G = cfg.group_size, d = cfg.head_dim, H = Hk * G;
  const std::size_t qrow = std::size_t(H) * d, krow = std::size_t(Hk) * d;
  auto seq_ref = cache.sequence(seq);  // validates seq
  if (in.q.size() % qrow != 0)
    detail::fail("prefill: q has ", in.q.size(),
                 " elements, not a multiple of num_query_heads * head_dim = ", qrow);
  const int tokens = int(in.q.size() / qrow);
  detail::check_size("prefill: k", in.k.size(), tokens * krow);
  detail::check_size("prefill: v", in.v.size(), tokens * krow);
  detail::check_size("prefill: out", o.out.size(), tokens * qrow);
  if (!o.lse.empty()) detail::check_size("prefill: lse", o.lse.size(), std::size_t(tokens) * H);
  detail::check_range("prefill: padding", in.padding, 0, tokens);
  const std::int32_t t0 = seq_ref.row(0).tokens_seen();
  if (in.padding > 0 && t0 > 0)
    detail::fail("prefill: padding = ", in.padding, " but sequence ", seq, " already holds ", t0,
                 " tokens; left padding must precede every real token");
  const int n = tokens - in.padding;  // real tokens in the chunk
  if (std::int64_t{t0} + n > prompt_length)
    detail::fail("prefill: chunk ends at token ", std::int64_t{t0} + n,
                 ", past prompt_length = ", prompt_length);
  prefill_detail::check_prompt_finite("prefill: q", in.q, H, d, in.padding, seq);
  prefill_detail::check_prompt_finite("prefill: k", in.k, Hk, d, in.padding, seq);
  prefill_detail::check_prompt_finite("prefill: v", in.v, Hk, d, in.padding, seq);
  (void)softmax_scale_or_default(o.softmax_scale, d);  // rejects a negative or non-finite scale
  if constexpr (P::uses_decision_logits) {
    detail::check_size("prefill: decision_logits", in.decision_logits.size(),
                       std::size_t(tokens) * Hk);
    for (std::size_t i = std::size_t(in.padding) * Hk; i < in.decision_logits.size(); ++i)
      if (!std::isfinite(in.decision_logits[i]))
        detail::fail("prefill: decision_logits[", i / Hk, "][", i % Hk,
                     "] = ", in.decision_logits[i], " is not finite");
  } else if (!in.decision_logits.empty()) {
    detail::check_size("prefill: decision_logits", in.decision_logits.size(),
                       std::size_t(tokens) * Hk);
  }

  const int pages = check_prompt_capacity(
      cache, seq,
      P::uses_decision_logits ? in.decision_logits.subspan(std::size_t(in.padding) * Hk)
                              : std::span<const float>{},
      n);
  return {tokens, pages};
}

/// Processes one chunk of a prompt of `prompt_length` real (unpadded) tokens. After the chunk
/// that completes the prompt, the policy's compress_prompt runs (cache.finish_prompt), unless
/// `end` is defer: then the caller ends it, e.g. once every sequence of a batch has appended its
/// last chunk (the order of the GPU's batched prefill, which hands out pages in that order).
template <storage_type T, class P>
void prefill_chunk(paged_cache<T, P>& cache, int seq, const prefill_chunk_inputs& in,
                   int prompt_length, prefill_outputs o,
                   end_of_prompt end = end_of_prompt::finish) {
  const cache_config& cfg = cache.config();
  const int Hk = cfg.num_kv_heads, G = cfg.group_size, d = cfg.head_dim, H = Hk * G;
  const std::size_t qrow = std::size_t(H) * d;
  const auto [tokens, pages] = check_prefill_chunk(cache, seq, in, prompt_length, o);
  prefill_detail::chunk_reservation<paged_cache<T, P>> reservation(cache, seq, pages);
  auto seq_ref = cache.sequence(seq);
  const std::int32_t t0 = seq_ref.row(0).tokens_seen();
  const int n = tokens - in.padding;  // real tokens in the chunk

  const float scale = softmax_scale_or_default(o.softmax_scale, d);
  const auto view = cache.view();
  std::fill(o.out.begin(), o.out.begin() + std::ptrdiff_t(in.padding) * qrow, 0.0f);
  if (!o.lse.empty())
    std::fill(o.lse.begin(), o.lse.begin() + std::ptrdiff_t(in.padding) * H,
              -std::numeric_limits<float>::infinity());

  // Per-chunk-key score contributions, folded into the slots once the chunk is appended.
  std::vector<float> chunk_score(std::size_t(Hk) * n, 0.0f);
  std::vector<float> kbuf, vbuf, probs, lse(G);
  std::vector<std::int32_t> pos;
  std::vector<std::uint8_t> flag, visible;
  std::vector<int> cached_slots;

  for (int h = 0; h < Hk; ++h) {
    auto& row = seq_ref.row(h);
    const int r = row.index();
    // Keys: the cached live slots, then the chunk's keys rounded to the storage type (so a
    // chunk boundary never changes what a key looks like).
    cached_slots.clear();
    for (int s = 0; s < row.length(); ++s)
      if (row.position(s) >= 0) cached_slots.push_back(s);
    const int c = int(cached_slots.size()), m = c + n;
    kbuf.resize(std::size_t(m) * d);
    vbuf.resize(std::size_t(m) * d);
    pos.resize(m);
    flag.assign(m, 0);
    for (int j = 0; j < c; ++j) {
      const T* ks = view.key(r, cached_slots[j]);
      const T* vs = view.value(r, cached_slots[j]);
      for (int x = 0; x < d; ++x) {
        kbuf[std::size_t(x) * m + j] = to_float(ks[x]);  // transposed, see attend_group
        vbuf[std::size_t(j) * d + x] = to_float(vs[x]);
      }
      pos[j] = row.position(cached_slots[j]);
    }
    for (int i = 0; i < n; ++i) {
      const std::size_t src = (std::size_t(in.padding + i) * Hk + h) * d;
      for (int x = 0; x < d; ++x) {
        kbuf[std::size_t(x) * m + (c + i)] = to_float(from_float<T>(in.k[src + x]));
        vbuf[std::size_t(c + i) * d + x] = to_float(from_float<T>(in.v[src + x]));
      }
      pos[c + i] = t0 + i;
    }
    if constexpr (P::uses_decision_logits) {
      // Shift rule: the logit of token t flags token t-1; the first token's flags nothing.
      const auto logit = [&](int i) {
        return in.decision_logits[std::size_t(in.padding + i) * Hk + h];
      };
      for (int j = 0; j < c; ++j) {
        if (pos[j] == t0 - 1)
          flag[j] = n > 0 && dms_rule::evicts(logit(0));
        else
          flag[j] = cache.policy().flagged(row.state(), pos[j], t0);
      }
      for (int i = 0; i + 1 < n; ++i) flag[c + i] = dms_rule::evicts(logit(i + 1));
    }

    visible.resize(m);
    probs.resize(std::size_t(G) * m);
    for (int i = 0; i < n; ++i) {
      const std::int32_t t = t0 + i;
      const int keys = c + i + 1;  // causal: nothing after the query itself
      for (int j = 0; j < keys; ++j) {
        if constexpr (P::uses_decision_logits)
          visible[j] = dms_rule::visible(flag[j], pos[j], t, cache.policy().window());
        else
          visible[j] = 1;
      }
      const std::size_t qoff = std::size_t(in.padding + i) * qrow + std::size_t(h) * G * d;
      attend_group(in.q.data() + qoff, G, d, kbuf.data(), m, vbuf.data(), keys, visible.data(),
                   scale, o.out.data() + qoff, lse.data(), probs.data());
      if (!o.lse.empty())
        std::copy(lse.begin(), lse.end(),
                  o.lse.begin() + std::ptrdiff_t(in.padding + i) * H + h * G);
      if constexpr (P::keeps_scores) {
        const score_update how = cache.policy().score_for_query(t, prompt_length);
        if (how == score_update::none) continue;
        for (int j = 0; j < keys; ++j) {
          if (!visible[j]) continue;
          float p = 0.0f;
          for (int g = 0; g < G; ++g) p += probs[std::size_t(g) * keys + j];
          float& sc = j < c ? view.score[view.slot_index(r, cached_slots[j])]
                            : chunk_score[std::size_t(h) * n + (j - c)];
          sc = how == score_update::add ? sc + p : p;
        }
      }
    }
  }

  prefill_detail::append_chunk(cache, seq, in, n, t0, chunk_score, prompt_length, end);
}

/// Validates a whole prompt, then runs it in chunks of `chunk_size` tokens (padding included in
/// the count) through chunk_fn(cache, seq, chunk_inputs, prompt_length, chunk_outputs): the
/// driver of prefill below, shared with dms::cpu::prefill.
template <storage_type T, class P, class ChunkFn>
void prefill_in_chunks(paged_cache<T, P>& cache, int seq, const prefill_chunk_inputs& in,
                       int chunk_size, prefill_outputs o, ChunkFn&& chunk_fn) {
  const cache_config& cfg = cache.config();
  const std::size_t qrow = std::size_t(cfg.num_query_heads()) * cfg.head_dim;
  const std::size_t krow = std::size_t(cfg.num_kv_heads) * cfg.head_dim;
  const std::size_t H = std::size_t(cfg.num_query_heads()), Hk = std::size_t(cfg.num_kv_heads);
  detail::check_range("prefill: chunk_size", chunk_size, 1, 1 << 30);
  if (in.q.size() % qrow != 0)
    detail::fail("prefill: q has ", in.q.size(),
                 " elements, not a multiple of num_query_heads * head_dim = ", qrow);
  const int tokens = int(in.q.size() / qrow);
  // Validate the whole prompt before the first chunk runs, so a bad later chunk cannot leave the
  // earlier ones applied.
  detail::check_size("prefill: k", in.k.size(), tokens * krow);
  detail::check_size("prefill: v", in.v.size(), tokens * krow);
  detail::check_size("prefill: out", o.out.size(), tokens * qrow);
  if (!o.lse.empty()) detail::check_size("prefill: lse", o.lse.size(), std::size_t(tokens) * H);
  if (P::uses_decision_logits || !in.decision_logits.empty())
    detail::check_size("prefill: decision_logits", in.decision_logits.size(),
                       std::size_t(tokens) * Hk);
  if constexpr (P::uses_decision_logits)
    for (std::size_t i = std::size_t(in.padding) * Hk; i < in.decision_logits.size(); ++i)
      if (!std::isfinite(in.decision_logits[i]))
        detail::fail("prefill: decision_logits[", i / Hk, "][", i % Hk,
                     "] = ", in.decision_logits[i], " is not finite");
  detail::check_range("prefill: padding", in.padding, 0, tokens);
  const int Hq = cfg.num_query_heads(), Hkv = cfg.num_kv_heads, d = cfg.head_dim;
  prefill_detail::check_prompt_finite("prefill: q", in.q, Hq, d, in.padding, seq);
  prefill_detail::check_prompt_finite("prefill: k", in.k, Hkv, d, in.padding, seq);
  prefill_detail::check_prompt_finite("prefill: v", in.v, Hkv, d, in.padding, seq);
  (void)softmax_scale_or_default(o.softmax_scale, d);
  const std::int32_t t0 = cache.sequence(seq).row(0).tokens_seen();
  if (in.padding > 0 && t0 > 0)
    detail::fail("prefill: padding = ", in.padding, " but sequence ", seq, " already holds ", t0,
                 " tokens; left padding must precede every real token");
  // Checks t0 + tokens against the int32 position limit before prompt_length is formed.
  const int pages = check_prompt_capacity(
      cache, seq,
      P::uses_decision_logits ? in.decision_logits.subspan(std::size_t(in.padding) * Hk)
                              : std::span<const float>{},
      tokens - in.padding);
  const int prompt_length = t0 + (tokens - in.padding);
  // The whole prompt's pages, held until the last chunk has appended (see chunk_reservation).
  prefill_detail::chunk_reservation<paged_cache<T, P>> reservation(cache, seq, pages);
  for (int begin = 0; begin < tokens; begin += chunk_size) {
    const int len = std::min(chunk_size, tokens - begin);
    const auto part = [&](auto span, std::size_t per) {
      return span.size() == 0 ? span
                              : span.subspan(std::size_t(begin) * per, std::size_t(len) * per);
    };
    prefill_chunk_inputs chunk{part(in.q, qrow), part(in.k, krow), part(in.v, krow),
                               part(in.decision_logits, Hk),
                               std::clamp(in.padding - begin, 0, len)};
    chunk_fn(cache, seq, chunk, prompt_length,
             prefill_outputs{part(o.out, qrow), part(o.lse, H), o.softmax_scale});
  }
}

/// A whole prompt in chunks of `chunk_size` tokens (padding included in the count).
template <storage_type T, class P>
void prefill(paged_cache<T, P>& cache, int seq, const prefill_chunk_inputs& in, int chunk_size,
             prefill_outputs o) {
  prefill_in_chunks(
      cache, seq, in, chunk_size, o,
      [](paged_cache<T, P>& c, int s, const prefill_chunk_inputs& chunk, int prompt_length,
         prefill_outputs out) { prefill_chunk(c, s, chunk, prompt_length, out); });
}

}  // namespace reference
DMS_NAMESPACE_END
