// SPDX-License-Identifier: Apache-2.0
#pragma once

// first_difference(a, b): a description of the first observable difference between two cache
// images, or "" if they hold the same cache. Shared by the CPU tests of the batched step
// algorithm and the GPU tests of its kernels. Only what a cache can observe is compared: slots
// and pages beyond a row's length hold leftovers and are ignored.

#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "dms/step/cache_image.hpp"

namespace dms_test {

template <class T>
bool same_bits(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

template <class T>
std::string first_difference(const dms::cache_image<T>& a, const dms::cache_image<T>& b) {
  std::ostringstream why;
  const auto& c = a.config;
  if (!(a.config == b.config)) return "configs differ";
  if (a.ring_length != b.ring_length) return "ring lengths differ";
  if (a.status != b.status) {
    why << "status " << a.status << " vs " << b.status;
    return why.str();
  }
  if (a.free_top != b.free_top) {
    why << "free_top " << a.free_top << " vs " << b.free_top;
    return why.str();
  }
  for (int i = 0; i < a.free_top; ++i)
    if (a.free_pages[i] != b.free_pages[i]) {
      why << "free_pages[" << i << "] " << a.free_pages[i] << " vs " << b.free_pages[i];
      return why.str();
    }
  for (int s = 0; s < c.max_sequences; ++s)
    if (a.active[s] != b.active[s]) {
      why << "active[" << s << "]";
      return why.str();
    }
  const auto ppr = std::size_t(c.max_pages_per_row());
  for (int r = 0; r < c.max_rows(); ++r) {
    const auto field = [&](const char* name, const std::vector<std::int32_t>& x,
                           const std::vector<std::int32_t>& y) {
      if (x[r] != y[r]) why << "row " << r << ": " << name << " " << x[r] << " vs " << y[r];
      return x[r] == y[r];
    };
    if (!field("length", a.row_length, b.row_length) || !field("live", a.live, b.live) ||
        !field("seen", a.seen, b.seen) || !field("peak", a.peak, b.peak) ||
        !field("hole_head", a.hole_head, b.hole_head))
      return why.str();
    const int len = a.row_length[r];
    const int pages = (len + c.page_size - 1) / c.page_size;
    for (int p = 0; p < pages; ++p) {
      const std::int32_t pa = a.page_table[r * ppr + p], pb = b.page_table[r * ppr + p];
      if (pa != pb) {
        why << "row " << r << " page " << p << ": id " << pa << " vs " << pb;
        return why.str();
      }
      if (!a.page_min.empty())
        for (int ch = 0; ch < c.head_dim; ++ch) {
          const auto at = std::size_t(pa) * c.head_dim + ch;
          if (!same_bits(a.page_min[at], b.page_min[at]) ||
              !same_bits(a.page_max[at], b.page_max[at])) {
            why << "row " << r << " page " << p << " channel " << ch << ": key bounds differ";
            return why.str();
          }
        }
    }
    for (int s = 0; s < len; ++s) {
      const auto at =
          std::size_t(a.page_table[r * ppr + s / c.page_size]) * c.page_size + s % c.page_size;
      if (a.position[at] != b.position[at]) {
        why << "row " << r << " slot " << s << ": position " << a.position[at] << " vs "
            << b.position[at];
        return why.str();
      }
      if (a.position[at] < 0) continue;  // a hole's K/V and score are leftovers
      if (!a.score.empty() && !same_bits(a.score[at], b.score[at])) {
        why << "row " << r << " slot " << s << ": score " << a.score[at] << " vs " << b.score[at];
        return why.str();
      }
      for (int ch = 0; ch < c.head_dim; ++ch) {
        const auto e = at * c.head_dim + ch;
        if (!same_bits(a.k[e], b.k[e]) || !same_bits(a.v[e], b.v[e])) {
          why << "row " << r << " slot " << s << " channel " << ch << ": K/V differ";
          return why.str();
        }
      }
    }
    const int seq = r / c.num_kv_heads;
    if (!a.active[seq]) continue;
    for (int j = 0; j < a.ring_length; ++j) {
      const auto e = std::size_t(r) * a.ring_length + j;
      if (a.ring_slot[e] != b.ring_slot[e] ||
          (!a.ring_flag.empty() && a.ring_flag[e] != b.ring_flag[e])) {
        why << "row " << r << " ring entry " << j << " differs";
        return why.str();
      }
    }
  }
  return "";
}

}  // namespace dms_test
