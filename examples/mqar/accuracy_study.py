# SPDX-License-Identifier: Apache-2.0
"""The accuracy study of docs/accuracy.md: every number comes from the C++ runner (dms_mqar), i.e.
from the library decoding the tiny model, never from a Python emulation.

    python3 examples/mqar/accuracy_study.py --bin build/release/examples/mqar/dms_mqar

1. dense, then for each DMS checkpoint (CR 2, 4, 8; window 16) its measured memory CR m and read
   CR r; every training-free policy at the budget that gives memory CR m (TOVA both rankings,
   H2O, StreamingLLM, SnapKV), and Quest (which keeps everything) at the budget that gives read
   CR r;
2. the ablation: DMS with window 0 (immediate eviction) at CR 8 against window 16;
3. hyper-scaling: at a fixed KV memory budget (pages per layer), the largest batch of concurrent
   sequences that decodes the whole set without exhausting the pool, for dense, DMS 4x and 8x,
   and the answers per second at that batch.

Writes docs/accuracy_results.jsonl (one JSON object per run), docs/accuracy.png (the plot) and
docs/accuracy_tables.md (the tables docs/accuracy.md shows), and prints the tables.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
MODEL = os.path.join(HERE, "model")
RATIOS = (2, 4, 8)
PAGE = 16


def shown(cmd):
    """The command as the docs show it: paths relative to the repository root."""
    return " ".join(os.path.relpath(c, ROOT) if os.path.isabs(c) else c for c in cmd)


def run(args, binary, extra, label):
    """One dms_mqar run; returns its JSON record (the runner appends one line per policy)."""
    out = os.path.join(args.work, f"{label}.jsonl")
    cmd = [binary, "--json", out, "--storage", args.storage] + extra
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t = time.time()
    if not (args.reuse and os.path.exists(out) and os.path.getsize(out) > 0):  # --reuse: keep a measured cell
        if os.path.exists(out):
            os.remove(out)
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            return {"error": (p.stderr or p.stdout).strip(), "label": label, "cmd": shown(cmd)}
    with open(out) as f:
        rec = json.loads(f.readline())
    rec["label"] = label
    for key in ("model", "eval"):  # the runner reports the files it read; the docs show them relative
        if isinstance(rec.get(key), str) and os.path.isabs(rec[key]):
            rec[key] = os.path.relpath(rec[key], ROOT)
    rec["cmd"] = shown(cmd)
    print(f"  {label:<28} acc {rec['accuracy']:.4f} +- {rec['stderr']:.4f}  memCR {rec['memory_cr']:.3f}  "
          f"reads {rec['kv_reads']}  ({time.time() - t:.0f} s)", flush=True)
    return rec


def model(name):
    return os.path.join(MODEL, name)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="the dms_mqar executable")
    ap.add_argument("--storage", default="bf16")
    ap.add_argument("--count", type=int, default=-1, help="sequences (default: all 256)")
    ap.add_argument("--work", default=os.path.join(ROOT, "build", "accuracy_study"), help="scratch folder")
    ap.add_argument("--docs", default=os.path.join(ROOT, "docs"))
    ap.add_argument("--skip-hyperscaling", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="dms_mqar --threads (0: its default pool)")
    ap.add_argument("--reuse", action="store_true", help="keep the cells already in --work")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    binary = os.path.abspath(args.bin)
    common = ["--count", str(args.count)] if args.count > 0 else []
    results = []

    def go(extra, label, **tags):
        rec = run(args, binary, common + extra, label)
        rec.update(tags)
        results.append(rec)
        return rec

    print("dense")
    dense = go(["--model", model("dense.safetensors"), "--policy", "dense"], "dense", group="dense")
    decode_rows = dense["decode_tokens"] * 2 * 2  # rows = layers x KV heads
    dense_slots_per_read = dense["kv_reads"] / decode_rows

    for R in RATIOS:
        print(f"CR {R}")
        d = go(["--model", model(f"dms_cr{R}.safetensors"), "--policy", "dms"], f"dms_cr{R}", group=R, policy_key="DMS")
        if "error" in d:
            print(d["error"])
            continue
        m = d["memory_cr"]
        r = dense["kv_reads"] / d["kv_reads"]
        d["read_cr"] = r
        for key, pol, extra in [("TOVA", "tova", []), ("TOVA (layer avg)", "tova", ["--tova-ranking", "layer_average"]),
                                ("H2O", "h2o", []), ("StreamingLLM", "streaming", []), ("SnapKV", "snapkv", [])]:
            go(["--model", model("dense.safetensors"), "--policy", pol, "--ratio", f"{m:.6f}"] + extra,
               f"{pol}{'_layeravg' if extra else ''}_cr{R}", group=R, policy_key=key)
        qb = max(PAGE, int(round(dense_slots_per_read / r / PAGE)) * PAGE)
        q = go(["--model", model("dense.safetensors"), "--policy", "quest", "--budget", str(qb)], f"quest_cr{R}",
               group=R, policy_key="Quest")
        if "error" not in q:
            q["read_cr"] = dense["kv_reads"] / q["kv_reads"]

    print("ablation: window 0")
    go(["--model", model("dms_cr8_w0.safetensors"), "--policy", "dms"], "dms_cr8_w0", group="ablation", policy_key="DMS w=0")

    hyper = [] if args.skip_hyperscaling else hyperscaling(args, binary, common)

    with open(os.path.join(args.docs, "accuracy_results.jsonl"), "w") as f:
        for rec in results + hyper:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    tables = make_tables(results, hyper, dense)
    with open(os.path.join(args.docs, "accuracy_tables.md"), "w") as f:
        f.write(tables)
    print(tables)
    plot(results, dense, os.path.join(args.docs, "accuracy.png"))


def hyperscaling(args, binary, common):
    """The largest concurrent batch that fits a fixed page budget, found by trying batches
    up and down from an estimate (each try decodes the whole set), and the throughput at it."""
    pages = 16 * 2 * 34  # the pool of each layer: what 16 dense sequences need (2 KV heads x 34 pages)
    out = []
    for name, label in [("dense.safetensors", "dense"), ("dms_cr4.safetensors", "DMS 4x"), ("dms_cr8.safetensors", "DMS 8x")]:
        pol = "dense" if name.startswith("dense") else "dms"
        probe = run(args, binary, common + ["--model", model(name), "--policy", pol, "--batch", "16"], f"hs_probe_{pol}_{name}")
        # Peak pages per sequence per layer, from the mean peak slots per row (2 rows per layer).
        per_seq = 2 * math.ceil(probe["mean_peak_slots"] / PAGE)
        # From an estimate, up while it fits, then down until it fits: the largest batch that fits.
        def attempt(b):
            r = run(args, binary, common + ["--model", model(name), "--policy", pol, "--batch", str(b),
                                            "--max-pages", str(pages)], f"hs_{pol}_{name}_b{b}")
            if "error" in r and "exhausted" not in r["error"]:
                raise SystemExit(r["error"])
            return None if "error" in r else r
        batch = max(1, pages // per_seq)
        rec = attempt(batch)
        while rec is not None:
            bigger = attempt(batch + 1)
            if bigger is None:
                break
            batch, rec = batch + 1, bigger
        while rec is None and batch > 1:
            batch -= 1
            rec = attempt(batch)
        rec.update(group="hyperscaling", policy_key=label, pages_per_layer=pages, concurrent=batch,
                   answers_per_s=rec["answers"] / rec["seconds"])
        out.append(rec)
    return out


def make_tables(results, hyper, dense):
    by = {}
    for r in results:
        by[(r.get("group"), r.get("policy_key", r.get("policy")))] = r

    def cell(r, cr_key="memory_cr"):
        if r is None:
            return "—"
        if "error" in r:
            return "error"
        return f"{r['accuracy']:.3f} ± {r['stderr']:.3f} ({r[cr_key]:.2f}x)"

    lines = ["| target CR | DMS | TOVA | TOVA (layer avg) | H2O | StreamingLLM | SnapKV | Quest (read CR) |",
             "|---|---|---|---|---|---|---|---|"]
    for R in RATIOS:
        row = [f"{R}x"]
        for k in ["DMS", "TOVA", "TOVA (layer avg)", "H2O", "StreamingLLM", "SnapKV"]:
            row.append(cell(by.get((R, k))))
        row.append(cell(by.get((R, "Quest")), "read_cr"))
        lines.append("| " + " | ".join(row) + " |")
    head = (f"Dense: accuracy {dense['accuracy']:.4f} ± {dense['stderr']:.4f} on {dense['answers']} answers.\n\n"
            "Each cell: accuracy ± binomial standard error (the measured memory compression; for Quest the "
            "measured read compression).\n\n")
    abl = by.get(("ablation", "DMS w=0"))
    w16 = by.get((8, "DMS"))
    ab = ["", "| DMS at CR 8 | window | accuracy | memory CR |", "|---|---|---|---|"]
    for lab, r, w in [("delayed eviction", w16, 16), ("immediate eviction", abl, 0)]:
        if r and "error" not in r:
            ab.append(f"| {lab} | {w} | {r['accuracy']:.4f} ± {r['stderr']:.4f} | {r['memory_cr']:.2f}x |")
    hs = ["", "| model | pages per layer | concurrent sequences | answers/s | accuracy | memory CR |",
          "|---|---|---|---|---|---|"]
    for r in hyper:
        hs.append(f"| {r['policy_key']} | {r['pages_per_layer']} | {r['concurrent']} | {r['answers_per_s']:.1f} | "
                  f"{r['accuracy']:.4f} | {r['memory_cr']:.2f}x |")
    return head + "\n".join(lines) + "\n" + "\n".join(ab) + "\n" + ("\n".join(hs) + "\n" if hyper else "")


def plot(results, dense, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not found (python3-matplotlib): no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = ["DMS", "TOVA", "TOVA (layer avg)", "H2O", "StreamingLLM", "SnapKV", "Quest"]
    for k in keys:
        pts = [(r["read_cr"] if k == "Quest" else r["memory_cr"], r["accuracy"], r["stderr"])
               for r in results if r.get("policy_key") == k and "error" not in r and isinstance(r.get("group"), int)]
        if not pts:
            continue
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                    capsize=3, label=k + (" (read CR)" if k == "Quest" else ""), linewidth=2 if k == "DMS" else 1)
    ax.axhline(dense["accuracy"], color="gray", linestyle="--", label="dense")
    ax.set_xscale("log", base=2)
    ax.set_xlim(1.6, 10)
    ax.set_xticks([2, 4, 8])
    ax.set_xticklabels(["2x", "4x", "8x"])
    ax.set_xlabel("compression ratio (memory; Quest: reads)")
    ax.set_ylabel("MQAR accuracy (exact match)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Tiny MQAR model through dms: accuracy vs compression")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote", path)


if __name__ == "__main__":
    sys.exit(main())
