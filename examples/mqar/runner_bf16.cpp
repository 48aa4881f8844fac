// SPDX-License-Identifier: Apache-2.0
// The runner's engine for bf16 K/V under every policy: one storage type per file, so that the
// three instantiations compile in parallel (engine.hpp).

#include "engine.hpp"

namespace mqar::engine_detail {

template run_result evaluate_for<dms::bfloat16>(const model_weights&, const eval_set&,
                                                const policy_options&, const run_options&);
template std::vector<float> sequence_logits_for<dms::bfloat16>(const model_weights&,
                                                               const std::vector<int>&, int,
                                                               const policy_options&,
                                                               const run_options&);

}  // namespace mqar::engine_detail
