// SPDX-License-Identifier: Apache-2.0
#pragma once

// Shared by the CPU fast-path tests: a seeded RNG, every policy by name, every storage type, and
// "twin" caches (one for the reference, one for the fast path) with identical contents.

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "dms/dms.hpp"

namespace dms_test {

/// splitmix64 + Box-Muller: the same numbers on every platform.
struct cpu_rng {
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
  void fill(std::vector<float>& v, float scale = 1.0f) {
    for (float& x : v) x = normal() * scale;
  }
};

enum class policy_kind { dense, dms, tova, tova_layer, h2o, quest, quest_dense, streaming, snapkv };
inline constexpr policy_kind all_policy_kinds[] = {
    policy_kind::dense,       policy_kind::dms,       policy_kind::tova,
    policy_kind::tova_layer,  policy_kind::h2o,       policy_kind::quest,
    policy_kind::quest_dense, policy_kind::streaming, policy_kind::snapkv};

inline const char* policy_kind_name(policy_kind k) {
  switch (k) {
    case policy_kind::dense:
      return "dense";
    case policy_kind::dms:
      return "DMS";
    case policy_kind::tova:
      return "TOVA";
    case policy_kind::tova_layer:
      return "TOVA-layer";
    case policy_kind::h2o:
      return "H2O";
    case policy_kind::quest:
      return "Quest";
    case policy_kind::quest_dense:
      return "Quest-dense-layer";
    case policy_kind::streaming:
      return "StreamingLLM";
    case policy_kind::snapkv:
      return "SnapKV";
  }
  return "?";
}

/// Calls f(policy) with policy kind k, its budgets scaled to a context of `context` tokens
/// (DMS: window context / 8, or dms_window if given).
template <class F>
void with_policy(policy_kind k, int context, int page_size, F&& f, int dms_window = -1) {
  const int budget = std::max(4, context / 3);
  switch (k) {
    case policy_kind::dense:
      return f(dms::dense_policy{});
    case policy_kind::dms:
      return f(
          dms::dms_policy{{.window = dms_window >= 0 ? dms_window : std::max(1, context / 8)}});
    case policy_kind::tova:
      return f(dms::tova_policy{{.budget = budget}});
    case policy_kind::tova_layer:
      return f(dms::tova_policy{{.budget = budget, .ranking = dms::tova_ranking::layer_average}});
    case policy_kind::h2o:
      return f(dms::h2o_policy{{.budget = budget, .recent = budget / 2}});
    case policy_kind::quest:
      return f(dms::quest_policy{{.token_budget = std::max(page_size, context / 4), .layer = 2}});
    case policy_kind::quest_dense:
      return f(dms::quest_policy{{.token_budget = page_size, .layer = 0}});
    case policy_kind::streaming:
      return f(dms::streaming_llm_policy{{.sinks = 2, .recent = std::max(1, budget)}});
    case policy_kind::snapkv:
      return f(dms::snapkv_policy{{.capacity = budget + 4, .window = 4}});
  }
}

enum class storage { f32, f16, bf16 };
inline constexpr storage all_storages[] = {storage::f32, storage::f16, storage::bf16};
inline const char* storage_name(storage s) {
  return s == storage::f32 ? "f32" : s == storage::f16 ? "f16" : "bf16";
}

template <class F>
void with_storage(storage s, F&& f) {
  switch (s) {
    case storage::f32:
      return f(float{});
    case storage::f16:
      return f(dms::half{});
    case storage::bf16:
      return f(dms::bfloat16{});
  }
}

/// Two caches with the same configuration and policy: `ref` for dms::reference, `fast` for
/// dms::cpu. sync() makes `fast` a copy of `ref` (every slot, page, ring and score).
template <class T, class P>
struct twin {
  twin(const dms::cache_config& cfg, const P& policy) : ref(cfg, policy), fast(cfg, policy) {}
  void sync() { fast.load_image(ref.to_image()); }
  dms::paged_cache<T, P> ref;
  dms::paged_cache<T, P> fast;
};

}  // namespace dms_test
