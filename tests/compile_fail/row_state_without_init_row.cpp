// expect: must define the hook `void init_row\(row_state&\) const`
// SPDX-License-Identifier: Apache-2.0
// A policy that declares its own row_state but no init_row: the cache must stop at the named
// static_assert in dms/policy/policy.hpp, not at an overload-resolution error deep inside it.
#include "dms/dms.hpp"

struct stateful_policy : dms::policy<stateful_policy> {
  struct row_state {
    int appends = 0;
  };
  const char* name() const { return "stateful"; }
  template <class Row>
  int choose_victim(const Row&, const dms::token_info&) const {
    return -1;
  }
  template <class Seq>
  void after_attention(Seq&) const {}
  // No `void init_row(row_state&) const`.
};

int main() {
  dms::cache_config cfg;
  cfg.num_kv_heads = 1;
  cfg.group_size = 1;
  cfg.head_dim = 4;
  dms::paged_cache<float, stateful_policy> cache(cfg);
  return cache.add_sequence();
}
