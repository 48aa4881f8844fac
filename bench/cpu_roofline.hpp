// SPDX-License-Identifier: Apache-2.0
#pragma once

// The same-run read rooflines of dms_bench_cpu, measured once by main() (cpu_decode.cpp) before
// any benchmark runs, for the other bench/cpu_*.cpp files to compare against: the best of five
// passes of a vectorized read-only sum over a buffer well beyond the last-level cache, on one
// thread and on two (each streaming its own half).

namespace dms_bench {

extern double one_core_read_roofline;  // bytes/s
extern double two_core_read_roofline;  // bytes/s

}  // namespace dms_bench
