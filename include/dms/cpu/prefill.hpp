// SPDX-License-Identifier: Apache-2.0
#pragma once

// CPU fast prefill: drop-in equivalents of dms::reference::prefill_chunk and prefill (same
// arguments, same validation and messages, same DMS visibility rule, same prompt scores for
// TOVA/H2O/SnapKV, the same appends and compress_prompt at the end of the prompt):
//   dms::reference::prefill(cache, seq, in, chunk, out);
//   dms::cpu::prefill(cache, seq, in, chunk, out);          // default thread pool
//   dms::cpu::prefill(cache, seq, in, chunk, out, my_exec); // an engine's executor
// Per chunk: (1) a row plan lists the keys each row's queries attend to (cached live slots, then
// the chunk's tokens rounded to the storage type) with their visibility intervals; (2) one
// parallel job of flash-attention tiles over (row, query block); (3) for policies that keep
// scores, one job over (row, key block) that recomputes the probabilities the policy folds;
// (4) the chunk's appends, exactly as the reference does them. Results equal the reference's
// within float rounding and are bit for bit the same for any thread count.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "dms/config.hpp"
#include "dms/cpu/executor.hpp"
#include "dms/cpu/prefill_kernel.hpp"
#include "dms/cpu/simd/level.hpp"
#include "dms/cpu/thread_pool.hpp"
#include "dms/error.hpp"
#include "dms/numeric.hpp"
#include "dms/paged_cache.hpp"
#include "dms/policy/dms.hpp"
#include "dms/reference/attend.hpp"
#include "dms/reference/prefill.hpp"

DMS_NAMESPACE_BEGIN
namespace cpu {

using reference::end_of_prompt;
using reference::prefill_chunk_inputs;
using reference::prefill_outputs;

namespace detail {

/// Query rows per flash tile (queries x group heads), so a tile's Q and O stay in L2.
inline constexpr int prefill_tile_rows = 128;

constexpr int prefill_queries_per_tile(int group) {
  return group >= prefill_tile_rows ? 1 : prefill_tile_rows / group;
}

/// One row's key list and its visibility intervals, rebuilt per chunk.
template <class T>
struct prefill_row {
  std::vector<const T*> k, v;
  std::vector<std::int32_t> position, deadline;
  std::vector<std::int32_t> min_pos, max_pos, min_dl, max_dl;
  std::vector<float*> target;  // where each key's score lives (cached slot or chunk_score)
  int cached = 0;              // keys that are cached slots (the rest are chunk tokens)

  prefill_keys<T> keys() const {
    return {k.data(),       v.data(),      position.data(), deadline.data(), min_pos.data(),
            max_pos.data(), min_dl.data(), max_dl.data(),   int(k.size())};
  }
};

}  // namespace detail

/// Drop-in for dms::reference::prefill_chunk: one chunk of a prompt of `prompt_length` real
/// (unpadded) tokens; the policy's compress_prompt runs after the chunk that completes it unless
/// `end` is defer.
template <storage_type T, class P>
void prefill_chunk(paged_cache<T, P>& cache, int seq, const prefill_chunk_inputs& in,
                   int prompt_length, prefill_outputs o, end_of_prompt end = end_of_prompt::finish,
                   executor& exec = default_executor()) {
  constexpr int kb = detail::prefill_key_block;
  constexpr std::int32_t never = std::numeric_limits<std::int32_t>::max();
  const cache_config& cfg = cache.config();
  const int Hk = cfg.num_kv_heads, G = cfg.group_size, d = cfg.head_dim, H = Hk * G;
  const std::size_t qrow = std::size_t(H) * d, krow = std::size_t(Hk) * d;
  const auto [tokens, pages] = reference::check_prefill_chunk(cache, seq, in, prompt_length, o);
  // The chunk's pages, held while it appends (other sequences may append on other threads).
  reference::prefill_detail::chunk_reservation<paged_cache<T, P>> reservation(cache, seq, pages);
  auto seq_ref = cache.sequence(seq);
  const std::int32_t t0 = seq_ref.row(0).tokens_seen();
  const int n = tokens - in.padding;  // real tokens in the chunk
  const float scale = reference::softmax_scale_or_default(o.softmax_scale, d);

  std::fill(o.out.begin(), o.out.begin() + std::ptrdiff_t(in.padding) * qrow, 0.0f);
  if (!o.lse.empty())
    std::fill(o.lse.begin(), o.lse.begin() + std::ptrdiff_t(in.padding) * H,
              -std::numeric_limits<float>::infinity());

  const detail::prefill_kernels<T> kernels = detail::prefill_kernels_for<T>(active_simd_level());
  const int cw = 2 * kernels.width;
  const int dpad = (d + cw - 1) / cw * cw;
  const auto view = cache.view();

  // The chunk's K/V rounded to the storage type: what the reference attends to and what append
  // will store (for f32 storage, the inputs themselves).
  std::vector<T> chunk_k, chunk_v;
  const T* ck = nullptr;
  const T* cv = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    ck = in.k.data() + std::size_t(in.padding) * krow;
    cv = in.v.data() + std::size_t(in.padding) * krow;
  } else {
    chunk_k.resize(std::size_t(n) * krow);
    chunk_v.resize(std::size_t(n) * krow);
    auto round = [&](std::size_t i) {
      const std::size_t at = std::size_t(in.padding) * krow + i * krow;
      for (std::size_t x = 0; x < krow; ++x) {
        chunk_k[i * krow + x] = from_float<T>(in.k[at + x]);
        chunk_v[i * krow + x] = from_float<T>(in.v[at + x]);
      }
    };
    exec.parallel_for(std::size_t(n), task_ref(round));
    ck = chunk_k.data();
    cv = chunk_v.data();
  }

  // Row plans: cached live slots in slot order, then the chunk's tokens; visibility intervals
  // from the causal rule and, for decision-logit policies, the DMS rule (flags of cached tokens
  // from the policy's ring, the chunk's from its logits: the logit of token t flags token t-1).
  std::vector<detail::prefill_row<T>> rows(static_cast<std::size_t>(Hk));
  std::vector<float> chunk_score(std::size_t(Hk) * n, 0.0f);
  for (int h = 0; h < Hk; ++h) {
    auto& row = seq_ref.row(h);
    const int r = row.index();
    detail::prefill_row<T>& rp = rows[std::size_t(h)];
    const auto logit = [&](int i) {
      return in.decision_logits[std::size_t(in.padding + i) * Hk + std::size_t(h)];
    };
    const auto deadline = [&](std::int32_t pos, bool flagged) {
      if constexpr (P::uses_decision_logits) {
        if (!flagged) return never;
        const std::int64_t dl = std::int64_t(pos) + cache.policy().window();
        return dl >= never ? never : std::int32_t(dl);
      } else {
        (void)pos, (void)flagged;
        return never;
      }
    };
    for (int s = 0; s < row.length(); ++s) {
      const std::int32_t pos = row.position(s);
      if (pos < 0) continue;
      rp.k.push_back(view.key(r, s));
      rp.v.push_back(view.value(r, s));
      rp.position.push_back(pos);
      bool flagged = false;
      if constexpr (P::uses_decision_logits)
        flagged = pos == t0 - 1 ? n > 0 && dms_rule::evicts(logit(0))
                                : cache.policy().flagged(row.state(), pos, t0);
      rp.deadline.push_back(deadline(pos, flagged));
      if constexpr (P::keeps_scores) rp.target.push_back(&view.score[view.slot_index(r, s)]);
    }
    rp.cached = int(rp.k.size());
    for (int i = 0; i < n; ++i) {
      rp.k.push_back(ck + std::size_t(i) * krow + std::size_t(h) * d);
      rp.v.push_back(cv + std::size_t(i) * krow + std::size_t(h) * d);
      rp.position.push_back(t0 + i);
      bool flagged = false;
      if constexpr (P::uses_decision_logits) flagged = i + 1 < n && dms_rule::evicts(logit(i + 1));
      rp.deadline.push_back(deadline(t0 + i, flagged));
      if constexpr (P::keeps_scores)
        rp.target.push_back(&chunk_score[std::size_t(h) * n + std::size_t(i)]);
    }
    const int count = int(rp.k.size()), blocks = (count + kb - 1) / kb;
    rp.position.resize(std::size_t(blocks) * kb, never);
    rp.deadline.resize(std::size_t(blocks) * kb, std::numeric_limits<std::int32_t>::min());
    for (int b = 0; b < blocks; ++b) {
      const int lo = b * kb, hi = std::min(count, lo + kb);
      const auto pos = rp.position.begin(), dl = rp.deadline.begin();
      rp.min_pos.push_back(*std::min_element(pos + lo, pos + hi));
      rp.max_pos.push_back(*std::max_element(pos + lo, pos + hi));
      rp.min_dl.push_back(*std::min_element(dl + lo, dl + hi));
      rp.max_dl.push_back(*std::max_element(dl + lo, dl + hi));
    }
  }

  // Flash attention: one job over (row, query tile).
  const int qb = detail::prefill_queries_per_tile(G);
  const int tiles = (n + qb - 1) / qb;
  std::vector<float> lse(std::size_t(Hk) * n * G);
  const float* q0 = in.q.data() + std::size_t(in.padding) * qrow;
  float* out0 = o.out.data() + std::size_t(in.padding) * qrow;
  auto attend = [&](std::size_t item) {
    const int h = int(item) / tiles, tile = int(item) % tiles;
    const detail::prefill_row<T>& rp = rows[std::size_t(h)];
    const int i0 = tile * qb, i1 = std::min(n, i0 + qb);
    const detail::prefill_tile_args<T> args{rp.keys(),
                                            d,
                                            dpad,
                                            G,
                                            i0,
                                            i1,
                                            rp.cached + i1,
                                            t0,
                                            q0 + std::size_t(h) * G * d,
                                            qrow,
                                            scale,
                                            out0 + std::size_t(h) * G * d,
                                            qrow,
                                            lse.data() + std::size_t(h) * n * G};
    kernels.tile(args);
  };
  exec.parallel_for(std::size_t(Hk) * tiles, task_ref(attend));
  if (!o.lse.empty())
    for (int i = 0; i < n; ++i)
      for (int h = 0; h < Hk; ++h)
        for (int g = 0; g < G; ++g)
          o.lse[std::size_t(in.padding + i) * H + std::size_t(h) * G + g] =
              lse[(std::size_t(h) * n + i) * G + g];

  // Prompt scores: one job over (row, key block), for the queries the policy folds.
  if constexpr (P::keeps_scores) {
    std::vector<std::uint8_t> how(static_cast<std::size_t>(n));
    bool any = false;
    for (int i = 0; i < n; ++i) {
      how[std::size_t(i)] = std::uint8_t(cache.policy().score_for_query(t0 + i, prompt_length));
      any = any || how[std::size_t(i)] != 0;
    }
    if (any) {
      std::vector<int> first_block(std::size_t(Hk) + 1, 0);
      for (int h = 0; h < Hk; ++h)
        first_block[std::size_t(h) + 1] =
            first_block[std::size_t(h)] + int(rows[std::size_t(h)].min_pos.size());
      auto score = [&](std::size_t item) {
        const int h = int(std::upper_bound(first_block.begin(), first_block.end(), int(item)) -
                          first_block.begin()) -
                      1;
        const detail::prefill_row<T>& rp = rows[std::size_t(h)];
        const detail::prefill_score_args<T> args{rp.keys(),
                                                 int(item) - first_block[std::size_t(h)],
                                                 d,
                                                 dpad,
                                                 G,
                                                 qb,
                                                 n,
                                                 t0,
                                                 q0 + std::size_t(h) * G * d,
                                                 qrow,
                                                 scale,
                                                 lse.data() + std::size_t(h) * n * G,
                                                 how.data(),
                                                 rp.target.data()};
        kernels.scores(args);
      };
      exec.parallel_for(std::size_t(first_block.back()), task_ref(score));
    }
  }

  reference::prefill_detail::append_chunk(cache, seq, in, n, t0, chunk_score, prompt_length, end);
}

/// Drop-in for dms::reference::prefill: a whole prompt in chunks of `chunk_size` tokens (padding
/// included in the count), validated as a whole before the first chunk runs.
template <storage_type T, class P>
void prefill(paged_cache<T, P>& cache, int seq, const prefill_chunk_inputs& in, int chunk_size,
             prefill_outputs o, executor& exec = default_executor()) {
  reference::prefill_in_chunks(
      cache, seq, in, chunk_size, o,
      [&exec](paged_cache<T, P>& c, int s, const prefill_chunk_inputs& chunk, int prompt_length,
              prefill_outputs out) {
        prefill_chunk(c, s, chunk, prompt_length, out, end_of_prompt::finish, exec);
      });
}

}  // namespace cpu
DMS_NAMESPACE_END
