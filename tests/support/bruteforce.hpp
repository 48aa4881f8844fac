// SPDX-License-Identifier: Apache-2.0
#pragma once

// The independent brute-force model of every policy (written from the spec, policies.md) and the
// driver that runs a random scenario on the library and on the model side by side. Shared by
// tests/test_bruteforce.cpp (random scenarios), the fuzz target and the stress run (tests/fuzz/).
//
// The brute force shares no code with the library: it simulates each policy on SETS OF KEPT
// POSITIONS per row (not slots), straight from the spec's rules, and computes dense attention in
// double over exactly the positions a query may read. After every event the positions each row
// holds, the attention outputs and lse, and the KV-token reads must agree.
//
// Float rounding: the library ranks in float, the brute force in double. Where two scores at a
// ranking cut differ by less than rounding could explain, the library's choice is accepted if it is
// one of the valid ones (drops() below); exact ties always follow the spec's tie rule.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "dms/dms.hpp"
#include "image_compare.hpp"

namespace dms_bf {

constexpr double kInf = std::numeric_limits<double>::infinity();

/// splitmix64 + Box-Muller: the same numbers on every platform, so a seed reproduces.
struct rng {
  std::uint64_t s;
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  double uniform() { return double(next() >> 11) * 0x1.0p-53; }
  int between(int lo, int hi) { return lo + int(next() % std::uint64_t(hi - lo + 1)); }
  float normal() {
    const double u1 = uniform(), u2 = uniform();
    return float(std::sqrt(-2.0 * std::log1p(-u1)) * std::cos(6.283185307179586 * u2));
  }
};

enum class kind { dense, dms, tova, tova_layer, h2o, streaming, quest, snapkv };
inline constexpr const char* kind_name[] = {"dense", "DMS",          "TOVA",  "TOVA-layer",
                                            "H2O",   "StreamingLLM", "Quest", "SnapKV"};

/// The brute force's own copy of a policy's parameters.
struct model {
  kind k = kind::dense;
  int window = 0;                   // DMS w; SnapKV observation window W
  int budget = 0;                   // TOVA B; H2O budget; Quest token budget; SnapKV capacity C
  int recent = 0;                   // H2O recent; StreamingLLM R
  int sinks = 0;                    // StreamingLLM S
  int layer = 0, dense_layers = 0;  // Quest
  int kernel = 1;                   // SnapKV pooling width
  bool max_pool = true;             // SnapKV pooling
};

inline std::ostream& operator<<(std::ostream& os, const model& m) {
  return os << kind_name[int(m.k)] << "{window=" << m.window << " budget=" << m.budget
            << " recent=" << m.recent << " sinks=" << m.sinks << " layer=" << m.layer << "/"
            << m.dense_layers << " kernel=" << m.kernel << (m.max_pool ? " max" : " avg") << "}";
}

struct shape {
  int Hk, G, d, P;  // KV heads, group size, head_dim, page size
};

/// How the random data looks.
struct gen_opts {
  double logit_bias = 0;  // DMS logits ~ N(bias, 1): +8 flags ~all, -8 ~none
  double dup_prob = 0;    // a key copies an earlier key of its row: exact score ties
  double qzero_prob = 0;  // an all-zero query: uniform attention, every ranking tied
  double qscale = 1;      // larger = peakier attention
};

struct token {
  std::vector<float> q, k, v, l;  // as given to the library: [H*d], [Hk*d], [Hk*d], [Hk]
  std::vector<double> kr, vr;     // k, v as the cache stores them (rounded to its storage type)
};

/// One sequence in the brute force.
struct bf_seq {
  std::vector<token> tok;                  // every real token, by position
  std::vector<std::vector<char>> kept;     // [row][position]
  std::vector<std::vector<double>> score;  // [row][position]: TOVA / H2O / SnapKV scores
};

/// What the library decided, for the brute force to settle float near-ties against.
struct lib_view {
  std::function<std::set<int>(int)> kept;      // positions a row holds now
  std::function<std::vector<int>(int)> pages;  // Quest: the pages the last query read
};

inline int g_deferred = 0;  // near-ties settled by accepting the library's (valid) choice

/// The ids of the `count` items to drop: lowest score first, ties -> smaller id first (the spec's
/// "oldest goes first"). If the cut falls between scores that differ by less than float rounding
/// could explain (but not exactly equal), any valid choice is right: adopt the library's.
/// exact_ties = false: equal scores here need not be equal in float (SnapKV's average pooling
/// sums the same values in a different order for neighbouring windows), so they are near-ties
/// too.
inline std::vector<int> drops(std::vector<std::pair<double, int>> items, int count,
                              const std::set<int>& lib_kept, double abs_tol = 1e-12,
                              bool exact_ties = true) {
  std::sort(items.begin(), items.end());
  const int n = int(items.size());
  count = std::clamp(count, 0, n);
  std::vector<int> strict;
  for (int i = 0; i < count; ++i) strict.push_back(items[i].second);
  if (count == 0 || count == n) return strict;
  const double lo = items[count - 1].first, hi = items[count].first;
  const double tol = 1e-4 * std::max(std::abs(lo), std::abs(hi)) + abs_tol;
  if (hi - lo > tol) return strict;
  bool exact = true, valid = true;
  std::vector<int> lib_drop;
  for (const auto& [sc, id] : items) {
    const bool dropped = lib_kept.count(id) == 0;
    if (dropped) lib_drop.push_back(id);
    if (sc < lo - tol)
      valid &= dropped;
    else if (sc > hi + tol)
      valid &= !dropped;
    else
      exact &= exact_ties && sc == lo;
  }
  if (exact || !valid || int(lib_drop.size()) != count) return strict;
  ++g_deferred;
  return lib_drop;
}

/// Dense softmax attention in double of the G query heads of row h of token qt over `keys`.
/// out: [G*d], lse: [G]; psum[i] = probability of keys[i] summed over the G heads.
inline void attend(const bf_seq& s, const shape& sh, int qt, int h, const std::vector<int>& keys,
                   double* out, double* lse, std::vector<double>& psum) {
  const int d = sh.d;
  const double scale = 1.0 / std::sqrt(double(d));
  const std::size_t n = keys.size();
  psum.assign(n, 0.0);
  std::vector<double> x(n);
  for (int g = 0; g < sh.G; ++g) {
    const float* q = s.tok[qt].q.data() + (std::size_t(h) * sh.G + g) * d;
    double m = -kInf;
    for (std::size_t i = 0; i < n; ++i) {
      const double* k = s.tok[keys[i]].kr.data() + std::size_t(h) * d;
      double dot = 0;
      for (int c = 0; c < d; ++c) dot += double(q[c]) * k[c];
      x[i] = dot * scale;
      m = std::max(m, x[i]);
    }
    double z = 0;
    for (std::size_t i = 0; i < n; ++i) z += std::exp(x[i] - m);
    lse[g] = m + std::log(z);
    for (int c = 0; c < d; ++c) out[g * d + c] = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const double p = std::exp(x[i] - m) / z;
      psum[i] += p;
      const double* v = s.tok[keys[i]].vr.data() + std::size_t(h) * d;
      for (int c = 0; c < d; ++c) out[g * d + c] += p * v[c];
    }
  }
}

/// The policies, on sets of positions.
struct brute {
  model m;
  shape sh;

  /// DMS 3 (shift): token j's flag is token j+1's decision; the newest is unflagged.
  bool flag(const bf_seq& s, int h, int j) const {
    return j + 1 < int(s.tok.size()) && s.tok[j + 1].l[h] > 0.0f;
  }
  /// DMS 4 (delayed eviction): key j is visible to query t iff unflagged or t - j <= w.
  bool visible(const bf_seq& s, int h, int j, int t) const {
    return !flag(s, h, j) || t - j <= m.window;
  }
  static std::vector<int> kept_list(const bf_seq& s, int h) {
    std::vector<int> out;
    for (int j = 0; j < int(s.kept[h].size()); ++j)
      if (s.kept[h][j]) out.push_back(j);
    return out;
  }
  static void grow(bf_seq& s) {
    for (auto& k : s.kept) k.resize(s.tok.size(), 0);
    for (auto& sc : s.score) sc.resize(s.tok.size(), 0.0);
  }
  static void drop(bf_seq& s, int h, const std::vector<int>& ids) {
    for (int j : ids) s.kept[h][j] = 0;
  }

  /// Quest: the pages query t of row h reads. Page i holds positions [iP, (i+1)P) (no eviction).
  /// If the row has <= B/P pages (B/P clamped to >= 1, the library's documented choice), or the
  /// layer is dense, all; else the last page plus the top B/P - 1 others by
  /// U = max over the G heads of sum_d max(q_d kmax_d, q_d kmin_d); ties -> lower page index.
  std::string quest_pages(const bf_seq& s, int h, int t, std::vector<int>& keys,
                          const lib_view& lib) const {
    const int P = sh.P, d = sh.d, np = (t + P) / P, pb = std::max(1, m.budget / P);
    std::vector<int> pages;
    if (m.layer < m.dense_layers || np <= pb) {
      for (int p = 0; p < np; ++p) pages.push_back(p);
    } else {
      std::vector<std::pair<double, int>> items;
      double magnitude = 0;
      for (int p = 0; p + 1 < np; ++p) {
        std::vector<double> lo(d, kInf), hi(d, -kInf);
        for (int j = p * P; j < (p + 1) * P; ++j)
          for (int c = 0; c < d; ++c) {
            lo[c] = std::min(lo[c], s.tok[j].kr[std::size_t(h) * d + c]);
            hi[c] = std::max(hi[c], s.tok[j].kr[std::size_t(h) * d + c]);
          }
        double u = -kInf;
        for (int g = 0; g < sh.G; ++g) {
          const float* q = s.tok[t].q.data() + (std::size_t(h) * sh.G + g) * d;
          double ug = 0, mag = 0;
          for (int c = 0; c < d; ++c) {
            ug += std::max(q[c] * lo[c], q[c] * hi[c]);
            mag += std::abs(q[c]) * std::max(std::abs(lo[c]), std::abs(hi[c]));
          }
          u = std::max(u, ug);
          magnitude = std::max(magnitude, mag);
        }
        items.emplace_back(u, -p);  // id -p: among equal U the higher page index is dropped first
      }
      std::set<int> lib_ids;
      for (int p : lib.pages(h)) lib_ids.insert(-p);
      std::set<int> dropped;
      for (int id : drops(items, np - pb, lib_ids, 1e-4 * magnitude)) dropped.insert(-id);
      for (int p = 0; p < np; ++p)
        if (!dropped.count(p)) pages.push_back(p);
    }
    if (lib.pages(h) != pages) return "Quest read pages differ at row " + std::to_string(h);
    keys.clear();
    for (int p : pages)
      for (int j = p * P; j < std::min((p + 1) * P, t + 1); ++j) keys.push_back(j);
    return "";
  }

  /// A decode step of the newest token t of s: append, attend over the row's kept set, evict.
  std::string decode(bf_seq& s, std::vector<double>& out, std::vector<double>& lse,
                     const lib_view& lib, long& reads) const {
    const int t = int(s.tok.size()) - 1, G = sh.G, d = sh.d;
    grow(s);
    out.assign(std::size_t(sh.Hk) * G * d, 0.0);
    lse.assign(std::size_t(sh.Hk) * G, 0.0);
    std::vector<double> combined(t + 1, 0.0), psum;
    std::string err;
    for (int h = 0; h < sh.Hk; ++h) {
      auto& kept = s.kept[h];
      kept[t] = 1;
      if (m.k == kind::dms)  // DMS 4/5: the row holds exactly the keys visible to query t
        for (int j = 0; j <= t; ++j) kept[j] = visible(s, h, j, t);
      if (m.k == kind::streaming)  // sinks + the R newest (the new token included)
        for (int j = m.sinks; j <= t - m.recent; ++j) kept[j] = 0;
      std::vector<int> keys = kept_list(s, h);
      if (m.k == kind::quest)
        if (auto e = quest_pages(s, h, t, keys, lib); !e.empty()) err = e;
      attend(s, sh, t, h, keys, &out[std::size_t(h) * G * d], &lse[std::size_t(h) * G], psum);
      reads += long(keys.size());
      std::vector<std::pair<double, int>> items;
      if (m.k == kind::tova) {  // TOVA: drop the lowest prob of the current query while > B
        for (std::size_t i = 0; i < keys.size(); ++i) items.emplace_back(psum[i], keys[i]);
        drop(s, h, drops(items, int(keys.size()) - m.budget, lib.kept(h)));
      }
      if (m.k == kind::tova_layer)
        for (std::size_t i = 0; i < keys.size(); ++i) combined[keys[i]] += psum[i];
      if (m.k == kind::h2o) {  // H2O: running sums; evict the argmin outside the recent window
        for (std::size_t i = 0; i < keys.size(); ++i) s.score[h][keys[i]] += psum[i];
        for (int j : keys)
          if (j < t + 1 - m.recent) items.emplace_back(s.score[h][j], j);
        drop(s, h, drops(items, int(keys.size()) - m.budget, lib.kept(h)));
      }
    }
    if (m.k == kind::tova_layer) {  // one ranking (all query heads of the layer) for every row
      std::vector<std::pair<double, int>> items;
      for (int j : kept_list(s, 0)) items.emplace_back(combined[j], j);
      const auto ids = drops(items, int(items.size()) - m.budget, lib.kept(0));
      for (int h = 0; h < sh.Hk; ++h) drop(s, h, ids);
    }
    return err;
  }

  /// A prompt: tokens t0..T-1 are the last of s.tok. out: [n][H*d], lse: [n][H].
  void prefill(bf_seq& s, int t0, std::vector<double>& out, std::vector<double>& lse,
               const lib_view& lib) const {
    const int T = int(s.tok.size()), n = T - t0, G = sh.G, d = sh.d, H = sh.Hk * G;
    grow(s);
    out.assign(std::size_t(n) * H * d, 0.0);
    lse.assign(std::size_t(n) * H, 0.0);
    if (n == 0) return;
    std::vector<double> combined(T, 0.0), psum;
    for (int h = 0; h < sh.Hk; ++h) {
      auto& kept = s.kept[h];
      auto& score = s.score[h];
      for (int t = t0; t < T; ++t) {
        // Causal; DMS applies rule 4 inside the prompt, the others read all they hold.
        std::vector<int> keys;
        for (int j = 0; j <= t; ++j)
          if (m.k == kind::dms ? visible(s, h, j, t) : (j >= t0 || kept[j])) keys.push_back(j);
        attend(s, sh, t, h, keys, &out[(std::size_t(t - t0) * H + h * G) * d],
               &lse[std::size_t(t - t0) * H + h * G], psum);
        for (std::size_t i = 0; i < keys.size(); ++i) {
          const int j = keys[i];
          if (m.k == kind::tova && t == T - 1) score[j] = psum[i];  // last query's probs
          if (m.k == kind::tova_layer && t == T - 1) combined[j] += psum[i];
          if (m.k == kind::h2o) score[j] += psum[i];                          // column sums
          if (m.k == kind::snapkv && t >= T - m.window) score[j] += psum[i];  // window votes
        }
      }
      for (int t = t0; t < T; ++t) kept[t] = 1;
      std::vector<std::pair<double, int>> items;
      const int live = int(kept_list(s, h).size());
      switch (m.k) {
        case kind::dms:  // what stays is what the last prompt query may see
          for (int j = 0; j < T; ++j) kept[j] = visible(s, h, j, T - 1);
          break;
        case kind::streaming:  // sinks + the last R prompt tokens
          for (int j = m.sinks; j < T - m.recent; ++j) kept[j] = 0;
          break;
        case kind::tova:  // top B by the last query's probabilities
          for (int j : kept_list(s, h)) items.emplace_back(score[j], j);
          drop(s, h, drops(items, live - m.budget, lib.kept(h)));
          break;
        case kind::h2o:  // `recent` newest + the top (budget - recent) others by column sums
          for (int j : kept_list(s, h))
            if (j < T - m.recent) items.emplace_back(score[j], j);
          drop(s, h, drops(items, live - m.budget, lib.kept(h)));
          break;
        case kind::snapkv: {  // pooled votes over the prefix, top C - W of it + the window
          if (live <= m.budget) break;
          std::vector<int> pre;
          for (int j : kept_list(s, h))
            if (j < T - m.window) pre.push_back(j);
          const int np = int(pre.size()), half = m.kernel / 2;
          for (int i = 0; i < np; ++i) {
            double acc = m.max_pool ? -kInf : 0.0;
            for (int x = std::max(0, i - half); x <= std::min(np - 1, i + half); ++x)
              acc = m.max_pool ? std::max(acc, score[pre[x]]) : acc + score[pre[x]];
            items.emplace_back(m.max_pool ? acc : acc / m.kernel, pre[i]);
          }
          drop(s, h, drops(items, np - (m.budget - m.window), lib.kept(h), 1e-12, m.max_pool));
          break;
        }
        default:
          break;
      }
    }
    if (m.k == kind::tova_layer) {
      std::vector<std::pair<double, int>> items;
      for (int j : kept_list(s, 0)) items.emplace_back(combined[j], j);
      const auto ids = drops(items, int(items.size()) - m.budget, lib.kept(0));
      for (int h = 0; h < sh.Hk; ++h) drop(s, h, ids);
    }
  }
};

template <class P>
P make_policy(const model& m) {
  if constexpr (std::is_same_v<P, dms::dms_policy>) {
    return P(dms::dms_params{m.window});
  } else if constexpr (std::is_same_v<P, dms::tova_policy>) {
    return P(dms::tova_params{m.budget, m.k == kind::tova_layer ? dms::tova_ranking::layer_average
                                                                : dms::tova_ranking::per_kv_head});
  } else if constexpr (std::is_same_v<P, dms::h2o_policy>) {
    return P(dms::h2o_params{m.budget, m.recent});
  } else if constexpr (std::is_same_v<P, dms::streaming_llm_policy>) {
    return P(dms::streaming_params{m.sinks, m.recent});
  } else if constexpr (std::is_same_v<P, dms::quest_policy>) {
    return P(dms::quest_params{m.budget, m.layer, m.dense_layers});
  } else if constexpr (std::is_same_v<P, dms::snapkv_policy>) {
    return P(dms::snapkv_params{m.budget, m.window, m.kernel,
                                m.max_pool ? dms::snapkv_pooling::max : dms::snapkv_pooling::avg});
  } else {
    return P{};
  }
}

/// "" if got (float, from the library) matches want (double, brute force); else what differs.
inline std::string compare(const char* what, int token, const float* got, const double* want,
                           std::size_t n, double tol) {
  for (std::size_t i = 0; i < n; ++i) {
    const bool ok = std::isinf(want[i])
                        ? double(got[i]) == want[i]
                        : std::abs(got[i] - want[i]) <= tol * (1 + std::abs(want[i]));
    if (!ok) {
      std::ostringstream os;
      os << what << " of token " << token << "[" << i << "]: library " << got[i] << ", brute force "
         << want[i];
      return os.str();
    }
  }
  return "";
}

/// The positions a row of the library's cache holds, holes (-1) dropped, sorted.
template <class Cache>
std::vector<int> held(const Cache& cache, int row) {
  std::vector<int> out;
  for (int p : cache.positions(row))
    if (p >= 0) out.push_back(p);
  std::sort(out.begin(), out.end());
  return out;
}

inline std::string list(const std::vector<int>& v) {
  std::ostringstream os;
  os << "{";
  for (std::size_t i = 0; i < v.size(); ++i) os << (i ? " " : "") << v[i];
  return os.str() + "}";
}

/// One random scenario, run on the library and on the brute force side by side.
/// Decide is where the scenario's decisions come from (which event, which sequence, prompt
/// lengths, chunk sizes): an rng for the tests, the fuzzer's bytes for the fuzz target. Token data
/// comes from an rng seeded with `seed`; with Decide = rng the two are one stream.
template <class T, class P, class Decide = rng>
class driver {
 public:
  static constexpr int kMaxSeq = 3;

  driver(shape sh, model m, gen_opts g, std::uint64_t seed, Decide decide = Decide{})
      : sh_(sh),
        m_(m),
        g_(g),
        r_(init_decide(std::move(decide), seed)),
        own_data_{seed},
        d_(pick_data()),
        bf_{m, sh},
        cfg_(config(sh)),
        cache_(cfg_, make_policy<P>(m)) {}

  /// With misuse > 0, that fraction of the events are bad calls (misuse() below): each must
  /// throw dms::error and leave the cache's image unchanged.
  void set_misuse(double fraction) { misuse_ = fraction; }
  /// Events per run: random in [0, max_events].
  void set_max_events(int n) { max_events_ = n; }
  [[nodiscard]] long events_run() const { return events_run_; }

  std::string run() {
    const int start = r_.between(1, kMaxSeq);
    for (int i = 0; i < start; ++i)
      if (auto e = add(); !e.empty()) return e;
    const int events = r_.between(0, max_events_);
    const bool multi_turn = m_.k != kind::snapkv;  // SnapKV compresses one prompt only
    for (int e = 0; e < events; ++e) {
      std::vector<int> live;
      for (int id = 0; id < kMaxSeq; ++id)
        if (seqs_[id]) live.push_back(id);
      ++events_run_;
      std::string err;
      if (misuse_ > 0 && !live.empty() && r_.uniform() < misuse_) {
        err = misuse(live[r_.between(0, int(live.size()) - 1)]);
        if (err.empty()) err = check_all();
        if (!err.empty()) return "event " + std::to_string(e) + " (misuse): " + err;
        continue;
      }
      const double u = r_.uniform();
      if (live.empty() || (u < 0.10 && int(live.size()) < kMaxSeq)) {
        err = add();
      } else if (u < 0.16) {  // remove; a later add must hand out the lowest free id again
        const int id = live[r_.between(0, int(live.size()) - 1)];
        cache_.remove_sequence(id);
        seqs_[id].reset();
      } else if (const int id = live[r_.between(0, int(live.size()) - 1)];
                 u < 0.21 && multi_turn && seqs_[id]->tok.size() < 120) {
        err = prompt(id, r_.between(1, 8), 0, r_.between(1, 5));  // another turn after decoding
      } else {
        err = decode(id);
      }
      if (err.empty()) err = check_all();
      if (!err.empty()) return "event " + std::to_string(e) + ": " + err;
    }
    return "";
  }

 private:
  static Decide init_decide(Decide decide, std::uint64_t seed) {
    if constexpr (std::is_same_v<Decide, rng>) return rng{seed};
    return decide;
  }
  rng& pick_data() {
    if constexpr (std::is_same_v<Decide, rng>)
      return r_;
    else
      return own_data_;
  }

  static dms::cache_config config(shape sh) {
    dms::cache_config c{.num_kv_heads = sh.Hk,
                        .group_size = sh.G,
                        .head_dim = sh.d,
                        .page_size = sh.P,
                        .max_sequences = kMaxSeq,
                        .max_row_slots = 256};
    c.max_pages = c.max_rows() * c.max_pages_per_row();
    return c;
  }

  static double stored(float x) { return dms::to_float(dms::from_float<T>(x)); }

  token make_token(const bf_seq& s) {
    const int H = sh_.Hk * sh_.G, d = sh_.d;
    token tk;
    const bool qzero = d_.uniform() < g_.qzero_prob;
    for (int i = 0; i < H * d; ++i) tk.q.push_back(qzero ? 0.0f : float(g_.qscale) * d_.normal());
    for (int i = 0; i < sh_.Hk * d; ++i) tk.k.push_back(d_.normal()), tk.v.push_back(d_.normal());
    for (int h = 0; h < sh_.Hk; ++h) {
      tk.l.push_back(float(g_.logit_bias) + d_.normal());
      if (!s.tok.empty() && d_.uniform() < g_.dup_prob) {  // exact copy of an earlier key
        const auto& src = s.tok[d_.between(0, int(s.tok.size()) - 1)].k;
        std::copy_n(src.begin() + h * d, d, tk.k.begin() + h * d);
      }
    }
    for (float x : tk.k) tk.kr.push_back(stored(x));
    for (float x : tk.v) tk.vr.push_back(stored(x));
    return tk;
  }

  lib_view view(int id) {
    lib_view lv;
    lv.kept = [this, id](int h) {
      const auto v = held(cache_, cache_.row_index(id, h));
      return std::set<int>(v.begin(), v.end());
    };
    if constexpr (P::selects_pages)
      lv.pages = [this, id](int h) {
        std::vector<int> pages;
        const auto& q = seqs_[id]->tok.back().q;
        cache_.policy().select_pages(cache_.row(id, h), q.data() + std::size_t(h) * sh_.G * sh_.d,
                                     sh_.G, sh_.d, pages);
        return pages;
      };
    return lv;
  }

  std::string add() {
    int lowest = 0;
    while (seqs_[lowest]) ++lowest;
    const int id = cache_.add_sequence();
    if (id != lowest)
      return "add_sequence returned " + std::to_string(id) + ", lowest free id is " +
             std::to_string(lowest);
    seqs_[id] = bf_seq{};
    seqs_[id]->kept.resize(sh_.Hk);
    seqs_[id]->score.resize(sh_.Hk);
    const int ps = sh_.P;  // prompt lengths at page boundaries too
    const int lengths[] = {0, 1, ps - 1, ps, ps + 1, 2 * ps, r_.between(2, 40)};
    const int n = std::clamp(lengths[r_.between(0, 6)], 0, 48);
    const int pad = r_.uniform() < 0.3 ? r_.between(1, 3) : 0;
    const int chunks[] = {1, 3, 5, 7, n + pad + 1, r_.between(1, n + pad + 1)};
    if (n + pad == 0) return "";
    return prompt(id, n, pad, chunks[r_.between(0, 5)]);
  }

  /// n real tokens after `pad` padding tokens, in chunks of `chunk` (padding counted).
  std::string prompt(int id, int n, int pad, int chunk) {
    bf_seq& s = *seqs_[id];
    const int t0 = int(s.tok.size()), H = sh_.Hk * sh_.G, d = sh_.d, total = pad + n;
    std::vector<float> q, k, v, l;
    for (int i = 0; i < total; ++i) {
      token tk = make_token(s);
      if (i < pad) std::fill(tk.l.begin(), tk.l.end(), 8.0f);  // padding: garbage that would flag
      q.insert(q.end(), tk.q.begin(), tk.q.end());
      k.insert(k.end(), tk.k.begin(), tk.k.end());
      v.insert(v.end(), tk.v.begin(), tk.v.end());
      l.insert(l.end(), tk.l.begin(), tk.l.end());
      if (i >= pad) s.tok.push_back(std::move(tk));
    }
    if (!P::uses_decision_logits) l.clear();
    const dms::reference::prefill_chunk_inputs in{q, k, v, l, pad};
    std::vector<float> out(std::size_t(total) * H * d, 7.0f), lse(std::size_t(total) * H, 7.0f);
    dms::reference::prefill(cache_, id, in, chunk, {out, lse});

    const int deferred = g_deferred;
    std::vector<double> eo, el;
    bf_.prefill(s, t0, eo, el, view(id));
    const std::vector<double> zeros(std::size_t(H) * d, 0.0), ninf(H, -kInf);
    for (int i = 0; i < total; ++i) {  // left padding: not cached, zero output, lse = -inf
      const bool padding = i < pad;
      const double* wo = padding ? zeros.data() : &eo[std::size_t(i - pad) * H * d];
      const double* wl = padding ? ninf.data() : &el[std::size_t(i - pad) * H];
      auto e = compare("prefill out", t0 + i - pad, &out[std::size_t(i) * H * d], wo,
                       std::size_t(H) * d, 1e-4);
      if (e.empty())
        e = compare("prefill lse", t0 + i - pad, &lse[std::size_t(i) * H], wl, H, 1e-4);
      if (!e.empty())
        return e + " (chunk " + std::to_string(chunk) + ", padding " + std::to_string(pad) + ")";
    }
    if (t0 > 0 || chunk >= total) return check(id);
    // Chunked prefill must match one-shot prefill: outputs to rounding, positions exactly.
    dms::paged_cache<T, P> one(cfg_, make_policy<P>(m_));
    const int sid = one.add_sequence();
    std::vector<float> out1(out.size()), lse1(lse.size());
    dms::reference::prefill(one, sid, in, total, {out1, lse1});
    for (std::size_t i = 0; i < out.size(); ++i)
      if (std::abs(out[i] - out1[i]) > 1e-5f * (1 + std::abs(out1[i])))
        return "chunked (" + std::to_string(chunk) + ") and one-shot prefill outputs differ";
    for (int h = 0; h < sh_.Hk && deferred == g_deferred; ++h) {
      const auto got = held(one, one.row_index(sid, h));
      if (got != brute::kept_list(s, h))
        return "one-shot prefill kept " + list(got) + ", brute force " +
               list(brute::kept_list(s, h)) + ", chunked prefill " +
               list(held(cache_, cache_.row_index(id, h))) + " (row " + std::to_string(h) +
               ", chunk " + std::to_string(chunk) + ", padding " + std::to_string(pad) + ")";
    }
    return check(id);
  }

  std::string decode(int id) {
    bf_seq& s = *seqs_[id];
    s.tok.push_back(make_token(s));
    const token& tk = s.tok.back();
    const int H = sh_.Hk * sh_.G;
    std::vector<float> out(std::size_t(H) * sh_.d), lse(H);
    const auto reads0 = cache_.stats().kv_token_reads;
    dms::reference::decode_extras ex;
    ex.lse = lse;
    dms::reference::decode_step(
        cache_, id, std::span<const float>(tk.q), std::span<const float>(tk.k),
        std::span<const float>(tk.v),
        P::uses_decision_logits ? std::span<const float>(tk.l) : std::span<const float>{},
        std::span<float>(out), ex);
    std::vector<double> eo, el;
    long reads = 0;
    const int t = int(s.tok.size()) - 1;
    if (auto e = bf_.decode(s, eo, el, view(id), reads); !e.empty()) return e;
    if (auto e = compare("decode out", t, out.data(), eo.data(), out.size(), 1e-4); !e.empty())
      return e;
    if (auto e = compare("decode lse", t, lse.data(), el.data(), lse.size(), 1e-4); !e.empty())
      return e;
    // Spec "equal footing": KV-token reads = slots read by decode attention (Quest: its pages).
    if (cache_.stats().kv_token_reads - reads0 != reads)
      return "kv_token_reads grew by " + std::to_string(cache_.stats().kv_token_reads - reads0) +
             ", brute force read " + std::to_string(reads);
    return "";
  }

  /// The positions each row holds (holes ignored) are exactly the brute force's kept set.
  std::string check(int id) {
    const bf_seq& s = *seqs_[id];
    for (int h = 0; h < sh_.Hk; ++h) {
      const int row = cache_.row_index(id, h);
      const auto got = held(cache_, row);
      const auto want = brute::kept_list(s, h);
      if (got != want)
        return "sequence " + std::to_string(id) + " row " + std::to_string(h) + " holds " +
               list(got) + ", brute force keeps " + list(want);
      if (cache_.tokens_seen(row) != int(s.tok.size())) return "tokens_seen differs";
      if (m_.k == kind::dms && !s.tok.empty()) {
        // DMS 5: slots <= survivors older than the window + w + 1, and the row never spans more.
        const int t = int(s.tok.size()) - 1;
        const int survivors =
            int(std::count_if(want.begin(), want.end(), [&](int j) { return j < t - m_.window; }));
        if (cache_.row_length(row) > survivors + m_.window + 1)
          return "DMS row spans " + std::to_string(cache_.row_length(row)) + " slots > survivors " +
                 std::to_string(survivors) + " + w + 1";
      }
    }
    return "";
  }

  std::string check_all() {
    for (int id = 0; id < kMaxSeq; ++id)
      if (seqs_[id])
        if (auto e = check(id); !e.empty()) return e;
    return "";
  }

  /// One bad call on sequence `id` (or on the cache): it must throw dms::error and leave the
  /// cache's image, its read and peak counters exactly as they were.
  std::string misuse(int id) {
    const auto before = cache_.to_image();
    const auto stats = cache_.stats();
    const int H = sh_.Hk * sh_.G, d = sh_.d;
    const std::size_t qn = std::size_t(H) * d, kn = std::size_t(sh_.Hk) * d;
    const float bad_values[] = {std::numeric_limits<float>::quiet_NaN(),
                                std::numeric_limits<float>::infinity(),
                                -std::numeric_limits<float>::infinity()};
    const float bad = bad_values[r_.between(0, 2)];
    std::vector<float> q(qn, 0.25f), k(kn, 0.5f), v(kn, -0.5f), out(qn);
    std::vector<float> logits(P::uses_decision_logits ? sh_.Hk : 0, 1.0f);
    const int what = r_.between(0, 13);
    std::string name;
    bool threw = false;
    try {
      switch (what) {
        case 0:  // non-finite key
          name = "append with a non-finite k";
          k[std::size_t(r_.between(0, int(kn) - 1))] = bad;
          cache_.append(id, k, v, logits);
          break;
        case 1:  // non-finite value, through a whole decode step
          name = "decode_step with a non-finite v";
          v[std::size_t(r_.between(0, int(kn) - 1))] = bad;
          dms::reference::decode_step(cache_, id, std::span<const float>(q),
                                      std::span<const float>(k), std::span<const float>(v),
                                      std::span<const float>(logits), std::span<float>(out));
          break;
        case 2:  // non-finite query at attention
          name = "decode_attention with a non-finite q";
          q[std::size_t(r_.between(0, int(qn) - 1))] = bad;
          dms::reference::decode_attention(cache_, id, q, out);
          break;
        case 3:  // non-finite query, decode step: the token must not be appended
          name = "decode_step with a non-finite q";
          q[std::size_t(r_.between(0, int(qn) - 1))] = bad;
          dms::reference::decode_step(cache_, id, std::span<const float>(q),
                                      std::span<const float>(k), std::span<const float>(v),
                                      std::span<const float>(logits), std::span<float>(out));
          break;
        case 4: {  // a prompt with a non-finite value in its last chunk
          name = "prefill with a non-finite value late in the prompt";
          const int n = r_.between(2, 12);
          std::vector<float> pq(std::size_t(n) * qn, 0.1f), pk(std::size_t(n) * kn, 0.2f),
              pl(P::uses_decision_logits ? std::size_t(n) * sh_.Hk : 0, -1.0f),
              po(std::size_t(n) * qn);
          auto& target = r_.between(0, 1) ? pq : pk;
          target[target.size() - 1 - std::size_t(r_.between(0, d - 1))] = bad;
          dms::reference::prefill(cache_, id, {pq, pk, pk, pl}, r_.between(1, n), {po});
          break;
        }
        case 5:
          name = "append with a wrong-sized k";
          k.push_back(1.0f);
          cache_.append(id, k, v, logits);
          break;
        case 6:
          name = "append to an unknown sequence";
          cache_.append(kMaxSeq + r_.between(0, 5), k, v, logits);
          break;
        case 7:
          name = "record_reads with a negative count";
          cache_.record_reads(-1 - r_.between(0, 100));
          break;
        case 8: {  // evict a slot that is not live
          name = "evict a hole or a slot past the row";
          auto row = cache_.row(id, r_.between(0, sh_.Hk - 1));
          int slot = row.length() + r_.between(0, 3);
          for (int s = 0; s < row.length(); ++s)
            if (row.position(s) < 0) slot = s;
          row.evict(slot);
          break;
        }
        case 9: {
          name = "decode_step with a negative softmax scale";
          dms::reference::decode_extras ex;
          ex.softmax_scale = -float(r_.between(1, 4));
          dms::reference::decode_step(cache_, id, std::span<const float>(q),
                                      std::span<const float>(k), std::span<const float>(v),
                                      std::span<const float>(logits), std::span<float>(out), ex);
          break;
        }
        case 10: {  // a corrupt image
          name = "load_image with a corrupt image";
          auto img = before;
          const int r = id * sh_.Hk + r_.between(0, sh_.Hk - 1);
          switch (r_.between(0, 4)) {
            case 0:
              img.page_table[std::size_t(r) * cfg_.max_pages_per_row()] = cfg_.max_pages + 3;
              img.row_length[std::size_t(r)] = std::max(img.row_length[std::size_t(r)], 1);
              break;
            case 1:
              img.live[std::size_t(r)] += 1;
              break;
            case 2:
              // a leaked page, or (if none is free) a page both held and free
              img.free_top = img.free_top > 0 ? img.free_top - 1 : 1;
              break;
            case 3:
              img.row_length[std::size_t(r)] = cfg_.max_row_slots + 1;
              break;
            default:
              img.seen[std::size_t(r)] = -1;
              break;
          }
          cache_.load_image(img);
          break;
        }
        case 11:
          name = "a raw row index out of range";
          (void)cache_.positions(cfg_.max_rows() + r_.between(0, 3));
          break;
        case 12:  // a prompt longer than a row can hold
          if (P::uses_decision_logits) {
            name = "append with a non-finite decision logit";
            logits[std::size_t(r_.between(0, sh_.Hk - 1))] = bad;
            cache_.append(id, k, v, logits);
          } else {
            name = "append with decision logits of the wrong size";
            logits.assign(std::size_t(sh_.Hk) + 1, 0.0f);
            cache_.append(id, k, v, logits);
          }
          break;
        default: {
          name = "prefill past max_row_slots";
          const int n = cfg_.max_row_slots + 1;
          std::vector<float> pq(std::size_t(n) * qn, 0.1f), pk(std::size_t(n) * kn, 0.2f),
              pl(P::uses_decision_logits ? std::size_t(n) * sh_.Hk : 0, -1.0f),
              po(std::size_t(n) * qn);
          dms::reference::prefill(cache_, id, {pq, pk, pk, pl}, 64, {po});
          break;
        }
      }
    } catch (const dms::error&) {
      threw = true;
    } catch (const std::exception& e) {
      return name + ": threw a non-dms exception: " + e.what();
    }
    if (!threw) return name + ": did not throw";
    if (const auto diff = dms_test::first_difference(cache_.to_image(), before); !diff.empty())
      return name + ": threw but changed the cache: " + diff;
    const auto now = cache_.stats();
    if (now.kv_token_reads != stats.kv_token_reads || now.peak_live_slots != stats.peak_live_slots)
      return name + ": threw but changed the counters";
    return "";
  }

  shape sh_;
  model m_;
  gen_opts g_;
  Decide r_;      // decisions
  rng own_data_;  // token data, unless Decide is an rng (then r_ is used for both)
  rng& d_;
  double misuse_ = 0;
  int max_events_ = 60;
  long events_run_ = 0;
  brute bf_;
  dms::cache_config cfg_;
  dms::paged_cache<T, P> cache_;
  std::array<std::optional<bf_seq>, kMaxSeq> seqs_;
};

}  // namespace dms_bf
