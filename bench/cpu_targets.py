#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The four CPU fast-path targets (issue 12) as medians of alternated measurements.

On a shared VM the memory bandwidth moves by up to 2x within minutes, so a fraction of a roofline
measured once at startup, or a ratio of two programs run minutes apart, says more about the moment
than about the kernel. This script measures each ratio from runs that alternate, and reports the
median and the range:

  1. dense decode / read roofline, two threads, for each (K/V type, batch, context): one
     dms_bench_cpu process per shape runs the two-thread `read_roofline` and the decode shape
     with --benchmark_repetitions and --benchmark_enable_random_interleaving, so the two
     alternate in random order; the ratio of the medians of their bytes_per_second.
  2. torch's f32 decode time / ours at 16K (batch 1, 4, 16): rounds of one dms_bench_cpu process
     and one bench/peers/torch_cpu.py process, one after the other; the ratio per round.
  3. dense decode time / DMS 8x decode time at 16K: both in one process per round (one after the
     other, each with its own repetitions: switching shapes rebuilds the cache); the ratio per round.
  4. torch's unfused f32 prefill time / ours at 4K tokens (16K with --prefill-16k): rounds as in 2.

--placement adjacent measures 1-3 on the adjacent/ rows: caches with dms::page_placement::adjacent.
--placement both (target 1 only) interleaves the roofline and the dense decode over both
placements in one process per shape: an A/B of the placements that sees the same minutes.

Run it from the repository root after building the benchmark (cmake --preset release && cmake
--build build/release --target dms_bench_cpu), with nothing else running:

  OMP_WAIT_POLICY=PASSIVE python3 bench/cpu_targets.py --out build/release/cpu_targets.json

with a python3 that has torch (Debian's python3-torch; else --python names one, or --targets 1 3
measures what needs no torch).

It prints a Markdown table and writes every measurement to --out. Times: a few minutes per target
at the defaults (--rounds 3 --repetitions 7); torch's unfused prefill at 16K alone takes ~2 min
per round.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", default="build/release/bench/dms_bench_cpu")
    p.add_argument("--torch-peer", default="bench/peers/torch_cpu.py")
    p.add_argument("--python", default=sys.executable, help="the Python that has torch")
    p.add_argument("--targets", type=int, nargs="+", default=[1, 2, 3, 4], choices=[1, 2, 3, 4])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "f32"], choices=["bf16", "f32"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--repetitions", type=int, default=7, help="repetitions per benchmark (target 1, 3)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (targets 2, 3, 4)")
    p.add_argument("--min-time", type=float, default=0.2, help="--benchmark_min_time per repetition")
    p.add_argument("--prefill-16k", action="store_true", help="target 4 at 16K tokens too")
    p.add_argument("--placement", default="stack", choices=["stack", "adjacent", "both"],
                   help="the caches' page placement for targets 1-3 (adjacent: the adjacent/ rows;"
                        " both: target 1 only, the two interleaved)")
    p.add_argument("--out", default="cpu_targets.json")
    return p.parse_args()


def run_bench(args, regex: str, interleave: bool, repetitions: int) -> list:
    """Runs dms_bench_cpu on the benchmarks matching regex; returns its per-repetition entries."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [args.bench, f"--benchmark_filter={regex}", f"--benchmark_min_time={args.min_time}",
           f"--benchmark_repetitions={repetitions}", f"--benchmark_out={out}",
           "--benchmark_out_format=json"]
    if interleave:
        cmd.append("--benchmark_enable_random_interleaving=true")
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"cpu_targets: {' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    with open(out) as f:
        data = json.load(f)
    os.unlink(out)
    rows = [b for b in data["benchmarks"] if b.get("run_type", "iteration") == "iteration"]
    if not rows:
        sys.exit(f"cpu_targets: no benchmark matched {regex!r}")
    return rows


def by_name(rows: list, prefix: str) -> list:
    return [b for b in rows if b["name"].startswith(prefix)]


def prefix(args) -> str:
    """The benchmark-name prefix of the chosen page placement."""
    return "adjacent/" if args.placement == "adjacent" else ""


def run_torch(args, extra: list) -> list:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    subprocess.run([args.python, args.torch_peer, "--threads", "2", "--out", out] + extra,
                   check=True, stdout=subprocess.DEVNULL, env=env)
    with open(out) as f:
        data = json.load(f)
    os.unlink(out)
    return data["results"]


def seconds(b: dict) -> float:
    """A benchmark entry's real time per iteration in seconds."""
    scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b["time_unit"]]
    return b["real_time"] * scale


def summary(xs: list) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def fmt(s: dict, digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def target1(args, record: dict, table: list) -> None:
    prefixes = ["", "adjacent/"] if args.placement == "both" else [prefix(args)]
    for kv in args.dtypes:
        for batch in args.batches:
            for ctx in args.contexts:
                shape = f"decode_fast/{kv}/dense/threads:2/batch:{batch}/context:{ctx}/"
                names = [pre + shape for pre in prefixes]
                rows = run_bench(args, "^read_roofline/f32_sum/real_time/threads:2$|" +
                                 "|".join(f"^{n}" for n in names), True, args.repetitions)
                roof = [b["bytes_per_second"] for b in by_name(rows, "read_roofline/")]
                for name in names:
                    dec = [b["bytes_per_second"] for b in by_name(rows, name)]
                    if not dec:  # skipped for memory (DMS_BENCH_MAX_KV_GB)
                        continue
                    frac = statistics.median(dec) / statistics.median(roof)
                    placement = "adjacent" if name.startswith("adjacent/") else "stack"
                    record.setdefault("1", []).append(
                        {"kv": kv, "batch": batch, "context": ctx, "placement": placement,
                         "decode_bytes_per_s": dec, "roofline_bytes_per_s": roof,
                         "fraction_of_medians": frac})
                    label = f", {placement}" if len(names) > 1 else ""
                    table.append(f"| 1 | {kv} dense, batch {batch}, {ctx // 1024}K{label} | "
                                 f"{statistics.median(dec) / 1e9:.1f} GB/s of "
                                 f"{statistics.median(roof) / 1e9:.1f} GB/s (medians of "
                                 f"{len(dec)} + {len(roof)}) | {frac:.2f} | >= 0.75 |")


def target2(args, record: dict, table: list) -> None:
    ratios = {b: [] for b in args.batches}
    for _ in range(args.rounds):
        rows = run_bench(args, f"^{prefix(args)}decode_fast/f32/dense/threads:2/batch:[0-9]+/"
                         "context:16384/", False, 3)
        peer = run_torch(args, ["--kinds", "decode", "--dtypes", "f32", "--contexts", "16384",
                                "--batches"] + [str(b) for b in args.batches])
        for b in args.batches:
            ours = statistics.median(
                seconds(r) for r in by_name(rows, f"{prefix(args)}decode_fast/f32/dense/threads:2/batch:{b}/"))
            theirs = [p["median_us"] for p in peer if p["batch"] == b][0] * 1e-6
            ratios[b].append(theirs / ours)
    for b in args.batches:
        s = summary(ratios[b])
        record.setdefault("2", []).append({"batch": b, "torch_over_ours": ratios[b]})
        table.append(f"| 2 | f32 dense 16K, batch {b}: torch's time / ours | {args.rounds} rounds "
                     f"| {fmt(s)} | >= 3 |")


def target3(args, record: dict, table: list) -> None:
    for kv in args.dtypes:
        ratios = {b: [] for b in args.batches}
        for _ in range(args.rounds):
            rows = run_bench(args, f"^{prefix(args)}decode_fast/{kv}/(dense|dms8x)/threads:2/batch:[0-9]+/"
                             "context:16384/", False, 3)
            for b in args.batches:
                t = {}
                for pol in ("dense", "dms8x"):
                    t[pol] = statistics.median(
                        seconds(r) for r in by_name(rows, f"{prefix(args)}decode_fast/{kv}/{pol}/threads:2/batch:{b}/"))
                ratios[b].append(t["dense"] / t["dms8x"])
        for b in args.batches:
            s = summary(ratios[b])
            record.setdefault("3", []).append({"kv": kv, "batch": b, "dense_over_dms8x": ratios[b]})
            table.append(f"| 3 | {kv} 16K, batch {b}: dense time / DMS 8x time | {args.rounds} "
                         f"rounds | {fmt(s, 1)} | >= 6 |")


def target4(args, record: dict, table: list) -> None:
    tokens = [4096] + ([16384] if args.prefill_16k else [])
    ratios = {t: [] for t in tokens}
    for _ in range(args.rounds):
        alt = "|".join(str(t) for t in tokens)
        rows = run_bench(args, f"^prefill_fast/f32/dense/tokens:({alt})/", False, 1)
        peer = run_torch(args, ["--kinds", "prefill", "--prefill-reps", "1", "--tokens"] +
                         [str(t) for t in tokens])
        for t in tokens:
            ours = statistics.median(seconds(r) for r in by_name(rows, f"prefill_fast/f32/dense/tokens:{t}/"))
            theirs = [p["median_us"] for p in peer if p["kind"] == "prefill" and p["tokens"] == t][0] * 1e-6
            ratios[t].append(theirs / ours)
    for t in tokens:
        s = summary(ratios[t])
        record.setdefault("4", []).append({"tokens": t, "torch_over_ours": ratios[t]})
        table.append(f"| 4 | f32 dense prefill, {t // 1024}K tokens: torch's unfused time / ours | "
                     f"{args.rounds} rounds | {fmt(s, 1)} | > 1 |")


def main() -> int:
    args = parse_args()
    if not os.path.exists(args.bench):
        sys.exit(f"cpu_targets: {args.bench} not found; build it first (see --help)")
    if args.placement == "both" and args.targets != [1]:
        sys.exit("cpu_targets: --placement both measures target 1 only (add --targets 1)")
    record = {"args": vars(args)}
    print(f"page placement (targets 1-3): {args.placement}\n")
    print("| target | shape | measured | ratio: median (range) | goal |")
    print("|---|---|---|---|---|", flush=True)
    steps = {1: target1, 2: target2, 3: target3, 4: target4}
    for t in args.targets:
        table = []
        steps[t](args, record, table)
        print("\n".join(table), flush=True)
        with open(args.out, "w") as f:  # after every target, so an interrupted run keeps its part
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
