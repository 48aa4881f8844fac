// SPDX-License-Identifier: Apache-2.0
#pragma once

// Host-side error reporting. Every host API validates its input before it mutates anything and
// throws dms::error with a message that names the offending value and the valid range, so a failed
// call leaves the cache exactly as it was. Device APIs never throw; they return a status.

#include <cmath>
#include <cstddef>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#include "dms/config.hpp"

DMS_NAMESPACE_BEGIN

/// The one exception type of the library.
class error : public std::runtime_error {
 public:
  explicit error(const std::string& what) : std::runtime_error("dms: " + what) {}
};

namespace detail {

template <class... Parts>
[[noreturn]] void fail(Parts&&... parts) {
  std::ostringstream os;
  (os << ... << std::forward<Parts>(parts));
  throw error(os.str());
}

/// Throws unless lo <= value <= hi; the message reads "<what> = <value> is outside [lo, hi]".
template <class V, class L, class H>
void check_range(const char* what, const V& value, const L& lo, const H& hi) {
  if (value < lo || value > hi)
    fail(what, " = ", value, " is outside the valid range [", lo, ", ", hi, "]");
}

/// Throws unless a span-like argument has exactly the expected number of elements.
inline void check_size(const char* what, std::size_t got, std::size_t expected) {
  if (got != expected) fail(what, " has ", got, " elements; expected ", expected);
}

/// Throws unless every element of x from `begin` on is finite (to_float_fn converts an element
/// to float). x is [rows][cols], or [rows][cols / inner][inner] when inner > 0; the message names
/// the tensor, the element's index, its value and `where` (e.g. "sequence 3"). One pass, no
/// allocation.
template <class Span, class ToFloat>
void check_finite(const char* what, const Span& x, std::size_t begin, std::size_t cols,
                  std::size_t inner, const char* where_label, long long where,
                  ToFloat to_float_fn) {
  for (std::size_t i = begin; i < x.size(); ++i) {
    const float f = to_float_fn(x[i]);
    if (!std::isfinite(f)) {
      if (inner > 0)
        fail(what, "[", i / cols, "][", i % cols / inner, "][", i % inner, "] = ", f,
             " is not finite (", where_label, " ", where, ")");
      fail(what, "[", i / cols, "][", i % cols, "] = ", f, " is not finite (", where_label, " ",
           where, ")");
    }
  }
}

}  // namespace detail

DMS_NAMESPACE_END
