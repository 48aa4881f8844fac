// SPDX-License-Identifier: Apache-2.0
#pragma once

// Reading DMS decision logits out of the query, as the released checkpoints do (spec "DMS", 1):
// after the per-head q RMSNorm, for each KV head g take query head g*G (the first of its group),
// channel d-1:  l = scale * q - offset,  then zero that channel. Call take_decision_logits before
// RoPE, and zero_decision_channels again after RoPE, because rotate-half RoPE mixes channel
// d/2-1 into d-1. Logits from any other source (a per-layer projection) go to the cache directly.

#include <cstddef>
#include <span>
#include <vector>

#include "dms/cache_config.hpp"
#include "dms/config.hpp"
#include "dms/error.hpp"
#include "dms/numeric.hpp"

DMS_NAMESPACE_BEGIN

struct decision_readout {
  float scale = 100.0f;  // Qwen3-8B-DMS-8x
  float offset = 5.0f;
};

/// One query head: returns scale * q[d-1] - offset and zeroes q[d-1].
template <class T>
DMS_HOST_DEVICE float take_decision_logit(T* q_head, int head_dim, decision_readout r) {
  const float logit = r.scale * to_float(q_head[head_dim - 1]) - r.offset;
  q_head[head_dim - 1] = from_float<T>(0.0f);
  return logit;
}

/// q is [tokens][num_query_heads][head_dim]; logits receives [tokens][num_kv_heads].
template <class T>
void take_decision_logits(std::span<T> q, std::span<float> logits, const cache_config& cfg,
                          decision_readout r = {}) {
  const std::size_t per_token = std::size_t(cfg.num_query_heads()) * cfg.head_dim;
  if (q.size() % per_token != 0)
    detail::fail("take_decision_logits: q has ", q.size(),
                 " elements, not a multiple of num_query_heads * head_dim = ", per_token);
  const std::size_t tokens = q.size() / per_token;
  detail::check_size("take_decision_logits: logits", logits.size(), tokens * cfg.num_kv_heads);
  for (std::size_t t = 0; t < tokens; ++t)
    for (int g = 0; g < cfg.num_kv_heads; ++g)
      logits[t * cfg.num_kv_heads + g] = take_decision_logit(
          q.data() + t * per_token + std::size_t(g) * cfg.group_size * cfg.head_dim, cfg.head_dim,
          r);
}

template <class T>
void take_decision_logits(std::vector<T>& q, std::vector<float>& logits, const cache_config& cfg,
                          decision_readout r = {}) {
  take_decision_logits(std::span<T>(q), std::span<float>(logits), cfg, r);
}

/// After RoPE: zero channel d-1 of the first query head of every group again.
template <class T>
void zero_decision_channels(std::span<T> q, const cache_config& cfg) {
  const std::size_t per_token = std::size_t(cfg.num_query_heads()) * cfg.head_dim;
  if (q.size() % per_token != 0)
    detail::fail("zero_decision_channels: q has ", q.size(),
                 " elements, not a multiple of num_query_heads * head_dim = ", per_token);
  for (std::size_t t = 0; t < q.size() / per_token; ++t)
    for (int g = 0; g < cfg.num_kv_heads; ++g)
      q[t * per_token + (std::size_t(g) * cfg.group_size + 1) * cfg.head_dim - 1] =
          from_float<T>(0.0f);
}

template <class T>
void zero_decision_channels(std::vector<T>& q, const cache_config& cfg) {
  zero_decision_channels(std::span<T>(q), cfg);
}

DMS_NAMESPACE_END
