#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Peer baselines: torch prefill attention on a GPU, for docs/performance/gpu.md (issue 4).

A whole prompt of T tokens attends to itself causally: GQA with 32 query heads and 8 KV heads,
head_dim 128, bf16, batch 1, T in {4K, 16K, 32K}. Backends:

  sdpa_flash, sdpa_cudnn  torch.nn.functional.scaled_dot_product_attention(is_causal=True), dense
                          causal, selected with torch.nn.attention.sdpa_kernel
  flex_dms                FlexAttention (torch.compile'd) with the DMS mask: key j is visible to
                          query t iff j <= t and (j unflagged or t - j <= window), window 512,
                          flags drawn at random per (KV head, token) with P(flagged) = 1 - 1 /
                          compression (default 8), the last token unflagged (its decision is not
                          known yet). This is how the DMS reference does prefill.
  flex_causal             FlexAttention with the causal mask alone (what flex costs without DMS)

The block masks are built once per shape, outside the timed region. Each repetition flushes the L2
(a memset of a scratch buffer, untimed) and is timed with CUDA events around the attention call;
the reported time is the median over the repetitions.

Output: a JSON list, one entry per (backend, batch, tokens):
  {"backend", "batch", "tokens", "median_us", "causal_tflops", "kept_fraction", ...}
causal_tflops counts the FLOPs of dense causal attention (4 x batch x q_heads x head_dim x
T (T + 1) / 2) over the median time, the same yardstick for every backend. kept_fraction (flex_dms)
is the share of tokens a DMS cache would hold after the prompt: unflagged tokens older than the
window plus the last window + 1 tokens, averaged over KV heads (1 / compression ratio). A shape
that does not fit in free memory, or that a backend rejects, gets "median_us": null and a
"skipped" reason.

Usage (needs torch >= 2.5 with CUDA; written for torch 2.11):
  python3 bench/peers/torch_prefill.py --out torch_prefill.json
  python3 bench/peers/torch_prefill.py --tokens 8192 --backends sdpa_flash flex_dms --reps 10
"""

from __future__ import annotations

import argparse
import json
import sys

from cuda_timing import median_time_us


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument(
        "--backends",
        nargs="+",
        default=["sdpa_flash", "sdpa_cudnn", "flex_dms", "flex_causal"],
        choices=["sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex_dms", "flex_causal"],
    )
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=512, help="DMS sliding window w")
    p.add_argument("--compression", type=float, default=8.0,
                   help="flags are drawn with P(flagged) = 1 - 1 / compression")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per shape (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per shape and backend first")
    p.add_argument("--mem-fraction", type=float, default=0.85, help="use at most this share of free device memory")
    p.add_argument("--out", default="torch_prefill.json", help="JSON output path")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        print(f"torch_prefill.py: needs torch with torch.nn.attention ({e})", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("torch_prefill.py: no CUDA device; nothing measured", file=sys.stderr)
        return 2
    if args.q_heads % args.kv_heads != 0:
        print("torch_prefill.py: --q-heads must be a multiple of --kv-heads", file=sys.stderr)
        return 2
    if args.compression < 1.0:
        print("torch_prefill.py: --compression must be >= 1", file=sys.stderr)
        return 2
    want_flex = any(b.startswith("flex") for b in args.backends)
    flex_attention = create_block_mask = None
    flex_missing = None
    if want_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            flex_attention = torch.compile(flex_attention, dynamic=False)
        except ImportError as e:
            flex_missing = f"FlexAttention unavailable: {e}"

    sdpa_backends = {
        "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    dtype = torch.bfloat16
    elem = 2  # bytes per bf16
    group = args.q_heads // args.kv_heads
    l2_bytes = int(getattr(props, "L2_cache_size", 0) or 0)
    flush = torch.empty(max(256 << 20, 4 * l2_bytes), dtype=torch.uint8, device=dev)
    p_flag = 1.0 - 1.0 / args.compression
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

    def record(backend, batch, tokens, median_us=None, skipped=None, **extra):
        flops = 4.0 * batch * args.q_heads * args.head_dim * tokens * (tokens + 1) / 2
        entry = {
            "backend": backend,
            "batch": batch,
            "tokens": tokens,
            "median_us": median_us,
            "causal_tflops": (flops / (median_us * 1e-6) / 1e12) if median_us else None,
        }
        if skipped:
            entry["skipped"] = skipped
        entry.update(extra)
        entry.update(common)
        results.append(entry)
        if median_us:
            print(f"{backend:14s} batch {batch:3d} tokens {tokens:6d}: {median_us:10.1f} us "
                  f"{entry['causal_tflops']:7.1f} causal TFLOP/s", flush=True)
        else:
            print(f"{backend:14s} batch {batch:3d} tokens {tokens:6d}: skipped ({skipped})", flush=True)

    def time_call(fn):
        return median_time_us(torch, fn, args.warmup, args.reps, flush)

    def reason_of(e: BaseException) -> str:
        text = str(e).strip()
        return text.splitlines()[0][:200] if text else type(e).__name__

    for batch in args.batches:
        for tokens in args.tokens:
            qo_bytes = 2 * batch * args.q_heads * tokens * args.head_dim * elem  # q and out
            kv_bytes = 2 * batch * args.kv_heads * tokens * args.head_dim * elem
            free, _ = torch.cuda.mem_get_info()
            if qo_bytes + kv_bytes > args.mem_fraction * free:
                for name in args.backends:
                    record(name, batch, tokens, skipped=f"needs {(qo_bytes + kv_bytes) / 2**30:.1f} GiB, "
                           f"{free / 2**30:.1f} GiB free")
                continue
            gen = torch.Generator(device=dev).manual_seed(args.seed * 1000003 + batch * 100003 + tokens)
            q = torch.randn(batch, args.q_heads, tokens, args.head_dim, device=dev, dtype=dtype, generator=gen)
            k = torch.randn(batch, args.kv_heads, tokens, args.head_dim, device=dev, dtype=dtype, generator=gen)
            v = torch.randn(batch, args.kv_heads, tokens, args.head_dim, device=dev, dtype=dtype, generator=gen)

            # DMS flags per (sequence, KV head, token); the newest token's decision is unknown (kept).
            flagged = torch.rand(batch, args.kv_heads, tokens, device=dev, generator=gen) < p_flag
            flagged[:, :, -1] = False
            w = args.window
            old = max(tokens - (w + 1), 0)
            kept = (~flagged[:, :, :old]).sum(dim=-1).float() + min(tokens, w + 1)
            kept_fraction = float((kept / tokens).mean())

            for name in args.backends:
                if name in sdpa_backends:
                    backend = sdpa_backends[name]

                    def sdpa(backend=backend):
                        with sdpa_kernel(backend):
                            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

                    try:
                        record(name, batch, tokens, time_call(sdpa))
                    except (RuntimeError, ValueError) as e:  # backend rejects the shape or runs out of memory
                        torch.cuda.synchronize()
                        record(name, batch, tokens, skipped=reason_of(e))
                    continue

                if flex_missing:
                    record(name, batch, tokens, skipped=flex_missing)
                    continue
                if name == "flex_dms":

                    def mask_mod(b, h, q_idx, kv_idx, flagged=flagged, w=w):
                        keep = ~flagged[b, h // group, kv_idx] | (q_idx - kv_idx <= w)
                        return (kv_idx <= q_idx) & keep

                else:

                    def mask_mod(b, h, q_idx, kv_idx):
                        return kv_idx <= q_idx

                try:
                    shape = dict(B=batch, H=args.q_heads, Q_LEN=tokens, KV_LEN=tokens, device=dev)
                    try:  # compiled: does not materialize the T x T mask
                        block_mask = create_block_mask(mask_mod, _compile=True, **shape)
                    except TypeError:  # a torch without the _compile flag
                        block_mask = create_block_mask(mask_mod, **shape)
                    median_us = time_call(
                        lambda bm=block_mask: flex_attention(q, k, v, block_mask=bm, enable_gqa=True))
                    extra = {"window": w, "compression": args.compression,
                             "kept_fraction": kept_fraction} if name == "flex_dms" else {}
                    record(name, batch, tokens, median_us, **extra)
                    del block_mask
                except (RuntimeError, ValueError) as e:  # compile or shape failure, out of memory
                    torch.cuda.synchronize()
                    record(name, batch, tokens, skipped=reason_of(e))
                torch.cuda.empty_cache()
            del q, k, v, flagged
            torch.cuda.empty_cache()

    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {len(results)} entries to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
