// expect: prefetcht1 >= 30
// The AVX2 decode kernel alone, compiled to assembly by check_asm.cmake: its software prefetches
// of the next block's keys and values must survive compilation (GCC 12 once deleted them all,
// unseen, from a lambda; results do not change, only speed, so no unit test can notice).
#include "dms/cpu/decode_kernel.hpp"

#if DMS_CPU_HAS_X86_TARGETS
template void dms::cpu::simd::avx2::decode_chunk<float>(
    const dms::cpu::detail::decode_chunk_args<float>&) noexcept;
template void dms::cpu::simd::avx2::decode_chunk<dms::bfloat16>(
    const dms::cpu::detail::decode_chunk_args<dms::bfloat16>&) noexcept;
#endif
