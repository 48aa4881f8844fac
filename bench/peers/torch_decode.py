#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Peer baseline: torch SDPA decode on a GPU, for docs/performance/gpu.md.

One query token per sequence attends to a dense KV cache: GQA with 32 query heads and 8 KV
heads, head_dim 128, bf16, batch x context in {1,4,16,64} x {1K,4K,16K,32K}, with the cuDNN
and the flash backends of torch.nn.functional.scaled_dot_product_attention (selected with
torch.nn.attention.sdpa_kernel). Each repetition flushes the L2 (a memset of a scratch buffer,
outside the timed region) and is timed with CUDA events around the SDPA call alone; the reported
time is the median over the repetitions.

Output: a JSON list, one entry per (backend, batch, context):
  {"backend", "batch", "context", "median_us", "kv_bytes", "bytes_per_s", ...}
kv_bytes is the K and V bytes of the cache (batch x kv_heads x context x head_dim x 2 x 2 bytes),
the minimum a decode step has to read. A shape that does not fit in free device memory, or that
a backend rejects, gets an entry with "median_us": null and a "skipped" reason.

Usage (needs torch with CUDA; written for torch 2.11):
  python3 bench/peers/torch_decode.py --out torch_decode.json
  python3 bench/peers/torch_decode.py --batches 1 4 --contexts 4096 --reps 20
"""

from __future__ import annotations

import argparse
import json
import sys

from cuda_timing import median_time_us


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--backends", nargs="+", default=["cudnn", "flash"], choices=["cudnn", "flash", "efficient", "math"])
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=50, help="timed repetitions per shape (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per shape and backend first")
    p.add_argument(
        "--gqa-fallback",
        choices=["skip", "expand"],
        default="skip",
        help="if a backend rejects enable_gqa=True: skip the shape (default), or time it on K/V "
        "expanded to q-heads heads (then kv_bytes counts the expanded cache the kernel reads)",
    )
    p.add_argument("--mem-fraction", type=float, default=0.85, help="use at most this share of free device memory")
    p.add_argument("--out", default="torch_decode.json", help="JSON output path")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        print(f"torch_decode.py: needs torch with torch.nn.attention ({e})", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("torch_decode.py: no CUDA device; nothing measured", file=sys.stderr)
        return 2
    if args.q_heads % args.kv_heads != 0:
        print("torch_decode.py: --q-heads must be a multiple of --kv-heads", file=sys.stderr)
        return 2

    backends = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    dtype = torch.bfloat16
    elem = 2  # bytes per bf16
    l2_bytes = int(getattr(props, "L2_cache_size", 0) or 0)
    flush = torch.empty(max(256 << 20, 4 * l2_bytes), dtype=torch.uint8, device=dev)
    group = args.q_heads // args.kv_heads
    common = {
        "device": props.name,
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "dtype": "bf16",
        "q_heads": args.q_heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "reps": args.reps,
    }
    results = []

    def record(backend, batch, context, kv_bytes, median_us=None, skipped=None, **extra):
        entry = {
            "backend": backend,
            "batch": batch,
            "context": context,
            "median_us": median_us,
            "kv_bytes": kv_bytes,
            "bytes_per_s": (kv_bytes / (median_us * 1e-6)) if median_us else None,
        }
        if skipped:
            entry["skipped"] = skipped
        entry.update(extra)
        entry.update(common)
        results.append(entry)
        if median_us:
            print(f"{backend:9s} batch {batch:3d} context {context:6d}: {median_us:10.1f} us "
                  f"{entry['bytes_per_s'] / 1e9:8.1f} GB/s", flush=True)
        else:
            print(f"{backend:9s} batch {batch:3d} context {context:6d}: skipped ({skipped})", flush=True)

    def time_call(fn):
        return median_time_us(torch, fn, args.warmup, args.reps, flush)

    for batch in args.batches:
        for context in args.contexts:
            kv_elems = batch * args.kv_heads * context * args.head_dim
            kv_bytes = 2 * kv_elems * elem
            q_bytes = 2 * batch * args.q_heads * args.head_dim * elem  # q and out
            free, _ = torch.cuda.mem_get_info()
            if kv_bytes + q_bytes > args.mem_fraction * free:
                for name in args.backends:
                    record(name, batch, context, kv_bytes,
                           skipped=f"needs {(kv_bytes + q_bytes) / 2**30:.1f} GiB, "
                           f"{free / 2**30:.1f} GiB free")
                continue
            gen = torch.Generator(device=dev).manual_seed(batch * 100003 + context)
            q = torch.randn(batch, args.q_heads, 1, args.head_dim, device=dev, dtype=dtype, generator=gen)
            k = torch.randn(batch, args.kv_heads, context, args.head_dim, device=dev, dtype=dtype, generator=gen)
            v = torch.randn(batch, args.kv_heads, context, args.head_dim, device=dev, dtype=dtype, generator=gen)

            for name in args.backends:
                backend = backends[name]

                def sdpa(kk=k, vv=v, gqa=True):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=gqa)

                try:
                    median_us = time_call(sdpa)
                    record(name, batch, context, kv_bytes, median_us, gqa="native")
                    continue
                except (RuntimeError, ValueError) as e:  # backend rejects the shape or runs out of memory
                    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                    torch.cuda.synchronize()
                if args.gqa_fallback != "expand":
                    record(name, batch, context, kv_bytes, skipped=f"enable_gqa rejected: {reason}")
                    continue
                free, _ = torch.cuda.mem_get_info()
                expanded_bytes = kv_bytes * group
                if expanded_bytes > args.mem_fraction * free:
                    record(name, batch, context, kv_bytes,
                           skipped=f"enable_gqa rejected ({reason}); expanded K/V does not fit")
                    continue
                ke = k.repeat_interleave(group, dim=1)
                ve = v.repeat_interleave(group, dim=1)
                try:
                    median_us = time_call(lambda: sdpa(ke, ve, False))
                    record(name, batch, context, expanded_bytes, median_us, gqa="expanded",
                           gqa_rejected=reason)
                except (RuntimeError, ValueError) as e:  # backend rejects the shape or runs out of memory
                    record(name, batch, context, kv_bytes,
                           skipped=f"enable_gqa rejected ({reason}); expanded: {str(e).strip()[:200]}")
                del ke, ve
                torch.cuda.empty_cache()
            del q, k, v
            torch.cuda.empty_cache()

    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {len(results)} entries to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
