#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Everything that needs a GPU, on one machine that has both nvcc and a GPU: the two steps of the
# GPU check back to back (bench/gpu_check/pack.sh, then <pack>/run.sh; docs/performance/gpu.md).
#
#   bench/run_on_gpu.sh [OUTDIR]          (default: build/gpu-check)
#
# Where the GPU machine cannot compile, or GPU time is short (the device tool), run the two
# steps apart instead: pack.sh on the CPU machine, run.sh on the GPU machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-build/gpu-check}
bench/gpu_check/pack.sh --out gpu-pack
exec gpu-pack/run.sh "$out"
