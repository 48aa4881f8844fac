// SPDX-License-Identifier: Apache-2.0
#pragma once

// The CPU fast path: SIMD (AVX-512, AVX2, 128-bit, scalar; picked at run time), multi-threaded
// decode and prefill attention over the paged cache, drop-in equivalents of dms::reference's
// entry points. Needs no compiler flag beyond C++20 (and -pthread on toolchains older than
// glibc 2.34). See README, "The CPU fast path".

#include "dms/cpu/decode.hpp"
#include "dms/cpu/executor.hpp"
#include "dms/cpu/prefill.hpp"
#include "dms/cpu/simd/level.hpp"
#include "dms/cpu/thread_pool.hpp"
