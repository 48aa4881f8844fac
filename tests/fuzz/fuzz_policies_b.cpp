// SPDX-License-Identifier: Apache-2.0
// dms_fuzz::run_policy for StreamingLLM, Quest and SnapKV (see fuzz_scenario.hpp).
#include "fuzz_policies.inc"
#include "fuzz_scenario.hpp"

namespace dms_fuzz {
template outcome run_policy<dms::streaming_llm_policy>(bool, const dms_bf::shape&,
                                                       const dms_bf::model&,
                                                       const dms_bf::gen_opts&, std::uint64_t,
                                                       const byte_source&);
template outcome run_policy<dms::quest_policy>(bool, const dms_bf::shape&, const dms_bf::model&,
                                               const dms_bf::gen_opts&, std::uint64_t,
                                               const byte_source&);
template outcome run_policy<dms::snapkv_policy>(bool, const dms_bf::shape&, const dms_bf::model&,
                                                const dms_bf::gen_opts&, std::uint64_t,
                                                const byte_source&);
}  // namespace dms_fuzz
