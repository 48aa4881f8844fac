// SPDX-License-Identifier: Apache-2.0
#pragma once

// The fixed MQAR evaluation set, as examples/mqar/train/train_dense.py ships it: tokens
// [sequences][T] (U8) and the answer positions [Q] (I32): the model's prediction at position p
// is scored against tokens[p + 1]. Generated once, seeded, so the C++ side needs no RNG.

#include <cstdint>
#include <vector>

#include "dms/error.hpp"
#include "safetensors.hpp"

namespace mqar {

struct eval_set {
  int sequences = 0;
  int length = 0;                              // T = 1 + C + 2Q
  std::vector<std::uint8_t> tokens;            // [sequences][length]
  std::vector<std::int32_t> answer_positions;  // [Q], ascending
  [[nodiscard]] int queries() const { return int(answer_positions.size()); }
  /// The prompt: BOS and the context, everything before the first query key.
  [[nodiscard]] int prompt_length() const { return answer_positions.front(); }
  [[nodiscard]] const std::uint8_t* sequence(int s) const {
    return tokens.data() + std::size_t(s) * length;
  }
};

inline eval_set load_eval_set(const safetensors_file& f, int vocab) {
  eval_set e;
  const tensor_info& t = f.info("tokens");
  if (t.shape.size() != 2 || t.shape[0] < 1 || t.shape[1] < 2)
    dms::detail::fail(f.name(), ": tokens has shape ", safetensors_file::shape_text(t.shape),
                      "; expected [sequences >= 1, length >= 2]");
  e.sequences = int(t.shape[0]);
  e.length = int(t.shape[1]);
  e.tokens = f.load<std::uint8_t>("tokens");
  e.answer_positions = f.load<std::int32_t>("answer_positions");
  if (e.answer_positions.empty()) dms::detail::fail(f.name(), ": answer_positions is empty");
  for (std::size_t i = 0; i < e.answer_positions.size(); ++i) {
    const int p = e.answer_positions[i];
    const int lo = i == 0 ? 1 : e.answer_positions[i - 1] + 1;
    if (p < lo || p > e.length - 2)
      dms::detail::fail(f.name(), ": answer_positions[", i, "] = ", p,
                        " is outside the valid range [", lo, ", ", e.length - 2, "]");
  }
  for (std::size_t i = 0; i < e.tokens.size(); ++i)
    if (e.tokens[i] >= vocab)
      dms::detail::fail(f.name(), ": token ", int(e.tokens[i]), " at index ", i,
                        " is outside the model's vocabulary [0, ", vocab - 1, "]");
  return e;
}

}  // namespace mqar
