// SPDX-License-Identifier: Apache-2.0
// dms_fuzz::run_input: the first 14 bytes of an input choose the shape, the data options, the
// token-data seed, the storage type and the policy; the policy's parameters follow, in the ranges
// the cache accepts for these shapes (max_row_slots 256); the rest drives the scenario.
#include <algorithm>
#include <sstream>

#include "fuzz_scenario.hpp"

namespace dms_fuzz {

outcome run_input(const std::uint8_t* data, std::size_t size) {
  using dms_bf::kind;
  byte_source src{data, size};
  static constexpr int gs[] = {1, 2, 4, 8}, ds[] = {1, 4, 16, 33}, ps[] = {1, 2, 4, 16};
  const dms_bf::shape sh{src.between(1, 3), gs[src.between(0, 3)], ds[src.between(0, 3)],
                         ps[src.between(0, 3)]};
  static constexpr double bias[] = {0, 8, -8, 0.5};
  const dms_bf::gen_opts g{bias[src.between(0, 3)], src.between(0, 1) ? 0.25 : 0.0,
                           src.between(0, 3) == 0 ? 0.3 : 0.0, src.between(0, 1) ? 3.0 : 1.0};
  const auto seed = src.take(4);
  const bool bf16 = src.between(0, 1) != 0;
  dms_bf::model m;
  m.k = kind(src.between(0, 7));
  outcome o;
  switch (m.k) {
    case kind::dense:
      o = run_policy<dms::dense_policy>(bf16, sh, m, g, seed, src);
      break;
    case kind::dms:
      m.window = src.between(0, 3) == 0 ? 200 : src.between(0, 16);
      o = run_policy<dms::dms_policy>(bf16, sh, m, g, seed, src);
      break;
    case kind::tova:
    case kind::tova_layer:
      m.budget = src.between(0, 7) == 0 ? 200 : src.between(1, 40);
      o = run_policy<dms::tova_policy>(bf16, sh, m, g, seed, src);
      break;
    case kind::h2o:
      m.recent = src.between(0, 10);
      m.budget = std::max(1, m.recent) + src.between(0, 30);
      o = run_policy<dms::h2o_policy>(bf16, sh, m, g, seed, src);
      break;
    case kind::streaming:
      m.sinks = src.between(0, 4);
      m.recent = src.between(0, 7) == 0 ? 200 : src.between(1, 16);
      o = run_policy<dms::streaming_llm_policy>(bf16, sh, m, g, seed, src);
      break;
    case kind::quest:
      m.budget = sh.P * src.between(1, 8) + src.between(0, sh.P - 1);
      m.layer = src.between(0, 3) == 0 ? 1 : 2;
      m.dense_layers = 2;
      o = run_policy<dms::quest_policy>(bf16, sh, m, g, seed, src);
      break;
    case kind::snapkv:
      m.window = src.between(1, 8);
      m.budget = m.window + src.between(0, 30);
      m.kernel = 2 * src.between(0, 4) + 1;
      m.max_pool = src.between(0, 1) != 0;
      o = run_policy<dms::snapkv_policy>(bf16, sh, m, g, seed, src);
      break;
  }
  std::ostringstream what;
  what << m << " Hk=" << sh.Hk << " G=" << sh.G << " d=" << sh.d << " P=" << sh.P
       << (bf16 ? " bf16" : " float") << " seed=" << seed;
  o.what = what.str();
  return o;
}

}  // namespace dms_fuzz
