#!/usr/bin/env bash
# Everything that needs a GPU, in one command: build for the local GPU, run the GPU tests plainly
# and under compute-sanitizer (memcheck, racecheck), the GPU example, the benchmarks, and the torch
# peer scripts, writing logs and JSON into one output folder.
#
#   bench/run_on_gpu.sh [OUTDIR]          (default: build-gpu/results)
#
# Run from the repository root on a machine with an NVIDIA GPU, nvcc, CMake, ninja, Catch2 and
# Google Benchmark (on a machine without a package registry: `source .deps/prelude.sh` first; see
# docs/performance.md). Set DMS_CUDA_ARCH (default 90) for another GPU. Steps that fail are
# reported and the script goes on, so one run collects everything; its exit status is the number
# of failed steps.
set -uo pipefail
out=${1:-build-gpu/results}
arch=${DMS_CUDA_ARCH:-90}
mkdir -p "$out"
failed=0
run() {  # run <name> <command...>: logs to $out/<name>.log
  local name=$1
  shift
  echo "==> $name: $*"
  if "$@" >"$out/$name.log" 2>&1; then
    echo "    ok ($(tail -n 1 "$out/$name.log"))"
  else
    echo "    FAILED (exit $?): see $out/$name.log"
    tail -n 20 "$out/$name.log"
    failed=$((failed + 1))
  fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" 2>&1
run configure cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DDMS_ENABLE_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="$arch" -DDMS_BUILD_BENCH=ON -DDMS_BUILD_TESTS=ON
run build cmake --build build-gpu
run gpu_tests build-gpu/tests/dms_gpu_tests
run memcheck compute-sanitizer --tool memcheck --leak-check full --error-exitcode 1 \
  build-gpu/tests/dms_gpu_tests
run racecheck compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 1 \
  build-gpu/tests/dms_gpu_tests
run synccheck compute-sanitizer --tool synccheck --error-exitcode 1 build-gpu/tests/dms_gpu_tests
run all_tests ctest --test-dir build-gpu --output-on-failure -j 8
run demo build-gpu/examples/dms_demo
run gpu_decode build-gpu/examples/dms_gpu_decode
run bench_cuda build-gpu/bench/dms_bench_cuda --benchmark_repetitions=5 \
  --benchmark_report_aggregates_only=true --benchmark_out="$out/bench_cuda.json" \
  --benchmark_out_format=json
if python3 -c 'import torch' 2>/dev/null; then
  run torch_decode python3 bench/peers/torch_decode.py --out "$out/torch_decode.json"
  run torch_prefill python3 bench/peers/torch_prefill.py --out "$out/torch_prefill.json"
fi
run tables python3 bench/peers/plot.py "$out/bench_cuda.json" --torch "$out/torch_decode.json" \
  --out-dir "$out/perf"
echo "failed steps: $failed"
exit "$failed"
