#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Peer baseline: torch attention on the CPU, for docs/performance/cpu_fast_path.md.

The shapes of bench/cpu_fast.cpp: GQA with 32 query heads and 8 KV heads, head_dim 128.

  decode   one query token per sequence over a dense cache of `context` tokens, batch x context
           in {1,4,16} x {4K,16K,64K}: scores = q @ K^T (the G = 4 query heads of a KV head
           share its K in one batched matmul, no K/V copies), softmax, @ V.
  prefill  a whole prompt of T tokens, T in {1K,4K,16K}, unfused: per query head,
           S = Q K^T (T x T), the causal mask, softmax, @ V: what torch does without a fused
           kernel (torch 1.13 has no scaled_dot_product_attention).

Timing: time.perf_counter around each call, after warmup calls; the median over repetitions.
Run it in the same session as dms_bench_cpu and with the same thread count, e.g.

  OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python3 bench/peers/torch_cpu.py --threads 2 \\
      --out build/release/torch_cpu.json

Output: a JSON list, one entry per (kind, dtype, batch, context or tokens):
  {"kind", "dtype", "batch", "context" | "tokens", "median_us", "reps", "threads",
   "kv_bytes" (decode: the cache's K and V bytes), "causal_gflops" (prefill: 4 x heads x
   head_dim x T (T + 1) / 2 flops over the median time, the yardstick of bench/cpu_fast.cpp)}
A shape over --max-gb of memory gets "median_us": null and a "skipped" reason.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", nargs="+", default=["decode", "prefill"], choices=["decode", "prefill"])
    p.add_argument("--dtypes", nargs="+", default=["f32", "bf16"], choices=["f32", "bf16"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--prefill-dtypes", nargs="+", default=["f32"], choices=["f32", "bf16"])
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per decode shape")
    p.add_argument("--prefill-reps", type=int, default=3, help="timed repetitions per prefill shape")
    p.add_argument("--max-gb", type=float, default=10.0, help="skip shapes needing more memory")
    p.add_argument("--out", default="torch_cpu.json", help="JSON output path")
    return p.parse_args()


def median_us(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> int:
    args = parse_args()
    try:
        import torch
    except ImportError as e:
        print(f"torch_cpu.py: needs torch ({e})", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16}
    H, Hk, d = args.q_heads, args.kv_heads, args.head_dim
    G = H // Hk
    scale = 1.0 / math.sqrt(d)
    results = []

    if "decode" in args.kinds:
        for name in args.dtypes:
            dt = dtypes[name]
            for batch in args.batches:
                for context in args.contexts:
                    kv_bytes = batch * Hk * context * d * 2 * (4 if name == "f32" else 2)
                    entry = {"kind": "decode", "dtype": name, "batch": batch, "context": context,
                             "threads": args.threads, "kv_bytes": kv_bytes}
                    if kv_bytes * 1.2 > args.max_gb * 1e9:
                        entry.update(median_us=None, skipped=f"needs more than --max-gb {args.max_gb}")
                        results.append(entry)
                        continue
                    q = torch.randn(batch * Hk, G, d, dtype=dt)
                    k = torch.randn(batch * Hk, context, d, dtype=dt)
                    v = torch.randn(batch * Hk, context, d, dtype=dt)

                    def step():
                        s = torch.bmm(q, k.transpose(1, 2)) * scale
                        p = torch.softmax(s, dim=-1)
                        return torch.bmm(p, v)

                    us = median_us(step, args.reps)
                    entry.update(median_us=us, reps=args.reps, bytes_per_s=kv_bytes / (us * 1e-6))
                    print(f"decode {name} batch {batch} context {context}: {us:.1f} us", flush=True)
                    results.append(entry)
                    del q, k, v

    if "prefill" in args.kinds:
        for name in args.prefill_dtypes:
            dt = dtypes[name]
            for T in args.tokens:
                entry = {"kind": "prefill", "dtype": name, "batch": 1, "tokens": T,
                         "threads": args.threads}
                if T * T * 4 * 3 > args.max_gb * 1e9:
                    entry.update(median_us=None, skipped=f"needs more than --max-gb {args.max_gb}")
                    results.append(entry)
                    continue
                q = torch.randn(H, T, d, dtype=dt)
                k = torch.randn(Hk, T, d, dtype=dt)
                v = torch.randn(Hk, T, d, dtype=dt)
                mask = torch.ones(T, T, dtype=torch.bool).triu_(1)

                def prefill():
                    out = torch.empty(H, T, d, dtype=dt)
                    for h in range(H):
                        s = torch.mm(q[h], k[h // G].t()) * scale
                        s.masked_fill_(mask, float("-inf"))
                        out[h] = torch.mm(torch.softmax(s, dim=-1), v[h // G])
                    return out

                us = median_us(prefill, args.prefill_reps, warmup=1 if T <= 4096 else 0)
                flops = 4.0 * H * d * T * (T + 1) / 2
                entry.update(median_us=us, reps=args.prefill_reps,
                             causal_gflops=flops / (us * 1e-6) * 1e-9)
                print(f"prefill {name} tokens {T}: {us / 1e3:.1f} ms", flush=True)
                results.append(entry)
                del q, k, v, mask

    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "threads": args.threads, "results": results}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
