#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The GPU check, step 2 of 2: runs, from a pack made by bench/gpu_check/pack.sh and without
# compiling anything, everything that needs a GPU, in at most 8 minutes of wall time:
#
#   tests       every GPU test (dms_gpu_tests), plainly
#   sanitize    compute-sanitizer memcheck, racecheck, synccheck and initcheck over the tests
#               tagged [sanitize] (every kernel at small shapes)
#   examples    every example (the demo and dms_gpu_decode), from the pack's root
#   bench       a subset of dms_bench_cuda (--benchmark_filter below)
#   peers       the torch peers on the same shapes (peers/peers.py: SDPA decode, SDPA prefill,
#               FlexAttention with the DMS mask)
#
# and prints a summary (tests passed/failed, sanitizer errors, each benchmark as a fraction of
# the same-run read roofline or as a ratio to its peer). Every step has a wall-clock budget
# (timeout), so one hang cannot eat the window; the script exits 0 iff every step passed.
#
#   <pack>/run.sh OUTDIR            on the GPU machine
#   <pack>/run.sh --only tests,memcheck OUTDIR
#                                   only those steps (a rerun): tests memcheck racecheck
#                                   synccheck initcheck examples bench peers
#   <pack>/run.sh --dry-run OUTDIR  on any machine: every binary found, every library resolved
#                                   through the pack's lib/, the test and benchmark selections
#                                   non-empty, the peers compile; prints the commands
#
# OUTDIR receives at most 8 files, written as the steps go (so a run cut short still leaves
# them): summary.md, tests.log, sanitize.log, examples.log, bench.log, bench.json,
# torch_decode.json, torch_prefill.json. With the device tool: docs/performance/gpu.md.
set -uo pipefail

pack=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export LD_LIBRARY_PATH="$pack/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# shellcheck source=libs.sh
. "$pack/libs.sh"

# Every library of every binary resolves, and each one a GPU machine may lack (not is_base_lib)
# resolves into the pack's lib/, not to a copy that happens to be installed here.
check_libs() {
  local b line name path bad=0 this
  for b in "$pack"/bin/*; do
    this=0
    while IFS= read -r line; do
      if [[ $line == *"not found"* ]]; then
        echo "PROBLEM: ${b##*/}: $line"
        this=1
      elif [[ $line =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+=\>[[:space:]]+(/[^[:space:]]+) ]]; then
        name=${BASH_REMATCH[1]}
        path=${BASH_REMATCH[2]}
        if ! is_base_lib "$name" && [[ $path != "$pack/lib/"* ]]; then
          echo "PROBLEM: ${b##*/}: $name resolves to $path, outside the pack's lib/"
          this=1
        fi
      fi
    done < <(ldd "$b" 2>&1)
    ((this)) || echo "ok: ${b##*/}: every library resolves, the non-base ones from the pack's lib/"
    ((bad |= this))
  done
  return "$bad"
}

dry=0
only=""
while [[ ${1:-} == --* ]]; do
  case $1 in
    --check-libs) check_libs; exit ;;
    --dry-run) dry=1; shift ;;
    --only) only=${2:-}; shift 2 ;;
    *) break ;;
  esac
done
if (($# != 1)) || [[ $1 == -* ]]; then
  echo "usage: $0 [--dry-run] [--only STEP,...] OUTDIR" >&2
  echo "  steps: tests memcheck racecheck synccheck initcheck examples bench peers" >&2
  exit 2
fi
want() { [[ -z "$only" || ",$only," == *",$1,"* ]]; }
mkdir -p "$1" || exit 2
out=$(cd "$1" && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export PYTHONUNBUFFERED=1

# ---- budgets (seconds of wall time); they add up to the 8 minutes ---------------------------
total_budget=460  # every step's timeout is also cut to what is left of this
budget_tests=75
budget_memcheck=50
budget_racecheck=55
budget_synccheck=30
budget_initcheck=45
budget_example=20  # each example
budget_bench=100
budget_peers=65

# ---- what runs --------------------------------------------------------------------------------
tests=$pack/bin/dms_gpu_tests
bench=$pack/bin/dms_bench_cuda
mapfile -t examples < <(sed '/^$/d' "$pack/examples.txt" 2>/dev/null)
sanitize_tag='[sanitize]'
# The benchmark subset, one alternative per family (kept as a list so the dry run can check that
# each one still selects something after a rename).
bench_parts=(
  'read_roofline/uint4/buffer_MiB:1024'
  'decode/dense/batch:(1|16|64)/context:(4096|32768)'
  'decode/dms/ratio:8/batch:(1|16|64)/context:(4096|32768)'
  'decode/quest/budget:4096/batch:(1|16)/context:32768'
  'decode/tova_scores/batch:16/context:4096'
  'step_bookkeeping/(dms|h2o)/batch:(1|16|64)'
  'bm_prefill_(dense|dms)/tokens:(4096|16384)/chunk:0'
  'hyperscaling/[a-z0-9]+/context:8192'
)
bench_filter="^($(IFS='|'; echo "${bench_parts[*]}"))/"
bench_args=(--benchmark_filter="$bench_filter" --benchmark_min_time=0.05 --benchmark_repetitions=3
  --benchmark_report_aggregates_only=true --benchmark_out="$out/bench.json"
  --benchmark_out_format=json --benchmark_counters_tabular=true)
peer_args=(--decode-batches 1 16 64 --decode-contexts 4096 32768 --prefill-tokens 4096 16384
  --decode-out "$out/torch_decode.json" --prefill-out "$out/torch_prefill.json")

sanitizer=$(command -v compute-sanitizer || true)
for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  [[ -z "$sanitizer" && -x "$c" ]] && sanitizer=$c
done
python=$(command -v python3 || true)
sanitizer_args() {  # the flags of one tool
  case $1 in
    memcheck) echo "--tool memcheck --leak-check full" ;;
    racecheck) echo "--tool racecheck" ;;
    synccheck) echo "--tool synccheck" ;;
    initcheck) echo "--tool initcheck" ;;
  esac
}
tools=(memcheck racecheck synccheck initcheck)

status=$scratch/status.tsv  # step, rc, seconds, budget, log
: >"$status"
started=$SECONDS
failed=0

# step <name> <budget> <log> <command...>: runs with a timeout, appends a marked section to log.
step() {
  local name=$1 budget=$2 log=$3
  shift 3
  local left=$((total_budget - (SECONDS - started)))
  ((budget > left)) && budget=$left
  {
    echo
    echo "===== $name: $*"
  } >>"$log"
  if ((budget < 5)); then
    echo "===== $name: skipped, out of time" >>"$log"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" skipped 0 0 "${log##*/}" >>"$status"
    echo "--- $name: skipped (out of time)"
    failed=$((failed + 1))
    return
  fi
  echo "--- $name (budget ${budget} s)"
  local t0=$SECONDS rc
  (cd "$pack" && timeout --kill-after=5 "$budget" "$@") >>"$log" 2>&1
  rc=$?
  local secs=$((SECONDS - t0))
  ((rc == 124 || rc == 137)) && rc=timeout
  echo "===== $name: exit $rc after $secs s" >>"$log"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$budget" "${log##*/}" >>"$status"
  echo "    exit $rc after $secs s"
  [[ $rc == 0 ]] || failed=$((failed + 1))
}

# ---- dry run ----------------------------------------------------------------------------------
if ((dry)); then
  report=$out/summary.md
  problems=0
  problem() {
    echo "PROBLEM: $*" | tee -a "$report"
    problems=$((problems + 1))
  }
  {
    echo "# GPU check: dry run"
    echo
    echo "pack: $pack"
    sed -n '1,7p' "$pack/MANIFEST.txt" 2>/dev/null
    echo
  } >"$report"
  for b in "$tests" "$bench" "${examples[@]/#/$pack/bin/}"; do
    [[ -x "$b" ]] || problem "missing binary $b"
  done
  check_libs >>"$report" || problems=$((problems + 1))
  ((${#examples[@]})) || problem "no examples listed in $pack/examples.txt"
  n_all=$("$tests" --list-test-names-only 2>/dev/null | grep -c '[^[:space:]]' || true)
  n_san=$("$tests" "$sanitize_tag" --list-test-names-only 2>/dev/null | grep -c '[^[:space:]]' || true)
  ((n_all > 0)) || problem "dms_gpu_tests lists no test"
  ((n_san > 0)) || problem "dms_gpu_tests lists no test tagged $sanitize_tag"
  echo "ok: dms_gpu_tests: $n_all test cases, $n_san tagged $sanitize_tag:" >>"$report"
  "$tests" "$sanitize_tag" --list-test-names-only 2>/dev/null | sed '/^$/d; s/^/    /' >>"$report"
  for part in "${bench_parts[@]}"; do
    n=$("$bench" --benchmark_list_tests=true --benchmark_filter="^($part)/" 2>/dev/null | grep -c . || true)
    ((n > 0)) || problem "the benchmark filter part '$part' selects nothing"
  done
  n_bench=$("$bench" --benchmark_list_tests=true --benchmark_filter="$bench_filter" 2>/dev/null | grep -c . || true)
  ((n_bench > 0)) || problem "the benchmark filter selects nothing"
  echo "ok: dms_bench_cuda: the filter selects $n_bench benchmarks:" >>"$report"
  "$bench" --benchmark_list_tests=true --benchmark_filter="$bench_filter" 2>/dev/null |
    sed 's/^/    /' >>"$report"
  if [[ -n "$python" ]]; then
    for f in "$pack"/peers/*.py "$pack/summarize.py"; do
      "$python" -m py_compile "$f" 2>>"$report" || problem "${f##*/} does not compile"
    done
    "$python" "$pack/peers/peers.py" --help >/dev/null 2>&1 || problem "peers.py --help fails"
  else
    echo "note: no python3 here; the peers were not checked" >>"$report"
  fi
  if [[ -n "$sanitizer" ]]; then echo "ok: compute-sanitizer: $sanitizer" >>"$report"; else
    echo "note: no compute-sanitizer on this machine (the GPU machine has one)" >>"$report"
  fi
  {
    echo
    echo "## Commands the run would execute (cwd $pack, LD_LIBRARY_PATH=$pack/lib)"
    echo
    echo "    timeout $budget_tests  $tests --durations yes --use-colour no   >> tests.log"
    for t in "${tools[@]}"; do
      b=budget_$t
      echo "    timeout ${!b}  ${sanitizer:-compute-sanitizer} $(sanitizer_args "$t") --error-exitcode 99 --print-limit 100 $tests '$sanitize_tag' --use-colour no   >> sanitize.log"
    done
    for e in "${examples[@]}"; do echo "    timeout $budget_example  bin/$e   >> examples.log"; done
    echo "    timeout $budget_bench  $bench --benchmark_filter='$bench_filter' ${bench_args[*]:1}   >> bench.log"
    echo "    timeout $budget_peers  python3 peers/peers.py ${peer_args[*]}   >> bench.log"
    echo "    python3 summarize.py $out   > summary.md"
    echo
    sum=$((budget_tests + budget_memcheck + budget_racecheck + budget_synccheck + budget_initcheck +
      budget_example * ${#examples[@]} + budget_bench + budget_peers))
    echo "Budgets add up to $sum s (cap $total_budget s)."
    ((sum <= total_budget)) ||
      echo "note: over the cap (more examples?): the last steps get only what is left of it."
  } >>"$report"
  files=$(find "$out" -type f | wc -l)
  ((files <= 8)) || problem "$out holds $files files (at most 8 come back)"
  cat "$report"
  if ((problems)); then
    echo "dry run: $problems problem(s)"
    exit 1
  fi
  echo "dry run: ok"
  exit 0
fi

# ---- the run ----------------------------------------------------------------------------------
chmod +x "$pack"/bin/* 2>/dev/null  # in case the copy to this machine dropped the mode bits
{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  echo
  sed -n '1,7p' "$pack/MANIFEST.txt"
  if command -v cuobjdump >/dev/null; then
    echo "device code in dms_gpu_tests: $(cuobjdump --list-elf "$tests" 2>/dev/null | grep -o 'sm_[0-9a-z]*' | sort -u | tr '\n' ' ')"
  fi
  check_libs
} >"$out/tests.log" 2>&1
: >"$out/sanitize.log"
: >"$out/examples.log"
: >"$out/bench.log"

want tests && step tests "$budget_tests" "$out/tests.log" "$tests" --durations yes --use-colour no
for t in "${tools[@]}"; do
  want "$t" || continue
  b=budget_$t
  if [[ -z "$sanitizer" ]]; then
    echo "===== $t: skipped, compute-sanitizer not found" >>"$out/sanitize.log"
    printf '%s\t%s\t0\t0\t%s\n' "$t" missing sanitize.log >>"$status"
    failed=$((failed + 1))
    continue
  fi
  # shellcheck disable=SC2046  # the tool's flags are words
  step "$t" "${!b}" "$out/sanitize.log" "$sanitizer" $(sanitizer_args "$t") --error-exitcode 99 \
    --print-limit 100 "$tests" "$sanitize_tag" --use-colour no
done
if want examples; then
  for e in "${examples[@]}"; do
    step "$e" "$budget_example" "$out/examples.log" "$pack/bin/$e"
  done
fi
want bench && step bench "$budget_bench" "$out/bench.log" "$bench" "${bench_args[@]}"
if ! want peers; then
  :
elif [[ -n "$python" ]]; then
  step peers "$budget_peers" "$out/bench.log" "$python" "$pack/peers/peers.py" "${peer_args[@]}"
else
  printf 'peers\tmissing\t0\t0\tbench.log\n' >>"$status"
fi

echo
if [[ -n "$python" ]]; then
  "$python" "$pack/summarize.py" "$out" --status "$status" --wall $((SECONDS - started))
else
  { echo "# GPU check (no python3: no summary tables)"; cat "$status"; } >"$out/summary.md"
  cat "$out/summary.md"
fi
echo "GPU check: $failed step(s) failed, $((SECONDS - started)) s"
((failed == 0))
