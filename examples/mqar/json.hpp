// SPDX-License-Identifier: Apache-2.0
#pragma once

// A small, strict JSON reader for the two documents the MQAR runner reads: a safetensors header
// and its metadata. Objects keep their key order; numbers are doubles; nesting is limited so a
// hostile file cannot overflow the stack. Every error is a dms::error naming the byte offset.

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "dms/error.hpp"

namespace mqar::json {

struct value;
using array = std::vector<value>;
using object = std::vector<std::pair<std::string, value>>;

struct value {
  std::variant<std::nullptr_t, bool, double, std::string, array, object> v;

  [[nodiscard]] bool is_object() const { return std::holds_alternative<object>(v); }
  [[nodiscard]] bool is_array() const { return std::holds_alternative<array>(v); }
  [[nodiscard]] bool is_string() const { return std::holds_alternative<std::string>(v); }
  [[nodiscard]] bool is_number() const { return std::holds_alternative<double>(v); }

  [[nodiscard]] const object& as_object(std::string_view what) const {
    if (!is_object()) dms::detail::fail(what, " is not a JSON object");
    return std::get<object>(v);
  }
  [[nodiscard]] const array& as_array(std::string_view what) const {
    if (!is_array()) dms::detail::fail(what, " is not a JSON array");
    return std::get<array>(v);
  }
  [[nodiscard]] const std::string& as_string(std::string_view what) const {
    if (!is_string()) dms::detail::fail(what, " is not a JSON string");
    return std::get<std::string>(v);
  }
  [[nodiscard]] double as_number(std::string_view what) const {
    if (!is_number()) dms::detail::fail(what, " is not a JSON number");
    return std::get<double>(v);
  }
  /// An integer in [lo, hi], exactly (no fraction).
  [[nodiscard]] std::int64_t as_int(std::string_view what, std::int64_t lo, std::int64_t hi) const {
    const double d = as_number(what);
    if (!(d >= double(lo) && d <= double(hi)) || double(std::int64_t(d)) != d)
      dms::detail::fail(what, " = ", d, " is not an integer in [", lo, ", ", hi, "]");
    return std::int64_t(d);
  }
  /// The member `key` of an object, or nullptr.
  [[nodiscard]] const value* find(std::string_view key) const {
    if (!is_object()) return nullptr;
    for (const auto& [k, val] : std::get<object>(v))
      if (k == key) return &val;
    return nullptr;
  }
  [[nodiscard]] const value& at(std::string_view key, std::string_view what) const {
    const value* p = find(key);
    if (!p) dms::detail::fail(what, " has no member \"", key, "\"");
    return *p;
  }
};

namespace detail {

class parser {
 public:
  explicit parser(std::string_view text) : s_(text) {}

  value parse_document() {
    value v = parse_value(0);
    skip_ws();
    if (i_ != s_.size()) error("trailing characters after the JSON value");
    return v;
  }

 private:
  static constexpr int max_depth = 64;

  [[noreturn]] void error(std::string_view what) const {
    dms::detail::fail("JSON: ", what, " at byte ", i_);
  }
  void skip_ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r'))
      ++i_;
  }
  char peek() {
    skip_ws();
    if (i_ >= s_.size()) error("unexpected end of input");
    return s_[i_];
  }
  void expect(char c) {
    if (peek() != c) error(std::string("expected '") + c + "'");
    ++i_;
  }
  bool literal(std::string_view word) {
    if (s_.substr(i_, word.size()) != word) return false;
    i_ += word.size();
    return true;
  }

  value parse_value(int depth) {
    if (depth > max_depth) error("nesting deeper than 64 levels");
    const char c = peek();
    if (c == '{') return parse_object(depth);
    if (c == '[') return parse_array(depth);
    if (c == '"') return {parse_string()};
    if (literal("true")) return {true};
    if (literal("false")) return {false};
    if (literal("null")) return {nullptr};
    if (c == '-' || (c >= '0' && c <= '9')) return {parse_number()};
    error("unexpected character");
  }

  value parse_object(int depth) {
    expect('{');
    object obj;
    if (peek() == '}') {
      ++i_;
      return {std::move(obj)};
    }
    for (;;) {
      if (peek() != '"') error("expected a string key");
      std::string key = parse_string();
      for (const auto& kv : obj)
        if (kv.first == key) error("duplicate key \"" + key + "\"");
      expect(':');
      obj.emplace_back(std::move(key), parse_value(depth + 1));
      const char c = peek();
      ++i_;
      if (c == '}') return {std::move(obj)};
      if (c != ',') error("expected ',' or '}'");
    }
  }

  value parse_array(int depth) {
    expect('[');
    array arr;
    if (peek() == ']') {
      ++i_;
      return {std::move(arr)};
    }
    for (;;) {
      arr.push_back(parse_value(depth + 1));
      const char c = peek();
      ++i_;
      if (c == ']') return {std::move(arr)};
      if (c != ',') error("expected ',' or ']'");
    }
  }

  // JSON number grammar, checked by hand, then converted by strtod (the text is NUL-free).
  double parse_number() {
    const std::size_t start = i_;
    if (s_[i_] == '-') ++i_;
    const auto digits = [&] {
      const std::size_t d = i_;
      while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') ++i_;
      if (i_ == d) error("malformed number");
    };
    if (i_ < s_.size() && s_[i_] == '0')
      ++i_;
    else
      digits();
    if (i_ < s_.size() && s_[i_] == '.') {
      ++i_;
      digits();
    }
    if (i_ < s_.size() && (s_[i_] == 'e' || s_[i_] == 'E')) {
      ++i_;
      if (i_ < s_.size() && (s_[i_] == '+' || s_[i_] == '-')) ++i_;
      digits();
    }
    const std::string text(s_.substr(start, i_ - start));
    return std::strtod(text.c_str(), nullptr);
  }

  std::string parse_string() {
    expect('"');
    std::string out;
    for (;;) {
      if (i_ >= s_.size()) error("unterminated string");
      const char c = s_[i_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) error("control character in string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i_ >= s_.size()) error("unterminated escape");
      const char e = s_[i_++];
      switch (e) {
        case '"':
          out += '"';
          break;
        case '\\':
          out += '\\';
          break;
        case '/':
          out += '/';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'u':
          append_utf8(out, hex4());
          break;
        default:
          error("unknown escape");
      }
    }
  }
  unsigned hex4() {
    if (i_ + 4 > s_.size()) error("short \\u escape");
    unsigned x = 0;
    for (int k = 0; k < 4; ++k) {
      const char h = s_[i_++];
      x <<= 4;
      if (h >= '0' && h <= '9')
        x |= unsigned(h - '0');
      else if (h >= 'a' && h <= 'f')
        x |= unsigned(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F')
        x |= unsigned(h - 'A' + 10);
      else
        error("bad hex digit in \\u escape");
    }
    return x;
  }
  // Surrogate pairs are not needed by safetensors headers; a lone code unit is encoded as is.
  static void append_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xE0 | (cp >> 12));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    }
  }

  std::string_view s_;
  std::size_t i_ = 0;
};

}  // namespace detail

/// Parses one JSON document; throws dms::error on anything malformed.
inline value parse(std::string_view text) {
  if (text.find('\0') != std::string_view::npos)
    dms::detail::fail("JSON: NUL byte at offset ", text.find('\0'));
  return detail::parser(text).parse_document();
}

}  // namespace mqar::json
