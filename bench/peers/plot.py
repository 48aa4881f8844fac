#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Tables and plots from benchmark output, for docs/performance.md.

Reads Google Benchmark JSON (dms_bench_cpu / dms_bench_cuda --benchmark_out=... with
--benchmark_out_format=json; with repetitions the "median" aggregates are used, otherwise the
median of the plain runs) and, optionally, the JSON of bench/peers/torch_decode.py. Writes one
markdown file of tables and, with matplotlib, PNG plots next to it:

  decode_bandwidth.png   dms decode benchmarks: KV bytes/s against context, one line per
                         (storage, policy, batch), with the same-run read roofline
  decode_tokens.png      the same benchmarks in tokens/s
  torch_decode.png       torch SDPA decode: bytes/s against context per (backend, batch), with the
                         device read roofline of dms_bench_cuda if one of the inputs has it

Usage:
  python3 bench/peers/plot.py build/release/bench_cpu.json --out-dir perf/
  python3 bench/peers/plot.py bench_cuda.json --torch torch_decode.json --out-dir perf/
Without matplotlib the tables are still written; the script then says so and exits with 3.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict

# Name parts that are flags of Google Benchmark, not parameters of the benchmark.
_RUN_FLAGS = {"real_time", "manual_time", "process_time"}


def parse_name(run_name: str):
    """'decode/bf16/dense/batch:1/context:1024/real_time' -> ('decode/bf16/dense', {...})."""
    family, params = [], {}
    for part in run_name.split("/"):
        if part in _RUN_FLAGS:
            continue
        if ":" in part:
            key, _, value = part.partition(":")
            try:
                params[key] = int(value)
            except ValueError:
                params[key] = value
        else:
            family.append(part)
    return "/".join(family), params


def load_benchmark_json(path: str):
    """One record per benchmark instance: median values, context, errors."""
    with open(path) as f:
        data = json.load(f)
    context = data.get("context", {})
    medians, plain, errors = {}, defaultdict(list), {}
    for b in data.get("benchmarks", []):
        run_name = b.get("run_name", b["name"])
        if b.get("error_occurred"):
            errors[run_name] = b.get("error_message", "error")
            continue
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") == "median":
                medians[run_name] = b
        else:
            plain[run_name].append(b)
    records = []
    for run_name in list(medians) + [n for n in plain if n not in medians]:
        if run_name in medians:
            values = {k: v for k, v in medians[run_name].items() if isinstance(v, (int, float))}
            unit = medians[run_name].get("time_unit", "ns")
        else:
            runs = plain[run_name]
            keys = set.intersection(*(set(k for k, v in r.items() if isinstance(v, (int, float))) for r in runs))
            values = {k: statistics.median(r[k] for r in runs) for k in keys}
            unit = runs[0].get("time_unit", "ns")
        family, params = parse_name(run_name)
        records.append({"source": path, "run_name": run_name, "family": family, "params": params,
                        "values": values, "time_unit": unit})
    for run_name, message in errors.items():
        family, params = parse_name(run_name)
        records.append({"source": path, "run_name": run_name, "family": family, "params": params,
                        "values": {}, "time_unit": "", "error": message})
    return context, records


def fmt(x, digits=3):
    """3 significant digits; plain integers with thousands separators from 10^4 up."""
    if x is None:
        return "-"
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        if abs(x) >= 1e4:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}" if isinstance(x, float) else str(x)
    return str(x)


def benchmark_table(records) -> str:
    cols = [
        ("time", lambda r: f"{fmt(r['values'].get('real_time'), 4)} {r['time_unit']}" if r["values"] else "-"),
        ("GB/s", lambda r: fmt(r["values"]["bytes_per_second"] / 1e9) if "bytes_per_second" in r["values"] else "-"),
        ("frac. of 1-core read roofline",
         lambda r: fmt(r["values"].get("frac_of_1core_read_roofline")) if "frac_of_1core_read_roofline" in r["values"] else "-"),
        ("tokens/s", lambda r: fmt(r["values"].get("tokens_per_s")) if "tokens_per_s" in r["values"] else "-"),
        ("KV bytes/step", lambda r: fmt(r["values"].get("kv_bytes_per_step")) if "kv_bytes_per_step" in r["values"] else "-"),
        ("slots read/row", lambda r: fmt(r["values"].get("slots_read_per_row")) if "slots_read_per_row" in r["values"] else "-"),
        ("compression", lambda r: fmt(r["values"].get("compression")) if "compression" in r["values"] else "-"),
    ]
    lines = ["| benchmark | " + " | ".join(c for c, _ in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['run_name']} | skipped: {r['error']} |" + " |" * (len(cols) - 1))
            continue
        lines.append(f"| {r['run_name']} | " + " | ".join(f(r) for _, f in cols) + " |")
    return "\n".join(lines)


def torch_table(entries) -> str:
    lines = ["| backend | batch | context | median us | GB/s | KV bytes | note |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for e in sorted(entries, key=lambda e: (e["backend"], e["batch"], e["context"])):
        note = e.get("skipped") or ("K/V expanded to the query heads" if e.get("gqa") == "expanded" else "")
        gbs = e["bytes_per_s"] / 1e9 if e.get("bytes_per_s") else None
        lines.append(f"| {e['backend']} | {e['batch']} | {e['context']} | {fmt(e.get('median_us'), 4)} | "
                     f"{fmt(gbs)} | {e['kv_bytes']} | {note} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench_json", nargs="*", help="Google Benchmark JSON files")
    p.add_argument("--torch", dest="torch_json", help="JSON written by torch_decode.py")
    p.add_argument("--out-dir", default=".", help="where tables.md and the PNGs go")
    p.add_argument("--no-plots", action="store_true", help="write the tables only")
    args = p.parse_args()
    if not args.bench_json and not args.torch_json:
        p.error("give at least one Google Benchmark JSON file or --torch")
    os.makedirs(args.out_dir, exist_ok=True)

    contexts, records = [], []
    for path in args.bench_json:
        ctx, recs = load_benchmark_json(path)
        contexts.append((path, ctx))
        records.extend(recs)
    torch_entries = []
    if args.torch_json:
        with open(args.torch_json) as f:
            torch_entries = json.load(f)

    md = []
    for path, ctx in contexts:
        md.append(f"## {os.path.basename(path)}\n")
        keys = ["date", "host_name", "num_cpus", "mhz_per_cpu", "library_build_type",
                "one_core_read_roofline_bytes_per_s", "roofline_buffer_MiB", "cuda_device", "cuda_versions",
                "dms_version"]
        md.extend(f"- {k}: {ctx[k]}" for k in keys if k in ctx)
        md.append("")
        md.append(benchmark_table([r for r in records if r["source"] == path]))
        md.append("")
    if torch_entries:
        first = torch_entries[0]
        md.append(f"## torch SDPA decode ({first.get('device', '?')}, torch {first.get('torch', '?')})\n")
        md.append(torch_table(torch_entries))
        md.append("")
    table_path = os.path.join(args.out_dir, "tables.md")
    with open(table_path, "w") as f:
        f.write("\n".join(md))
    print(f"wrote {table_path}")
    if args.no_plots:
        return 0

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot.py: matplotlib is not installed (pip install matplotlib); wrote the tables only, "
              "no PNG plots. Pass --no-plots to skip plotting on purpose.", file=sys.stderr)
        return 3

    written = []
    decode = [r for r in records if r["family"].startswith("decode/") and "error" not in r]
    if decode:
        roofline = None
        for _, ctx in contexts:
            if "one_core_read_roofline_bytes_per_s" in ctx:
                roofline = float(ctx["one_core_read_roofline_bytes_per_s"])
        for counter, fname, ylabel, scale in [
            ("bytes_per_second", "decode_bandwidth.png", "KV bytes read per second (GB/s)", 1e9),
            ("tokens_per_s", "decode_tokens.png", "decoded tokens per second", 1.0),
        ]:
            series = defaultdict(list)
            for r in decode:
                if counter in r["values"]:
                    label = f"{r['family'].removeprefix('decode/')} batch {r['params'].get('batch', '?')}"
                    series[label].append((r["params"].get("context", 0), r["values"][counter] / scale))
            fig, ax = plt.subplots(figsize=(9, 5.5))
            for label, pts in sorted(series.items()):
                pts.sort()
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
            if counter == "bytes_per_second" and roofline:
                ax.axhline(roofline / 1e9, color="k", linestyle="--", label="1-core read roofline")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context (tokens per row)")
            ax.set_ylabel(ylabel)
            ax.set_title("dms CPU reference decode")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            out = os.path.join(args.out_dir, fname)
            fig.savefig(out, dpi=120)
            plt.close(fig)
            written.append(out)

    measured = [e for e in torch_entries if e.get("median_us")]
    if measured:
        gpu_roofline = max((r["values"]["bytes_per_second"] for r in records
                            if r["family"] == "read_roofline/uint4" and "bytes_per_second" in r["values"]),
                           default=None)
        series = defaultdict(list)
        for e in measured:
            series[f"{e['backend']} batch {e['batch']}"].append((e["context"], e["bytes_per_s"] / 1e9))
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
        if gpu_roofline:
            ax.axhline(gpu_roofline / 1e9, color="k", linestyle="--", label="device read roofline")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens per sequence)")
        ax.set_ylabel("KV bytes read per second (GB/s)")
        ax.set_title(f"torch SDPA decode, {measured[0].get('device', '')}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        out = os.path.join(args.out_dir, "torch_decode.png")
        fig.savefig(out, dpi=120)
        plt.close(fig)
        written.append(out)

    for out in written:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
