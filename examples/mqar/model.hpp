// SPDX-License-Identifier: Apache-2.0
#pragma once

// The tiny Llama-style MQAR model on the CPU, as in llama2.c: a config, the weights, and the
// per-token math of one layer (RMSNorm -> q/k/v -> RoPE | attention | output -> SwiGLU MLP).
// Attention itself is not here: the runner (runner.hpp) hands q/k/v to a dms::paged_cache, one
// per layer, through the library's prefill and decode entry points. The math mirrors
// examples/mqar/train/model.py operation for operation (fp32, RoPE tables computed in double and
// rounded once), so the C++ logits equal torch's to about 1e-6.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "dms/error.hpp"
#include "json.hpp"
#include "safetensors.hpp"

namespace mqar {

struct model_config {
  int vocab = 256;
  int d_model = 128;
  int n_layers = 2;
  int n_heads = 4;
  int n_kv_heads = 2;
  int head_dim = 32;
  int mlp_hidden = 128;
  double rope_base = 10000.0;
  float norm_eps = 1e-5f;

  [[nodiscard]] int group_size() const { return n_heads / n_kv_heads; }
  [[nodiscard]] int q_dim() const { return n_heads * head_dim; }
  [[nodiscard]] int kv_dim() const { return n_kv_heads * head_dim; }
};

/// What a DMS-retrofitted checkpoint says about its decisions (absent on the dense model).
struct dms_checkpoint_info {
  bool present = false;
  int window = 0;        // the w the checkpoint was trained with (its dms_window_size)
  float scale = 100.0f;  // decision readout: l = scale * q[g*G][d-1] - offset
  float offset = 5.0f;
};

struct layer_weights {
  std::vector<float> attn_norm;  // [d_model]
  std::vector<float> wq_t;       // [d_model][q_dim]   transposed from torch's [out][in]
  std::vector<float> wk_t;       // [d_model][kv_dim]
  std::vector<float> wv_t;       // [d_model][kv_dim]
  std::vector<float> wo_t;       // [q_dim][d_model]
  std::vector<float> mlp_norm;   // [d_model]
  std::vector<float> w_gate_t;   // [d_model][mlp_hidden]
  std::vector<float> w_up_t;     // [d_model][mlp_hidden]
  std::vector<float> w_down_t;   // [mlp_hidden][d_model]
};

struct model_weights {
  model_config cfg;
  dms_checkpoint_info dms;
  std::string name;
  std::vector<float> embed;  // [vocab][d_model], tied with the output head
  std::vector<float> norm;   // [d_model]
  std::vector<layer_weights> layers;
  std::vector<float> rope_cos, rope_sin;  // [max_positions][head_dim / 2]
  int max_positions = 0;
};

namespace detail {

// torch's Linear stores [out][in]; the matmul below wants [in][out] so that its inner loop runs
// over independent outputs (vectorizable without reassociating any sum).
inline std::vector<float> transposed(const std::vector<float>& w, int out, int in) {
  std::vector<float> t(w.size());
  for (int o = 0; o < out; ++o)
    for (int i = 0; i < in; ++i) t[std::size_t(i) * out + o] = w[std::size_t(o) * in + i];
  return t;
}

inline int config_int(const json::value& c, const char* key, int lo, int hi) {
  return int(c.at(key, "model config").as_int(std::string("model config ") + key, lo, hi));
}

}  // namespace detail

/// Reads and checks a checkpoint written by examples/mqar/train (config in the metadata).
inline model_weights load_model(const safetensors_file& f, int max_positions = 4096) {
  model_weights m;
  m.name = f.name();
  if (!f.has_metadata("config")) dms::detail::fail(f.name(), ": no \"config\" in the metadata");
  const json::value c = json::parse(f.metadata("config"));
  model_config& cfg = m.cfg;
  cfg.vocab = detail::config_int(c, "vocab", 1, 1 << 20);
  cfg.d_model = detail::config_int(c, "d_model", 1, 1 << 14);
  cfg.n_layers = detail::config_int(c, "n_layers", 1, 256);
  cfg.n_heads = detail::config_int(c, "n_heads", 1, 1024);
  cfg.n_kv_heads = detail::config_int(c, "n_kv_heads", 1, cfg.n_heads);
  cfg.head_dim = detail::config_int(c, "head_dim", 2, 1024);
  cfg.mlp_hidden = detail::config_int(c, "mlp_hidden", 1, 1 << 16);
  cfg.rope_base = c.at("rope_base", "model config").as_number("rope_base");
  cfg.norm_eps = float(c.at("norm_eps", "model config").as_number("norm_eps"));
  if (cfg.n_heads % cfg.n_kv_heads != 0)
    dms::detail::fail(f.name(), ": n_heads = ", cfg.n_heads,
                      " is not a multiple of n_kv_heads = ", cfg.n_kv_heads);
  if (cfg.head_dim % 2 != 0) dms::detail::fail(f.name(), ": head_dim = ", cfg.head_dim, " is odd");
  if (!(cfg.rope_base > 1.0) || !(cfg.norm_eps > 0.0f))
    dms::detail::fail(f.name(), ": rope_base = ", cfg.rope_base, ", norm_eps = ", cfg.norm_eps,
                      " (need rope_base > 1, norm_eps > 0)");

  if (f.has_metadata("dms")) {
    const json::value d = json::parse(f.metadata("dms"));
    m.dms.present = true;
    m.dms.window = int(d.at("window", "dms metadata").as_int("dms window", 0, 1 << 20));
    m.dms.scale = float(d.at("scale", "dms metadata").as_number("dms scale"));
    m.dms.offset = float(d.at("offset", "dms metadata").as_number("dms offset"));
  }

  const std::int64_t D = cfg.d_model, V = cfg.vocab, Q = cfg.q_dim(), K = cfg.kv_dim(),
                     F = cfg.mlp_hidden;
  m.embed = f.load<float>("embed.weight", {V, D});
  m.norm = f.load<float>("norm.weight", {D});
  for (int l = 0; l < cfg.n_layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    layer_weights w;
    w.attn_norm = f.load<float>(p + "attn_norm.weight", {D});
    w.wq_t = detail::transposed(f.load<float>(p + "wq.weight", {Q, D}), int(Q), int(D));
    w.wk_t = detail::transposed(f.load<float>(p + "wk.weight", {K, D}), int(K), int(D));
    w.wv_t = detail::transposed(f.load<float>(p + "wv.weight", {K, D}), int(K), int(D));
    w.wo_t = detail::transposed(f.load<float>(p + "wo.weight", {D, Q}), int(D), int(Q));
    w.mlp_norm = f.load<float>(p + "mlp_norm.weight", {D});
    w.w_gate_t = detail::transposed(f.load<float>(p + "w_gate.weight", {F, D}), int(F), int(D));
    w.w_up_t = detail::transposed(f.load<float>(p + "w_up.weight", {F, D}), int(F), int(D));
    w.w_down_t = detail::transposed(f.load<float>(p + "w_down.weight", {D, F}), int(D), int(F));
    m.layers.push_back(std::move(w));
  }
  const std::size_t expected_tensors = 2 + 9 * std::size_t(cfg.n_layers);
  if (f.tensors().size() != expected_tensors)
    dms::detail::fail(f.name(), ": ", f.tensors().size(), " tensors; a ", cfg.n_layers,
                      "-layer model has ", expected_tensors);
  for (const auto& t : f.tensors()) {
    const auto w = f.load<float>(t.name);
    for (std::size_t i = 0; i < w.size(); ++i)
      if (!std::isfinite(w[i]))
        dms::detail::fail(f.name(), ": tensor \"", t.name, "\" element ", i, " is not finite");
  }

  // RoPE tables in double, rounded once (as model.py's rope_tables).
  m.max_positions = max_positions;
  const int half = cfg.head_dim / 2;
  m.rope_cos.resize(std::size_t(max_positions) * half);
  m.rope_sin.resize(std::size_t(max_positions) * half);
  for (int i = 0; i < half; ++i) {
    const double inv = 1.0 / std::pow(cfg.rope_base, double(2 * i) / cfg.head_dim);
    for (int p = 0; p < max_positions; ++p) {
      m.rope_cos[std::size_t(p) * half + i] = float(std::cos(double(p) * inv));
      m.rope_sin[std::size_t(p) * half + i] = float(std::sin(double(p) * inv));
    }
  }
  return m;
}

// ---- the per-token math ----------------------------------------------------------------------

/// y[out] = x[in] . w_t[in][out]: each output sums its products in input order.
inline void matvec(const float* x, const float* w_t, int in, int out, float* y) {
  std::fill(y, y + out, 0.0f);
  for (int i = 0; i < in; ++i) {
    const float xi = x[i];
    const float* wi = w_t + std::size_t(i) * out;
    for (int o = 0; o < out; ++o) y[o] += xi * wi[o];
  }
}

inline void rmsnorm(const float* x, const float* w, int n, float eps, float* y) {
  float ss = 0.0f;
  for (int i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.0f / std::sqrt(ss / float(n) + eps);
  for (int i = 0; i < n; ++i) y[i] = x[i] * r * w[i];
}

/// Rotate-half RoPE on `heads` heads of head_dim channels at `position`.
inline void rope(float* x, int heads, int position, const model_weights& m) {
  const int d = m.cfg.head_dim, half = d / 2;
  if (position < 0 || position >= m.max_positions)
    dms::detail::fail("rope: position ", position, " is outside [0, ", m.max_positions - 1, "]");
  const float* c = m.rope_cos.data() + std::size_t(position) * half;
  const float* s = m.rope_sin.data() + std::size_t(position) * half;
  for (int h = 0; h < heads; ++h) {
    float* v = x + std::size_t(h) * d;
    for (int i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * c[i] - b * s[i];
      v[i + half] = b * c[i] + a * s[i];
    }
  }
}

inline float silu(float x) {
  return x / (1.0f + std::exp(-x));
}

/// x += W_down(silu(W_gate h) * W_up h), h = rmsnorm(x): the MLP block of one token.
inline void mlp_block(float* x, const layer_weights& w, const model_config& c, float* scratch) {
  float* h = scratch;
  float* g = h + c.d_model;
  float* u = g + c.mlp_hidden;
  float* o = u + c.mlp_hidden;
  rmsnorm(x, w.mlp_norm.data(), c.d_model, c.norm_eps, h);
  matvec(h, w.w_gate_t.data(), c.d_model, c.mlp_hidden, g);
  matvec(h, w.w_up_t.data(), c.d_model, c.mlp_hidden, u);
  for (int i = 0; i < c.mlp_hidden; ++i) g[i] = silu(g[i]) * u[i];
  matvec(g, w.w_down_t.data(), c.mlp_hidden, c.d_model, o);
  for (int i = 0; i < c.d_model; ++i) x[i] += o[i];
}
inline std::size_t mlp_scratch_floats(const model_config& c) {
  return 2 * std::size_t(c.d_model) + 2 * std::size_t(c.mlp_hidden);
}

/// logits[vocab] = rmsnorm(x) . embed^T (tied output head).
inline void output_logits(const float* x, const model_weights& m, float* h, float* logits) {
  const model_config& c = m.cfg;
  rmsnorm(x, m.norm.data(), c.d_model, c.norm_eps, h);
  for (int t = 0; t < c.vocab; ++t) {
    const float* e = m.embed.data() + std::size_t(t) * c.d_model;
    float acc = 0.0f;
    for (int i = 0; i < c.d_model; ++i) acc += h[i] * e[i];
    logits[t] = acc;
  }
}

}  // namespace mqar
