#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The summary of a GPU check (bench/gpu_check/run.sh): reads the result folder and writes
summary.md into it (and prints it):

  steps        each step's exit status, seconds and budget (the run's status table)
  tests        Catch2's counts of the plain run, the slowest test cases
  sanitizers   per tool: the errors compute-sanitizer reports, and the tests' own verdict
  examples     exit status and the last line each printed
  benchmarks   medians of the dms_bench_cuda subset: decode as a fraction of the same-run read
               roofline (and vs torch SDPA), DMS/Quest/TOVA vs dense at the same shape, the
               bookkeeping vs the step's attention, prefill vs its torch peer, hyper-scaling vs
               dense at the same memory

Nothing here needs torch or a GPU. `--self-test` runs the parsers on built-in samples of every
input (Catch2, compute-sanitizer, Google Benchmark JSON cut short, the torch JSON) and fails if
a number comes out wrong.

Usage: summarize.py OUTDIR [--status status.tsv] [--wall SECONDS]
       summarize.py --self-test
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

# ---- parsers ----------------------------------------------------------------------------------


def sections(text: str) -> dict[str, str]:
    """The sections run.sh writes into a log: from '===== name: command' to '===== name: exit
    ...' (or to the next section, for a run cut short). A step that did not run ('===== name:
    skipped, ...') has no section."""
    out: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"^===== ([^:]+): (.*)$", line)
        if m and (m.group(2).startswith("exit ") or m.group(2).startswith("skipped")):
            name = None
        elif m:
            name = m.group(1)
            out[name] = ""
        elif name is not None:
            out[name] += line + "\n"
    return out


def last_line(text: str) -> str:
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    return lines[-1] if lines else "(no output)"


def catch_counts(text: str) -> dict | None:
    """Catch2 v2's final line: 'All tests passed (A assertions in N test cases)' or
    'test cases: N | P passed | F failed' (+ an assertions line)."""
    m = re.search(r"All tests passed \((\d+) assertions? in (\d+) test cases?\)", text)
    if m:
        n = int(m.group(2))
        return {"cases": n, "passed": n, "failed": 0, "assertions": int(m.group(1))}
    m = re.search(r"test cases:\s*(\d+)\s*\|\s*(\d+) passed\s*\|\s*(\d+) failed", text)
    if m:
        a = re.search(r"assertions:\s*(\d+)", text)
        return {"cases": int(m.group(1)), "passed": int(m.group(2)), "failed": int(m.group(3)),
                "assertions": int(a.group(1)) if a else None}
    m = re.search(r"test cases:\s*(\d+)\s*\|\s*(\d+) failed", text)  # all failed
    if m:
        return {"cases": int(m.group(1)), "passed": 0, "failed": int(m.group(2)), "assertions": None}
    return None


def slowest(text: str, n: int = 5) -> list[tuple[float, str]]:
    """Catch2 --durations yes: '0.123 s: test case name'."""
    found = [(float(m.group(1)), m.group(2).strip())
             for m in re.finditer(r"^(\d+(?:\.\d+)?) s: (.+)$", text, re.M)]
    return sorted(found, reverse=True)[:n]


def sanitizer_errors(text: str) -> int | None:
    """compute-sanitizer's '========= ERROR SUMMARY: N error(s)'."""
    m = re.findall(r"ERROR SUMMARY: (\d+) errors?", text)
    return int(m[-1]) if m else None


def load_bench(path: str) -> list[dict]:
    """Google Benchmark JSON; a file cut short by a timeout is closed after its last whole entry."""
    if not os.path.exists(path):
        return []
    text = open(path).read()
    try:
        return json.loads(text).get("benchmarks", [])
    except json.JSONDecodeError:
        pass
    cut = text.rfind("\n    },")
    if cut < 0 or '"benchmarks"' not in text[:cut]:
        return []
    try:
        return json.loads(text[: cut + len("\n    }")] + "\n  ]\n}").get("benchmarks", [])
    except json.JSONDecodeError:
        return []


UNIT_US = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}


def medians(entries: list[dict]) -> dict[str, dict]:
    """run_name (without /manual_time and /iterations:N) -> the median aggregate, or the single
    run when there were no repetitions; time in us as 'us'."""
    out: dict[str, dict] = {}
    for e in entries:
        if e.get("error_occurred"):
            key = clean_name(e.get("run_name", e.get("name", "")))
            out.setdefault(key, {"error": e.get("error_message", "error")})
            continue
        kind = e.get("run_type", "iteration")
        if kind == "aggregate" and e.get("aggregate_name") != "median":
            continue
        key = clean_name(e.get("run_name", e["name"]))
        if kind == "iteration" and key in out and "error" not in out[key]:
            continue  # repetitions without aggregates: keep the first
        d = dict(e)
        d["us"] = float(e["real_time"]) * UNIT_US.get(e.get("time_unit", "ns"), 1e-3)
        out[key] = d
    return out


def clean_name(name: str) -> str:
    name = re.sub(r"/(manual_time|real_time)$", "", name)
    return re.sub(r"/(iterations|repeats):\d+", "", name)


def load_list(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    try:
        data = json.load(open(path))
        return data if isinstance(data, list) else []
    except (json.JSONDecodeError, OSError):
        return []


# ---- report -----------------------------------------------------------------------------------


def fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return lines


def bench_section(b: dict[str, dict], torch_decode: list[dict], torch_prefill: list[dict]) -> list[str]:
    L: list[str] = []
    ok = {k: v for k, v in b.items() if "error" not in v}
    errors = {k: v["error"] for k, v in b.items() if "error" in v}
    if not b:
        return ["No benchmark results (bench.json missing or empty)."]
    roof = ok.get("read_roofline/uint4/buffer_MiB:1024")
    if roof:
        L.append(f"Read roofline (uint4 stream, 1 GiB, median): "
                 f"{fmt(roof.get('dram_bytes_per_s', 0) / 1e9, 4)} GB/s. Decode fractions below are of "
                 "the roofline each decode benchmark measured at startup (same run).")
        L.append("")

    def t(name):
        return ok.get(name, {}).get("us")

    def peer_decode(batch, context):
        best = {}
        for e in torch_decode:
            if e.get("batch") == batch and e.get("context") == context and e.get("median_us"):
                best[e["backend"]] = e["median_us"]
        return best

    rows = []
    for name, e in ok.items():
        m = re.match(r"decode/(dense|dms/ratio:(\d+)|quest/budget:(\d+)|tova_scores)/batch:(\d+)/context:(\d+)$", name)
        if not m:
            continue
        batch, context = int(m.group(4)), int(m.group(5))
        kind = m.group(1).split("/")[0]
        dense_same = t(f"decode/dense/batch:{batch}/context:{context}")
        note = ""
        if kind == "dms":
            ratio = int(m.group(2))
            kept = t(f"decode/dense/batch:{batch}/context:{context // ratio}")
            note = (f"dense@N / this = {fmt(dense_same / e['us'])}" if dense_same else "")
            if kept:
                note += f"; this / dense@N/{ratio} = {fmt(e['us'] / kept)}"
        elif kind in ("quest", "tova_scores") and dense_same:
            note = f"this / dense = {fmt(e['us'] / dense_same)}"
        peers = peer_decode(batch, context) if kind == "dense" else {}
        gbs = e["kv_bytes_per_s"] / 1e9 if e.get("kv_bytes_per_s") else None
        rows.append([name, e["us"], gbs, e.get("frac_of_read_roofline"),
                     peers.get("cudnn"), peers.get("flash"),
                     (min(peers.values()) / e["us"]) if peers else None, note])
    if rows:
        L.append("Decode attention (median; torch columns: SDPA with the cuDNN / flash backend, "
                 "same batch and context; peer/ours > 1 means dms is faster):")
        L.append("")
        L += table(["benchmark", "us", "KV GB/s", "frac of roofline", "torch cudnn us",
                    "torch flash us", "best peer / ours", "vs dense"], rows)
        L.append("")

    rows = []
    for name, e in ok.items():
        m = re.match(r"step_bookkeeping/(\w+)/batch:(\d+)$", name)
        if m:
            batch = int(m.group(2))
            attn = t(f"decode/dms/ratio:8/batch:{batch}/context:32768")
            rows.append([name, e["us"], (e["us"] / attn) if attn else None])
    if rows:
        L.append("Step bookkeeping (append + eviction) as a fraction of the step's attention "
                 "(decode/dms ratio 8 at 32K, same batch; target <= 0.05):")
        L.append("")
        L += table(["benchmark", "us", "fraction of attention"], rows)
        L.append("")

    rows = []
    for name, e in ok.items():
        m = re.match(r"bm_prefill_(\w+)/tokens:(\d+)/chunk:(\d+)$", name)
        if not m:
            continue
        tokens = int(m.group(2))
        backend = {"dense": "sdpa_flash", "dms": "flex_dms"}.get(m.group(1))
        peer = next((p["median_us"] for p in torch_prefill if p.get("backend") == backend
                     and p.get("tokens") == tokens and p.get("median_us")), None)
        rows.append([name, e["us"] / 1e3, e.get("causal_tflops", 0) / 1e12 if e.get("causal_tflops") else None,
                     backend, peer / 1e3 if peer else None, (peer / e["us"]) if peer else None])
    if rows:
        L.append("Prefill (median; causal TFLOP/s counts dense causal FLOPs; peer: torch SDPA flash "
                 "for dense, FlexAttention with the DMS mask for DMS):")
        L.append("")
        L += table(["benchmark", "ms", "causal TFLOP/s", "peer", "peer ms", "peer / ours"], rows)
        L.append("")

    rows = []
    hs = {n: e for n, e in ok.items() if n.startswith("hyperscaling/")}
    for name, e in hs.items():
        m = re.match(r"hyperscaling/(\w+)/context:(\d+)$", name)
        if not m:
            continue
        dense = hs.get(f"hyperscaling/dense/context:{m.group(2)}")
        tps = e.get("tokens_per_s")
        rows.append([name, e.get("sequences"), e["us"] / 1e3, tps, e.get("kv_gib"),
                     (tps / dense["tokens_per_s"]) if dense and tps and dense.get("tokens_per_s") else None])
    if rows:
        L.append("Hyper-scaling step (36 layers at a 40 GiB K/V budget):")
        L.append("")
        L += table(["benchmark", "sequences", "step ms", "tokens/s", "K/V GiB", "tokens/s vs dense"], rows)
        L.append("")
    if errors:
        L.append("Benchmarks that reported an error:")
        L += [f"- {k}: {v}" for k, v in sorted(errors.items())]
        L.append("")
    return L


def read(path: str) -> str:
    try:
        return open(path, errors="replace").read()
    except OSError:
        return ""


def summarize(outdir: str, status_path: str | None, wall: int | None) -> str:
    L = ["# GPU check summary", ""]
    tests_log = read(os.path.join(outdir, "tests.log"))
    head = tests_log.split("\n=====", 1)[0].strip().splitlines()
    L += ["    " + h for h in head[:10]]
    L.append("")
    status = []
    if status_path and os.path.exists(status_path):
        status = [line.rstrip("\n").split("\t") for line in open(status_path) if line.strip()]
    if status:
        L.append("## Steps" + (f" ({wall} s in all)" if wall is not None else ""))
        L.append("")
        L += table(["step", "exit", "seconds", "budget", "log"],
                   [[s[0], s[1], s[2], s[3], s[4]] for s in status if len(s) >= 5])
        L.append("")

    L.append("## Tests")
    L.append("")
    t = sections(tests_log).get("tests", "")
    c = catch_counts(t)
    if c:
        L.append(f"dms_gpu_tests: {c['cases']} test cases, {c['passed']} passed, {c['failed']} failed"
                 + (f" ({c['assertions']} assertions)" if c["assertions"] is not None else ""))
    else:
        L.append(f"dms_gpu_tests: no Catch2 summary in tests.log; its last line: {last_line(t)}")
    for secs, name in slowest(t):
        L.append(f"- {secs:.2f} s: {name}")
    L.append("")

    L.append("## Sanitizers (tests tagged [sanitize])")
    L.append("")
    san = sections(read(os.path.join(outdir, "sanitize.log")))
    rows = []
    for tool in ("memcheck", "racecheck", "synccheck", "initcheck"):
        text = san.get(tool)
        if text is None:
            rows.append([tool, "not run", "-"])
            continue
        c = catch_counts(text)
        errors = sanitizer_errors(text)
        rows.append([tool, errors if errors is not None else f"no summary ({last_line(text)})",
                     f"{c['passed']}/{c['cases']} passed" if c else "no Catch2 summary"])
    L += table(["tool", "errors", "tests"], rows)
    L.append("")

    L.append("## Examples")
    L.append("")
    ex = sections(read(os.path.join(outdir, "examples.log")))
    if not ex:
        L.append("No example ran.")
    for name, text in ex.items():
        L.append(f"- {name}: {last_line(text)}")
    L.append("")

    L.append("## Benchmarks")
    L.append("")
    b = medians(load_bench(os.path.join(outdir, "bench.json")))
    L += bench_section(b, load_list(os.path.join(outdir, "torch_decode.json")),
                       load_list(os.path.join(outdir, "torch_prefill.json")))
    text = "\n".join(L) + "\n"
    with open(os.path.join(outdir, "summary.md"), "w") as f:
        f.write(text)
    return text


# ---- self-test --------------------------------------------------------------------------------

SAMPLE_TESTS = """# GPU check
NVIDIA H200, 580.159.04, 143771 MiB

===== tests: /pack/bin/dms_gpu_tests --durations yes
0.512 s: decode_attention: Quest page lists
3.250 s: GPU prefill == reference: long prompts span many key tiles
===============================================================================
test cases:  40 |  39 passed | 1 failed
assertions: 812 | 811 passed | 1 failed

===== tests: exit 1 after 31 s
"""
SAMPLE_SANITIZE = """
===== memcheck: compute-sanitizer --tool memcheck
===============================================================================
All tests passed (120 assertions in 6 test cases)

========= ERROR SUMMARY: 0 errors
===== memcheck: exit 0 after 20 s

===== racecheck: compute-sanitizer --tool racecheck
========= Error: Race reported between Write access at 0x1a0 in kernel
========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)
All tests passed (120 assertions in 6 test cases)
========= ERROR SUMMARY: 2 errors
===== racecheck: exit 99 after 40 s
"""
SAMPLE_BENCH = """{
  "context": {"date": "x"},
  "benchmarks": [
    {
      "name": "read_roofline/uint4/buffer_MiB:1024/manual_time_median",
      "run_name": "read_roofline/uint4/buffer_MiB:1024/manual_time",
      "run_type": "aggregate", "aggregate_name": "median",
      "real_time": 2.5e+02, "time_unit": "us", "dram_bytes_per_s": 4.0e+12
    },
    {
      "name": "decode/dense/batch:16/context:4096/manual_time_mean",
      "run_name": "decode/dense/batch:16/context:4096/manual_time",
      "run_type": "aggregate", "aggregate_name": "mean",
      "real_time": 9.0e+01, "time_unit": "us"
    },
    {
      "name": "decode/dense/batch:16/context:4096/manual_time_median",
      "run_name": "decode/dense/batch:16/context:4096/manual_time",
      "run_type": "aggregate", "aggregate_name": "median",
      "real_time": 1.0e+02, "time_unit": "us", "kv_bytes_per_s": 2.7e+12,
      "frac_of_read_roofline": 0.675
    },
    {
      "name": "decode/tova_scores/batch:16/context:4096/manual_time_median",
      "run_name": "decode/tova_scores/batch:16/context:4096/manual_time",
      "run_type": "aggregate", "aggregate_name": "median",
      "real_time": 1.1e+02, "time_unit": "us"
    },
    {
      "name": "bm_prefill_dms/tokens:4096/chunk:0/iterations:10/repeats:3/manual_time_median",
      "run_name": "bm_prefill_dms/tokens:4096/chunk:0/iterations:10/repeats:3/manual_time",
      "run_type": "aggregate", "aggregate_name": "median",
      "real_time": 2.0e+00, "time_unit": "ms", "causal_tflops": 1.5e+14
    },
    {
      "name": "hyperscaling/dense/context:8192/iterations:30/manual_time_median",
      "run_name": "hyperscaling/dense/context:8192/iterations:30/manual_time",
      "run_type": "aggregate", "aggregate_name": "median",
      "real_time": 10.0, "time_unit": "ms", "sequences": 35, "tokens_per_s": 3500
    },
    {
      "name": "hyperscaling/dms8/context:8192/iterations:30/manual_time_median",
      "run_name": "hyperscaling/dms8/context:8192/iterations:30/manual_time",
      "run_type": "aggregate", "aggregate_name": "median",
      "real_time": 20.0, "time_unit": "ms", "sequences": 282, "tokens_per_s": 14100
    },
    {
      "name": "step_bookkeeping/dms/batch:16/iterations:2000/manual_time_median",
      "run_name": "step_bookkeeping/dms/batch:16/iterations:2000/manual_time",
      "run_type": "aggregate", "aggregate_name": "median",
      "real_time": 5.0, "time_unit": "us"
    },
    {
      "name": "decode/dms/ratio:8/batch:16/context:32768/manual_time_median",
      "run_name": "decode/dms/ratio:8/batch:16/context:32768/manual_time",
      "run_type": "aggregate", "aggregate_name": "median",
      "real_time": 1.0e+02, "time_unit": "us", "frac_of_read_roofline": 0.5
    },
    {
      "name": "decode/dms/ratio:8/batch:64/context:32768/manual_time_med"""  # cut short


def self_test() -> int:
    failures = []

    def expect(what, got, want):
        if got != want:
            failures.append(f"{what}: got {got!r}, want {want!r}")

    s = sections(SAMPLE_TESTS)
    expect("sections", list(s), ["tests"])
    expect("catch counts", catch_counts(s["tests"]),
           {"cases": 40, "passed": 39, "failed": 1, "assertions": 812})
    expect("slowest", slowest(s["tests"])[0], (3.25, "GPU prefill == reference: long prompts span many key tiles"))
    san = sections(SAMPLE_SANITIZE)
    expect("memcheck errors", sanitizer_errors(san["memcheck"]), 0)
    expect("racecheck errors", sanitizer_errors(san["racecheck"]), 2)
    expect("all passed", catch_counts(san["racecheck"]),
           {"cases": 6, "passed": 6, "failed": 0, "assertions": 120})
    with tempfile.TemporaryDirectory() as d:
        open(os.path.join(d, "bench.json"), "w").write(SAMPLE_BENCH)
        b = medians(load_bench(os.path.join(d, "bench.json")))
        expect("benchmarks kept from a cut file", sorted(b), sorted([
            "read_roofline/uint4/buffer_MiB:1024", "decode/dense/batch:16/context:4096",
            "decode/tova_scores/batch:16/context:4096", "bm_prefill_dms/tokens:4096/chunk:0",
            "hyperscaling/dense/context:8192", "hyperscaling/dms8/context:8192",
            "step_bookkeeping/dms/batch:16", "decode/dms/ratio:8/batch:16/context:32768"]))
        expect("median, not mean", b["decode/dense/batch:16/context:4096"]["us"], 100.0)
        expect("ms to us", b["bm_prefill_dms/tokens:4096/chunk:0"]["us"], 2000.0)
        torch_decode = [{"backend": "cudnn", "batch": 16, "context": 4096, "median_us": 150.0},
                        {"backend": "flash", "batch": 16, "context": 4096, "median_us": 120.0}]
        torch_prefill = [{"backend": "flex_dms", "batch": 1, "tokens": 4096, "median_us": 3000.0}]
        json.dump(torch_decode, open(os.path.join(d, "torch_decode.json"), "w"))
        json.dump(torch_prefill, open(os.path.join(d, "torch_prefill.json"), "w"))
        open(os.path.join(d, "tests.log"), "w").write(SAMPLE_TESTS)
        open(os.path.join(d, "sanitize.log"), "w").write(SAMPLE_SANITIZE)
        status = os.path.join(d, "status.tsv")
        open(status, "w").write("tests\t1\t31\t75\ttests.log\nmemcheck\t0\t20\t50\tsanitize.log\n")
        text = summarize(d, status, 100)
        for needle in ["40 test cases, 39 passed, 1 failed",
                       "| memcheck | 0 | 6/6 passed |", "| racecheck | 2 | 6/6 passed |",
                       "| synccheck | not run | - |",
                       "| decode/dense/batch:16/context:4096 | 100 | 2.7e+03 | 0.675 | 150 | 120 | 1.2 |",
                       "this / dense = 1.1",
                       "| decode/tova_scores/batch:16/context:4096 | 110 | - | - |",
                       "this / dense@N/8 = 1",
                       "| bm_prefill_dms/tokens:4096/chunk:0 | 2 | 150 | flex_dms | 3 | 1.5 |",
                       "| hyperscaling/dms8/context:8192 | 282 | 20 | 1.41e+04 | - | 4.03 |",
                       "| step_bookkeeping/dms/batch:16 | 5 | 0.05 |",
                       "| tests | 1 | 31 | 75 | tests.log |"]:
            if needle not in text:
                failures.append(f"summary lacks {needle!r}")
        if failures:
            print(text)
    for f in failures:
        print("FAILED:", f)
    print(f"summarize.py self-test: {'ok' if not failures else f'{len(failures)} failure(s)'}")
    return 1 if failures else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir", nargs="?")
    p.add_argument("--status", help="the step table run.sh writes (tab-separated)")
    p.add_argument("--wall", type=int, help="seconds the whole run took")
    p.add_argument("--self-test", action="store_true")
    a = p.parse_args()
    if a.self_test:
        return self_test()
    if not a.outdir:
        p.error("OUTDIR is required")
    print(summarize(a.outdir, a.status, a.wall), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
