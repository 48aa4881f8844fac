// expect: prefetcht1 >= 30
// The AVX2 decode kernel's generic walk alone, compiled to assembly by check_asm.cmake: its
// software prefetches of the next block's keys and values must survive compilation (GCC 12 once
// deleted them all, unseen, from a lambda; results do not change, only speed, so no unit test
// can notice). The walks compiled for head_dim 64 and 128 run the same source with d known,
// which unrolls the prefetch loops into hundreds of instructions: counted with them, losing the
// key prefetches would still leave far more than any threshold that tells the two apart
// (GCC 12: 42 here, 24 with the key prefetches lost; Clang 14: 66).
#include "dms/cpu/decode_kernel.hpp"

#if DMS_CPU_HAS_X86_TARGETS
template void dms::cpu::simd::avx2::decode_walk<float, 0>(
    const dms::cpu::detail::decode_chunk_args<float>*, int) noexcept;
template void dms::cpu::simd::avx2::decode_walk<dms::bfloat16, 0>(
    const dms::cpu::detail::decode_chunk_args<dms::bfloat16>*, int) noexcept;
#endif
