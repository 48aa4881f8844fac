// SPDX-License-Identifier: Apache-2.0
#pragma once

// Dense: keep every token. The baseline every other policy is measured against, and the smallest
// complete example of the policy interface.

#include "dms/config.hpp"
#include "dms/policy/device_policy.hpp"
#include "dms/policy/policy.hpp"

DMS_NAMESPACE_BEGIN

struct dense_device_policy : device_policy_base {
  DMS_HOST_DEVICE int choose_victim(const row_context&, const token_info&) const { return -1; }
};

struct dense_policy : policy<dense_policy> {
  static constexpr bool hooks_never_throw = true;
  const char* name() const { return "dense"; }
  template <class Row>
  int choose_victim(const Row&, const token_info&) const {
    return -1;
  }
  template <class Seq>
  void after_attention(Seq&) const {}
  [[nodiscard]] dense_device_policy device_form() const { return {}; }
};

DMS_NAMESPACE_END
