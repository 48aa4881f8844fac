# SPDX-License-Identifier: Apache-2.0
"""CUDA-event timing shared by the torch peer scripts: the same protocol as bench/*.cu."""

import statistics


def median_time_us(torch, fn, warmup: int, reps: int, flush) -> float:
    """Median over `reps` calls of fn(), in microseconds, each timed with CUDA events after an
    untimed write of `flush` (a buffer larger than the L2), after `warmup` untimed calls."""
    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times_us = []
    for i in range(reps):
        flush.fill_(i & 0xFF)  # untimed: evicts the inputs from L2 before every timed call
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times_us.append(start.elapsed_time(stop) * 1e3)
    return statistics.median(times_us)
