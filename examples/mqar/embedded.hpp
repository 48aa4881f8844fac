// SPDX-License-Identifier: Apache-2.0
#pragma once

// The shipped model files compiled into the programs (examples/mqar/CMakeLists.txt turns each
// file of examples/mqar/model/ listed there into a byte array), so the demo needs no download, no
// path and no flag. embedded_names() lists them; each is also readable from the source tree.

#include <span>
#include <string_view>
#include <vector>

namespace mqar {

/// The bytes of an embedded file ("dense.safetensors", "eval.safetensors", ...), or an empty
/// span if no such file was embedded.
std::span<const unsigned char> embedded_file(std::string_view name);
std::vector<std::string_view> embedded_names();

}  // namespace mqar
