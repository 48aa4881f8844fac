// SPDX-License-Identifier: Apache-2.0
#pragma once

// The arithmetic core of the CPU reference: G query heads attend to n packed keys. fp32 all the
// way, max-subtracted (stable) softmax, log-sum-exp out. Keys come transposed ([d][n]) so the
// logits accumulate across independent keys in the inner loop — that vectorizes without the
// reassociation a per-key dot product would need — and values come [n][d] for the same reason.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "dms/config.hpp"
#include "dms/error.hpp"

DMS_NAMESPACE_BEGIN
namespace reference {

/// q: [G][d]; kt: [d][ldk] keys transposed (key j of channel c at kt[c * ldk + j]);
/// v: [n][d] values; visible: [n] (nullptr = all visible).
/// Writes out: [G][d], lse: [G] (natural log; -inf when nothing is visible, with out = 0) and
/// probs: [G][n] normalized probabilities (0 for invisible keys). probs doubles as scratch.
inline void attend_group(const float* q, int G, int d, const float* kt, int ldk, const float* v,
                         int n, const std::uint8_t* visible, float scale, float* out, float* lse,
                         float* probs) {
  std::fill(out, out + std::size_t(G) * d, 0.0f);
  for (int g = 0; g < G; ++g) {
    const float* qg = q + std::size_t(g) * d;
    float* pg = probs + std::size_t(g) * n;
    // Tiles of keys keep the partial logits in L1 (or registers) across the d channel passes.
    constexpr int tile = 64;
    for (int j0 = 0; j0 < n; j0 += tile) {
      const int len = std::min(tile, n - j0);
      float acc[tile] = {};
      for (int c = 0; c < d; ++c) {
        const float qc = qg[c] * scale;
        const float* kc = kt + std::size_t(c) * ldk + j0;
        for (int j = 0; j < len; ++j) acc[j] += qc * kc[j];
      }
      std::copy_n(acc, len, pg + j0);
    }
    float m = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < n; ++j) {
      if (visible && !visible[j]) pg[j] = -std::numeric_limits<float>::infinity();
      m = std::max(m, pg[j]);
    }
    if (m == -std::numeric_limits<float>::infinity()) {  // nothing visible
      std::fill(pg, pg + n, 0.0f);
      lse[g] = m;
      continue;
    }
    float sum = 0.0f;
    for (int j = 0; j < n; ++j) {
      pg[j] = std::exp(pg[j] - m);  // exp(-inf) = 0 for invisible keys
      sum += pg[j];
    }
    const float inv = 1.0f / sum;
    float* og = out + std::size_t(g) * d;
    for (int j = 0; j < n; ++j) {
      pg[j] *= inv;
      const float p = pg[j];
      const float* vj = v + std::size_t(j) * d;
      for (int c = 0; c < d; ++c) og[c] += p * vj[c];
    }
    lse[g] = m + std::log(sum);
  }
}

/// 1 / sqrt(head_dim) for scale 0 (the default), else the caller's scale, which must be finite
/// and > 0: a negative or non-finite scale is a dms::error, not silently replaced.
inline float softmax_scale_or_default(float scale, int head_dim) {
  if (scale == 0.0f) return 1.0f / std::sqrt(float(head_dim));
  if (!(scale > 0.0f) || !std::isfinite(scale))
    detail::fail(
        "softmax_scale = ", scale,
        " is outside the valid range: 0 (meaning 1 / sqrt(head_dim)) or a finite value > 0");
  return scale;
}

}  // namespace reference
DMS_NAMESPACE_END
