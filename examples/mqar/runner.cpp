// SPDX-License-Identifier: Apache-2.0
// The runner's entry points: names, budgets, and the dispatch on the K/V storage type to the
// engine (engine.hpp, instantiated in runner_{f32,bf16,f16}.cpp). See runner.hpp.

#include "runner.hpp"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "engine.hpp"

namespace mqar {

const char* policy_label(policy_kind k) {
  switch (k) {
    case policy_kind::dense:
      return "dense";
    case policy_kind::dms:
      return "DMS";
    case policy_kind::tova:
      return "TOVA";
    case policy_kind::h2o:
      return "H2O";
    case policy_kind::quest:
      return "Quest";
    case policy_kind::streaming_llm:
      return "StreamingLLM";
    case policy_kind::snapkv:
      return "SnapKV";
  }
  return "?";
}

policy_kind parse_policy(std::string_view n) {
  if (n == "dense") return policy_kind::dense;
  if (n == "dms") return policy_kind::dms;
  if (n == "tova") return policy_kind::tova;
  if (n == "h2o") return policy_kind::h2o;
  if (n == "quest") return policy_kind::quest;
  if (n == "streaming" || n == "streaming_llm") return policy_kind::streaming_llm;
  if (n == "snapkv") return policy_kind::snapkv;
  dms::detail::fail("policy \"", n,
                    "\" is not one of dense, dms, tova, h2o, quest, streaming, snapkv");
}

const char* storage_label(kv_storage s) {
  return s == kv_storage::f32 ? "f32" : s == kv_storage::bf16 ? "bf16" : "f16";
}
kv_storage parse_storage(std::string_view n) {
  if (n == "f32") return kv_storage::f32;
  if (n == "bf16") return kv_storage::bf16;
  if (n == "f16" || n == "fp16") return kv_storage::f16;
  dms::detail::fail("storage \"", n, "\" is not one of f32, bf16, f16");
}

int budget_for_ratio(policy_kind k, double ratio, int tokens_seen, int decode_tokens) {
  if (!(ratio >= 1.0)) dms::detail::fail("compression ratio = ", ratio, " is below 1");
  const int keep = std::max(1, int(std::lround(tokens_seen / ratio)));
  if (k == policy_kind::snapkv) return std::max(1, keep - decode_tokens);
  return keep;
}

namespace {

template <class F>
decltype(auto) with_storage_type(kv_storage s, F&& f) {
  if (s == kv_storage::bf16) return f(std::type_identity<dms::bfloat16>{});
  if (s == kv_storage::f16) return f(std::type_identity<dms::half>{});
  return f(std::type_identity<float>{});
}

}  // namespace

run_result evaluate(const model_weights& m, const eval_set& e, const policy_options& p,
                    const run_options& o) {
  return with_storage_type(o.storage, [&](auto st) {
    return engine_detail::storage_runner<typename decltype(st)::type>::evaluate(m, e, p, o);
  });
}

std::vector<float> sequence_logits(const model_weights& m, const std::vector<int>& tokens,
                                   int prompt_length, const policy_options& p,
                                   const run_options& o) {
  dms::detail::check_range("prompt_length", prompt_length, 1, int(tokens.size()));
  return with_storage_type(o.storage, [&](auto st) {
    return engine_detail::storage_runner<typename decltype(st)::type>::sequence_logits(
        m, tokens, prompt_length, p, o);
  });
}

}  // namespace mqar
