// expect: missing required hook
// SPDX-License-Identifier: Apache-2.0
// A policy without choose_victim: instantiating a cache with it must stop at the static_assert in
// dms/policy/policy.hpp that names the missing hook, not somewhere deep inside the cache.
#include "dms/dms.hpp"

struct no_victim_policy : dms::policy<no_victim_policy> {
  const char* name() const { return "no victim"; }
  template <class Seq>
  void after_attention(Seq&) const {}
  // No `int choose_victim(const Row&, const dms::token_info&) const`.
};

int main() {
  dms::cache_config cfg;
  cfg.num_kv_heads = 1;
  cfg.group_size = 1;
  cfg.head_dim = 4;
  dms::paged_cache<float, no_victim_policy> cache(cfg);
  return cache.add_sequence();
}
