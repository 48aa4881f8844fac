// SPDX-License-Identifier: Apache-2.0
#pragma once

// Everything host-side: containers, policies, the CPU reference and the batched step algorithm
// (which the CUDA kernels share). CUDA lives under dms/cuda/.

#include "dms/cache_config.hpp"
#include "dms/cache_view.hpp"
#include "dms/config.hpp"
#include "dms/error.hpp"
#include "dms/numeric.hpp"
#include "dms/page_pool.hpp"
#include "dms/paged_cache.hpp"
#include "dms/policy/dense.hpp"
#include "dms/policy/device_policy.hpp"
#include "dms/policy/dms.hpp"
#include "dms/policy/dms_decision.hpp"
#include "dms/policy/h2o.hpp"
#include "dms/policy/policy.hpp"
#include "dms/policy/quest.hpp"
#include "dms/policy/ranking.hpp"
#include "dms/policy/score_policy.hpp"
#include "dms/policy/snapkv.hpp"
#include "dms/policy/streaming_llm.hpp"
#include "dms/policy/tova.hpp"
#include "dms/reference/attend.hpp"
#include "dms/reference/decode.hpp"
#include "dms/reference/prefill.hpp"
#include "dms/step/batch_step.hpp"
#include "dms/step/cache_image.hpp"
#include "dms/step/cache_state.hpp"
#include "dms/step/image_check.hpp"
#include "dms/step/prompt_compression.hpp"
#include "dms/version.hpp"
