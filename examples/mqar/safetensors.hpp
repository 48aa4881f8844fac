// SPDX-License-Identifier: Apache-2.0
#pragma once

// A small, checking safetensors reader. The format: an 8-byte little-endian header length n, a
// JSON header of n bytes ({name: {"dtype", "shape", "data_offsets": [begin, end]}, plus an
// optional "__metadata__" of string values}), then the tensors' raw little-endian bytes, offsets
// relative to the end of the header. Everything is validated before any tensor is handed out:
// the header length against the file size, the JSON, every dtype, every shape against its byte
// range, every range inside the data section and no two ranges overlapping. A truncated or
// corrupt file is a dms::error naming what is wrong, never a crash or a silent misread.

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dms/error.hpp"
#include "json.hpp"

namespace mqar {

enum class dtype { f32, i32, u8 };

inline std::size_t dtype_size(dtype t) {
  return t == dtype::u8 ? 1 : 4;
}
inline const char* dtype_name(dtype t) {
  return t == dtype::f32 ? "F32" : t == dtype::i32 ? "I32" : "U8";
}

struct tensor_info {
  std::string name;
  dtype type;
  std::vector<std::int64_t> shape;
  std::size_t begin = 0, end = 0;  // byte range in the data section
  [[nodiscard]] std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

class safetensors_file {
 public:
  /// Largest header accepted (the format's reference reader uses the same 100 MB limit).
  static constexpr std::uint64_t max_header_bytes = 100'000'000;

  /// Parses an in-memory file (what `read` loads, or an embedded copy). `name` goes into errors.
  static safetensors_file parse(std::vector<std::byte> bytes, std::string name) {
    safetensors_file f;
    f.bytes_ = std::move(bytes);
    f.name_ = std::move(name);
    f.index();
    return f;
  }
  static safetensors_file parse(std::span<const unsigned char> bytes, std::string name) {
    std::vector<std::byte> copy(bytes.size());
    if (!bytes.empty()) std::memcpy(copy.data(), bytes.data(), bytes.size());
    return parse(std::move(copy), std::move(name));
  }

  static safetensors_file read(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) dms::detail::fail("cannot open ", path);
    std::vector<char> raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::vector<std::byte> bytes(raw.size());
    if (!raw.empty()) std::memcpy(bytes.data(), raw.data(), raw.size());
    return parse(std::move(bytes), path);
  }

  [[nodiscard]] const std::string& name() const { return name_; }
  [[nodiscard]] const std::vector<tensor_info>& tensors() const { return tensors_; }
  [[nodiscard]] bool contains(std::string_view tensor) const { return find(tensor) != nullptr; }

  /// A metadata string, or `fallback` when the key is absent.
  [[nodiscard]] std::string metadata(std::string_view key, std::string fallback = {}) const {
    for (const auto& [k, v] : metadata_)
      if (k == key) return v;
    return fallback;
  }
  [[nodiscard]] bool has_metadata(std::string_view key) const {
    return std::any_of(metadata_.begin(), metadata_.end(),
                       [&](const auto& kv) { return kv.first == key; });
  }

  /// The tensor's shape, checked against `rank` dimensions.
  [[nodiscard]] const tensor_info& info(std::string_view tensor) const {
    const tensor_info* t = find(tensor);
    if (!t) dms::detail::fail(name_, ": no tensor \"", tensor, "\"");
    return *t;
  }

  /// A copy of the tensor's elements, after checking its dtype and (if given) its exact shape.
  template <class E>
  [[nodiscard]] std::vector<E> load(std::string_view tensor,
                                    std::span<const std::int64_t> expected_shape = {}) const {
    const tensor_info& t = info(tensor);
    const dtype want = std::is_same_v<E, float>          ? dtype::f32
                       : std::is_same_v<E, std::int32_t> ? dtype::i32
                                                         : dtype::u8;
    static_assert(std::is_same_v<E, float> || std::is_same_v<E, std::int32_t> ||
                  std::is_same_v<E, std::uint8_t>);
    if (t.type != want)
      dms::detail::fail(name_, ": tensor \"", tensor, "\" has dtype ", dtype_name(t.type),
                        "; expected ", dtype_name(want));
    if (!expected_shape.empty() &&
        !std::equal(t.shape.begin(), t.shape.end(), expected_shape.begin(), expected_shape.end()))
      dms::detail::fail(name_, ": tensor \"", tensor, "\" has shape ", shape_text(t.shape),
                        "; expected ", shape_text(expected_shape));
    std::vector<E> out(std::size_t(t.numel()));
    static_assert(std::endian::native == std::endian::little,
                  "safetensors data is little-endian; add a byte swap for this target");
    if (!out.empty()) std::memcpy(out.data(), data() + t.begin, t.end - t.begin);
    return out;
  }
  template <class E>
  [[nodiscard]] std::vector<E> load(std::string_view tensor,
                                    std::initializer_list<std::int64_t> shape) const {
    return load<E>(tensor, std::span<const std::int64_t>(shape.begin(), shape.size()));
  }

  static std::string shape_text(std::span<const std::int64_t> s) {
    std::string out = "[";
    for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + "]";
  }

 private:
  const std::byte* data() const { return bytes_.data() + 8 + header_bytes_; }

  const tensor_info* find(std::string_view tensor) const {
    for (const auto& t : tensors_)
      if (t.name == tensor) return &t;
    return nullptr;
  }

  void index() {
    if (bytes_.size() < 8)
      dms::detail::fail(name_, ": ", bytes_.size(),
                        " bytes is too short for a safetensors file (8-byte header length)");
    std::uint64_t n = 0;
    for (int b = 7; b >= 0; --b) n = (n << 8) | std::uint64_t(bytes_[std::size_t(b)]);
    if (n < 2 || n > max_header_bytes || n > bytes_.size() - 8)
      dms::detail::fail(name_, ": header length ", n, " is outside the valid range [2, ",
                        std::min<std::uint64_t>(max_header_bytes, bytes_.size() - 8), "] (file of ",
                        bytes_.size(), " bytes; truncated or not safetensors?)");
    header_bytes_ = std::size_t(n);
    const std::string_view text(reinterpret_cast<const char*>(bytes_.data()) + 8, header_bytes_);
    if (text.front() != '{')
      dms::detail::fail(name_, ": the header does not start with '{' (not a safetensors file)");
    json::value header;
    try {
      header = json::parse(text);
    } catch (const dms::error& e) {
      dms::detail::fail(name_, ": corrupt header: ", e.what());
    }
    const std::size_t data_bytes = bytes_.size() - 8 - header_bytes_;
    for (const auto& [key, entry] : header.as_object(name_ + " header")) {
      if (key == "__metadata__") {
        for (const auto& [mk, mv] : entry.as_object(name_ + " __metadata__"))
          metadata_.emplace_back(mk, mv.as_string(name_ + " __metadata__." + mk));
        continue;
      }
      const std::string what = name_ + ": tensor \"" + key + "\"";
      tensor_info t;
      t.name = key;
      const std::string& dt = entry.at("dtype", what).as_string(what + " dtype");
      if (dt == "F32")
        t.type = dtype::f32;
      else if (dt == "I32")
        t.type = dtype::i32;
      else if (dt == "U8")
        t.type = dtype::u8;
      else
        dms::detail::fail(what, " has dtype \"", dt, "\"; this reader takes F32, I32 and U8");
      std::int64_t numel = 1;
      for (const auto& d : entry.at("shape", what).as_array(what + " shape")) {
        t.shape.push_back(d.as_int(what + " shape entry", 0, std::int64_t{1} << 40));
        numel *= t.shape.back();
        if (numel > std::int64_t{1} << 40) dms::detail::fail(what, " has more than 2^40 elements");
      }
      const auto& off = entry.at("data_offsets", what).as_array(what + " data_offsets");
      if (off.size() != 2)
        dms::detail::fail(what, " data_offsets has ", off.size(), " entries; expected 2");
      t.begin = std::size_t(off[0].as_int(what + " data_offsets[0]", 0, std::int64_t(data_bytes)));
      t.end = std::size_t(off[1].as_int(what + " data_offsets[1]", 0, std::int64_t(data_bytes)));
      if (t.end < t.begin)
        dms::detail::fail(what, " data_offsets [", t.begin, ", ", t.end, "] is reversed");
      const auto expect = std::uint64_t(numel) * dtype_size(t.type);
      if (t.end - t.begin != expect)
        dms::detail::fail(what, " spans ", t.end - t.begin, " bytes but shape ",
                          shape_text(t.shape), " of ", dtype_name(t.type), " needs ", expect);
      tensors_.push_back(std::move(t));
    }
    // Ranges must not overlap (the reference writer also packs them without gaps).
    std::vector<const tensor_info*> by_begin;
    for (const auto& t : tensors_) by_begin.push_back(&t);
    std::sort(by_begin.begin(), by_begin.end(),
              [](auto* a, auto* b) { return a->begin < b->begin; });
    for (std::size_t i = 1; i < by_begin.size(); ++i)
      if (by_begin[i]->begin < by_begin[i - 1]->end)
        dms::detail::fail(name_, ": tensors \"", by_begin[i - 1]->name, "\" and \"",
                          by_begin[i]->name, "\" overlap");
  }

  std::vector<std::byte> bytes_;
  std::string name_;
  std::size_t header_bytes_ = 0;
  std::vector<tensor_info> tensors_;
  std::vector<std::pair<std::string, std::string>> metadata_;
};

}  // namespace mqar
