// SPDX-License-Identifier: Apache-2.0
#pragma once

// The runner's engine: the model's layers around one dms::paged_cache per layer, and the
// evaluation and sequence-logit loops over it, as templates of the K/V storage type and the
// policy. Private to the runner: runner_f32.cpp, runner_bf16.cpp and runner_f16.cpp each
// instantiate it for one storage type (and all seven policies), so that the three compile in
// parallel; runner.cpp picks one at run time.

#include <algorithm>
#include <chrono>
#include <memory>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "dms/cpu.hpp"
#include "dms/dms.hpp"
#include "runner.hpp"

namespace mqar::engine_detail {

// ---- policies per layer ------------------------------------------------------------------

template <class P>
P make_policy(const policy_options& o, int layer, const model_weights& m) {
  if constexpr (std::is_same_v<P, dms::dense_policy>) {
    return {};
  } else if constexpr (std::is_same_v<P, dms::dms_policy>) {
    const int w = o.dms_window >= 0 ? o.dms_window : m.dms.present ? m.dms.window : 16;
    return P(dms::dms_params{.window = w});
  } else if constexpr (std::is_same_v<P, dms::tova_policy>) {
    return P(dms::tova_params{.budget = o.budget, .ranking = o.tova_ranking});
  } else if constexpr (std::is_same_v<P, dms::h2o_policy>) {
    return P(dms::h2o_params{.budget = o.budget,
                             .recent = o.h2o_recent >= 0 ? o.h2o_recent : o.budget / 2});
  } else if constexpr (std::is_same_v<P, dms::quest_policy>) {
    return P(dms::quest_params{
        .token_budget = o.budget, .layer = layer, .dense_layers = o.quest_dense_layers});
  } else if constexpr (std::is_same_v<P, dms::streaming_llm_policy>) {
    if (o.budget <= o.sinks)
      dms::detail::fail("StreamingLLM budget = ", o.budget, " must exceed sinks = ", o.sinks);
    return P(dms::streaming_params{.sinks = o.sinks, .recent = o.budget - o.sinks});
  } else {
    static_assert(std::is_same_v<P, dms::snapkv_policy>);
    return P(dms::snapkv_params{.capacity = o.budget,
                                .window = std::min(o.snapkv_window, o.budget),
                                .kernel = o.snapkv_kernel,
                                .pooling = o.snapkv_pooling});
  }
}

template <class F>
decltype(auto) with_policy_type(policy_kind k, F&& f) {
  switch (k) {
    case policy_kind::dense:
      return f(std::type_identity<dms::dense_policy>{});
    case policy_kind::dms:
      return f(std::type_identity<dms::dms_policy>{});
    case policy_kind::tova:
      return f(std::type_identity<dms::tova_policy>{});
    case policy_kind::h2o:
      return f(std::type_identity<dms::h2o_policy>{});
    case policy_kind::quest:
      return f(std::type_identity<dms::quest_policy>{});
    case policy_kind::streaming_llm:
      return f(std::type_identity<dms::streaming_llm_policy>{});
    case policy_kind::snapkv:
      break;
  }
  return f(std::type_identity<dms::snapkv_policy>{});
}

// ---- the engine ---------------------------------------------------------------------------

/// The model with one cache per layer. Sequence ids are the same in every layer's cache (each
/// hands out the lowest free id, and all of them see the same adds and removes).
template <dms::storage_type T, class P>
class engine {
 public:
  engine(const model_weights& m, const policy_options& po, const dms::cache_config& cfg,
         const run_options& o)
      : m_(m), cfg_(cfg), backend_(o.backend) {
    if (o.threads > 0) pool_ = std::make_unique<dms::cpu::thread_pool>(o.threads);
    exec_ = pool_ ? pool_.get() : &dms::cpu::default_executor();
    // A CPU engine: each row's pages in runs (dms/page_placement.hpp); the outputs do not depend
    // on where the pages lie.
    for (int l = 0; l < m.cfg.n_layers; ++l)
      caches_.emplace_back(cfg, make_policy<P>(po, l, m), dms::page_placement::adjacent);
    // The decision channel is read (and zeroed) for a DMS policy, and always for a retrofitted
    // checkpoint, whose attention was trained without that channel.
    readout_ = P::uses_decision_logits || m.dms.present;
    if (m.dms.present) readout_params_ = {m.dms.scale, m.dms.offset};
  }

  dms::paged_cache<T, P>& cache(int layer) { return caches_[std::size_t(layer)]; }
  [[nodiscard]] int layers() const { return int(caches_.size()); }

  int add_sequence() {
    const int id = caches_[0].add_sequence();
    for (std::size_t l = 1; l < caches_.size(); ++l) caches_[l].add_sequence();
    return id;
  }
  void remove_sequence(int seq) {
    for (auto& c : caches_) c.remove_sequence(seq);
  }

  /// Prefills tokens[0, n) of a prompt of n tokens in chunks; logits (optional): [n][vocab].
  void prefill(int seq, std::span<const int> tokens, int chunk, float* logits) {
    const int n = int(tokens.size());
    for (int b = 0; b < n; b += chunk) {
      const int len = std::min(chunk, n - b);
      prefill_chunk(seq, tokens.subspan(std::size_t(b), std::size_t(len)), n,
                    logits ? logits + std::size_t(b) * m_.cfg.vocab : nullptr);
    }
  }

  /// One decode step: token[i] appended to sequence seqs[i]; logits: [batch][vocab].
  void decode(std::span<const int> seqs, std::span<const int> tokens, float* logits) {
    const model_config& c = m_.cfg;
    const int B = int(seqs.size());
    x_.resize(std::size_t(B) * c.d_model);
    for (int i = 0; i < B; ++i)
      embed(tokens[std::size_t(i)], x_.data() + std::size_t(i) * c.d_model);
    std::vector<int> pos(static_cast<std::size_t>(B));
    for (int i = 0; i < B; ++i)
      pos[std::size_t(i)] = caches_[0].row(seqs[std::size_t(i)], 0).tokens_seen();
    for (int l = 0; l < layers(); ++l) {
      project(l, B, pos.data());
      if (backend_ == attention_backend::fast) {
        // The whole batch as one parallel job.
        const std::span<const float> lg =
            P::uses_decision_logits ? std::span<const float>(logit_) : std::span<const float>{};
        dms::cpu::decode_step(cache(l), seqs, q_, k_, v_, lg, out_, {}, *exec_);
        finish_layer(l, B);
        continue;
      }
      for (int i = 0; i < B; ++i) {
        const auto q = span_of(q_, i, c.q_dim()), out = span_of(out_, i, c.q_dim());
        const auto k = span_of(k_, i, c.kv_dim()), v = span_of(v_, i, c.kv_dim());
        const auto lg =
            P::uses_decision_logits ? span_of(logit_, i, c.n_kv_heads) : std::span<float>{};
        dms::reference::decode_step(cache(l), seqs[std::size_t(i)], as_const(q), as_const(k),
                                    as_const(v), as_const(lg), out);
      }
      finish_layer(l, B);
    }
    for (int i = 0; i < B; ++i)
      output_logits(x_.data() + std::size_t(i) * c.d_model, m_, h_.data(),
                    logits + std::size_t(i) * c.vocab);
  }

 private:
  static std::span<float> span_of(std::vector<float>& v, int i, int n) {
    return std::span<float>(v).subspan(std::size_t(i) * n, std::size_t(n));
  }
  static std::span<const float> as_const(std::span<float> s) { return s; }

  void embed(int token, float* x) const {
    if (token < 0 || token >= m_.cfg.vocab)
      dms::detail::fail("token ", token, " is outside the vocabulary [0, ", m_.cfg.vocab - 1, "]");
    std::copy_n(m_.embed.data() + std::size_t(token) * m_.cfg.d_model, m_.cfg.d_model, x);
  }

  // x_ [n][d_model] -> q_, k_, v_ (after RoPE) and the decision logits, for n tokens at pos[].
  void project(int l, int n, const int* pos) {
    const model_config& c = m_.cfg;
    const layer_weights& w = m_.layers[std::size_t(l)];
    q_.resize(std::size_t(n) * c.q_dim());
    k_.resize(std::size_t(n) * c.kv_dim());
    v_.resize(std::size_t(n) * c.kv_dim());
    logit_.resize(std::size_t(n) * c.n_kv_heads);
    out_.resize(std::size_t(n) * c.q_dim());
    h_.resize(std::max<std::size_t>(mlp_scratch_floats(c), std::size_t(c.d_model) * 2));
    for (int i = 0; i < n; ++i) {
      rmsnorm(x_.data() + std::size_t(i) * c.d_model, w.attn_norm.data(), c.d_model, c.norm_eps,
              h_.data());
      matvec(h_.data(), w.wq_t.data(), c.d_model, c.q_dim(),
             q_.data() + std::size_t(i) * c.q_dim());
      matvec(h_.data(), w.wk_t.data(), c.d_model, c.kv_dim(),
             k_.data() + std::size_t(i) * c.kv_dim());
      matvec(h_.data(), w.wv_t.data(), c.d_model, c.kv_dim(),
             v_.data() + std::size_t(i) * c.kv_dim());
    }
    const std::span<float> q(q_.data(), std::size_t(n) * c.q_dim());
    if (readout_) dms::take_decision_logits(q, std::span<float>(logit_), cfg_, readout_params_);
    for (int i = 0; i < n; ++i) {
      rope(q_.data() + std::size_t(i) * c.q_dim(), c.n_heads, pos[i], m_);
      rope(k_.data() + std::size_t(i) * c.kv_dim(), c.n_kv_heads, pos[i], m_);
    }
    if (readout_) dms::zero_decision_channels(q, cfg_);
  }

  // out_ [n][q_dim] -> x_ += W_o out, then the MLP block, for n tokens.
  void finish_layer(int l, int n) {
    const model_config& c = m_.cfg;
    const layer_weights& w = m_.layers[std::size_t(l)];
    for (int i = 0; i < n; ++i) {
      float* x = x_.data() + std::size_t(i) * c.d_model;
      matvec(out_.data() + std::size_t(i) * c.q_dim(), w.wo_t.data(), c.q_dim(), c.d_model,
             h_.data());
      for (int j = 0; j < c.d_model; ++j) x[j] += h_[std::size_t(j)];
      mlp_block(x, w, c, h_.data());
    }
  }

  void prefill_chunk(int seq, std::span<const int> tokens, int prompt_length, float* logits) {
    const model_config& c = m_.cfg;
    const int n = int(tokens.size());
    const int t0 = caches_[0].row(seq, 0).tokens_seen();
    x_.resize(std::size_t(n) * c.d_model);
    for (int i = 0; i < n; ++i)
      embed(tokens[std::size_t(i)], x_.data() + std::size_t(i) * c.d_model);
    std::vector<int> pos(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) pos[std::size_t(i)] = t0 + i;
    for (int l = 0; l < layers(); ++l) {
      project(l, n, pos.data());
      dms::reference::prefill_chunk_inputs in{
          .q = q_,
          .k = k_,
          .v = v_,
          .decision_logits =
              P::uses_decision_logits ? std::span<const float>(logit_) : std::span<const float>{}};
      if (backend_ == attention_backend::fast)
        dms::cpu::prefill_chunk(cache(l), seq, in, prompt_length, {.out = out_},
                                dms::reference::end_of_prompt::finish, *exec_);
      else
        dms::reference::prefill_chunk(cache(l), seq, in, prompt_length, {.out = out_});
      finish_layer(l, n);
    }
    if (logits)
      for (int i = 0; i < n; ++i)
        output_logits(x_.data() + std::size_t(i) * c.d_model, m_, h_.data(),
                      logits + std::size_t(i) * c.vocab);
  }

  const model_weights& m_;
  dms::cache_config cfg_;
  attention_backend backend_;
  std::unique_ptr<dms::cpu::thread_pool> pool_;
  dms::cpu::executor* exec_ = nullptr;
  std::vector<dms::paged_cache<T, P>> caches_;
  bool readout_ = false;
  dms::decision_readout readout_params_{};
  std::vector<float> x_, q_, k_, v_, logit_, out_, h_;
};

inline dms::cache_config cache_config_for(const model_weights& m, int length,
                                          const run_options& o) {
  dms::cache_config cfg;
  cfg.num_kv_heads = m.cfg.n_kv_heads;
  cfg.group_size = m.cfg.group_size();
  cfg.head_dim = m.cfg.head_dim;
  cfg.page_size = o.page_size;
  cfg.max_sequences = o.batch;
  cfg.max_row_slots = (length + o.page_size - 1) / o.page_size * o.page_size;
  const int dense_pages = o.batch * m.cfg.n_kv_heads * (cfg.max_row_slots / o.page_size);
  cfg.max_pages = o.max_pages > 0 ? o.max_pages : dense_pages;
  cfg.validate();
  return cfg;
}

inline int argmax(const float* x, int n) {
  return int(std::max_element(x, x + n) - x);  // the first maximum, as torch.argmax
}

template <dms::storage_type S, class P>
run_result evaluate_as(const model_weights& m, const eval_set& e, const policy_options& po,
                       const run_options& o) {
  dms::detail::check_range("first sequence", o.first, 0, e.sequences - 1);
  const int count = o.count < 0 ? e.sequences - o.first : o.count;
  dms::detail::check_range("sequence count", count, 1, e.sequences - o.first);
  dms::detail::check_range("batch", o.batch, 1, 1 << 16);
  dms::detail::check_range("chunk", o.chunk, 1, 1 << 20);
  const int P_len = e.prompt_length(), T = e.length, V = m.cfg.vocab;
  // The last token of a sequence is the last answer: it is scored, never fed.
  const int fed = T - 1;
  engine<S, P> eng(m, po, cache_config_for(m, fed, o), o);
  run_result r;
  r.policy = eng.cache(0).policy().name();
  std::vector<char> is_answer(std::size_t(T), 0);
  for (const int p : e.answer_positions) is_answer[std::size_t(p)] = 1;

  double ratio_sum = 0, peak_sum = 0, final_sum = 0;
  std::int64_t rows = 0;
  const auto t_start = std::chrono::steady_clock::now();
  std::vector<int> tokens(static_cast<std::size_t>(T)), ids, step_tokens;
  std::vector<float> logits;
  for (int w0 = o.first; w0 < o.first + count; w0 += o.batch) {
    const int B = std::min(o.batch, o.first + count - w0);
    ids.clear();
    for (int s = 0; s < B; ++s) {
      const std::uint8_t* seq = e.sequence(w0 + s);
      std::copy(seq, seq + P_len, tokens.begin());
      ids.push_back(eng.add_sequence());
      eng.prefill(ids.back(), std::span<const int>(tokens.data(), std::size_t(P_len)), o.chunk,
                  nullptr);
      r.prompt_tokens += P_len;
    }
    logits.resize(std::size_t(B) * V);
    step_tokens.resize(std::size_t(B));
    for (int p = P_len; p < fed; ++p) {
      for (int s = 0; s < B; ++s) step_tokens[std::size_t(s)] = e.sequence(w0 + s)[p];
      eng.decode(ids, step_tokens, logits.data());
      r.decode_tokens += B;
      if (!is_answer[std::size_t(p)]) continue;
      for (int s = 0; s < B; ++s) {
        r.answers += 1;
        r.correct += argmax(logits.data() + std::size_t(s) * V, V) == e.sequence(w0 + s)[p + 1];
      }
    }
    for (const int id : ids) {
      for (int l = 0; l < eng.layers(); ++l)
        for (int h = 0; h < m.cfg.n_kv_heads; ++h) {
          auto row = eng.cache(l).row(id, h);
          ratio_sum += double(row.live()) / row.tokens_seen();
          final_sum += row.live();
          peak_sum += eng.cache(l).row_peak(row.index());
          ++rows;
        }
      eng.remove_sequence(id);
    }
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  r.sequences = count;
  r.memory_cr = ratio_sum > 0 ? double(rows) / ratio_sum : 1.0;
  r.mean_peak_slots = peak_sum / double(rows);
  r.mean_final_slots = final_sum / double(rows);
  for (int l = 0; l < eng.layers(); ++l) r.kv_reads += eng.cache(l).stats().kv_token_reads;
  return r;
}

template <dms::storage_type S, class P>
std::vector<float> sequence_logits_as(const model_weights& m, const std::vector<int>& tokens,
                                      int prompt_length, const policy_options& p,
                                      const run_options& o) {
  const int T = int(tokens.size());
  run_options one = o;
  one.batch = 1;
  engine<S, P> eng(m, p, cache_config_for(m, T, one), one);
  const int V = m.cfg.vocab;
  std::vector<float> logits(std::size_t(T) * V);
  const int id = eng.add_sequence();
  eng.prefill(id, std::span<const int>(tokens.data(), std::size_t(prompt_length)), o.chunk,
              logits.data());
  for (int t = prompt_length; t < T; ++t) {
    const int seq[1] = {id}, tok[1] = {tokens[std::size_t(t)]};
    eng.decode(seq, tok, logits.data() + std::size_t(t) * V);
  }
  return logits;
}

/// The runner's two entry points for K/V stored as S, under every policy. Each storage type is
/// instantiated once, in its own file (runner_f32.cpp, runner_bf16.cpp, runner_f16.cpp); the
/// members are defined outside the class, so they are not inline and the `extern template`
/// below keeps every other file from instantiating them.
template <dms::storage_type S>
struct storage_runner {
  static run_result evaluate(const model_weights& m, const eval_set& e, const policy_options& p,
                             const run_options& o);
  static std::vector<float> sequence_logits(const model_weights& m, const std::vector<int>& tokens,
                                            int prompt_length, const policy_options& p,
                                            const run_options& o);
};

template <dms::storage_type S>
run_result storage_runner<S>::evaluate(const model_weights& m, const eval_set& e,
                                       const policy_options& p, const run_options& o) {
  return with_policy_type(
      p.kind, [&](auto pt) { return evaluate_as<S, typename decltype(pt)::type>(m, e, p, o); });
}

template <dms::storage_type S>
std::vector<float> storage_runner<S>::sequence_logits(const model_weights& m,
                                                      const std::vector<int>& tokens,
                                                      int prompt_length, const policy_options& p,
                                                      const run_options& o) {
  return with_policy_type(p.kind, [&](auto pt) {
    return sequence_logits_as<S, typename decltype(pt)::type>(m, tokens, prompt_length, p, o);
  });
}

extern template struct storage_runner<float>;
extern template struct storage_runner<dms::bfloat16>;
extern template struct storage_runner<dms::half>;

}  // namespace mqar::engine_detail
