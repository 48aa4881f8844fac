// SPDX-License-Identifier: Apache-2.0
// The runner's engine for f16 K/V under every policy: one storage type per file, so that the
// three instantiations compile in parallel (engine.hpp).

#include "engine.hpp"

template struct mqar::engine_detail::storage_runner<dms::half>;
