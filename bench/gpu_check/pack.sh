#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The GPU check, step 1 of 2 (a CPU machine with nvcc): build what needs a GPU and pack it, with
# everything it needs at run time that a bare GPU machine lacks, into one folder that travels to
# the GPU machine as it is. Step 2 is <pack>/run.sh, on the GPU machine (docs/performance/gpu.md).
#
#   bench/gpu_check/pack.sh [--out DIR] [--build-dir DIR] [--reuse] [--jobs N]
#
#   --out DIR        the pack (default: gpu-pack, git-ignored); replaced if it exists
#   --build-dir DIR  the build to pack (default: build/gpu-pack, configured with the gpu-pack
#                    preset: Release, sm_90, -lineinfo)
#   --reuse          pack DIR as it is, building nothing (e.g. the cuda preset's build, whose
#                    sm_80;90 binaries run on an H200 too); it must hold every binary below
#   --jobs N         build jobs (default 2), run under nice -n 10
#
# Run from the repository root. The pack:
#   bin/      dms_gpu_tests, every dms_* executable of examples/, dms_bench_cuda
#   lib/      the shared libraries they load that are neither the C/C++ runtime nor the CUDA
#             driver (ldd; e.g. Google Benchmark's libbenchmark.so.1 and the CUDA runtime)
#   peers/    bench/peers/*.py and bench/gpu_check/peers.py (the torch peers)
#   examples/ every non-source file under examples/ (data an example may read at run time)
#   run.sh, libs.sh, summarize.py, MANIFEST.txt (commit, toolchain, flags, libraries, sizes)
# It fails if a binary is missing, has no sm_90 code, loads a library that cannot be found here,
# or if the pack is over 64 MiB (what the device tool carries; the working tree travels too).
set -euo pipefail

out=gpu-pack
build=build/gpu-pack
build_set=0
reuse=0
jobs=2
while (($#)); do
  case $1 in
    --out) out=$2; shift 2 ;;
    --build-dir) build=$2; build_set=1; shift 2 ;;
    --reuse) reuse=1; shift ;;
    --jobs) jobs=$2; shift 2 ;;
    -h | --help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "pack.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
limit_mib=64
started=$SECONDS

fail() {
  echo "pack.sh: $*" >&2
  exit 1
}

# The CUDA tools (cuobjdump) next to nvcc.
cuda_bin=${CUDA_BIN:-}
if [[ -z "$cuda_bin" ]]; then
  if command -v nvcc >/dev/null; then
    cuda_bin=$(dirname "$(command -v nvcc)")
  elif [[ -n "${CUDACXX:-}" && -x "${CUDACXX}" ]]; then
    cuda_bin=$(dirname "$CUDACXX")
  else
    cuda_bin=/usr/local/cuda/bin
  fi
fi

# ---- build ----------------------------------------------------------------------------------
if ((!reuse)); then
  if ((build_set)); then
    [[ -f "$build/CMakeCache.txt" ]] || cmake --preset gpu-pack -B "$build"
  else
    [[ -f "$build/CMakeCache.txt" ]] || cmake --preset gpu-pack
  fi
  t0=$SECONDS
  nice -n 10 cmake --build "$build" -j "$jobs" --target dms_gpu_tests dms_bench_cuda examples/all
  echo "pack.sh: build took $((SECONDS - t0)) s"
fi
[[ -f "$build/CMakeCache.txt" ]] || fail "$build is not a CMake build directory"

# ---- what goes in -----------------------------------------------------------------------------
bins=("$build/tests/dms_gpu_tests" "$build/bench/dms_bench_cuda")
examples=()
while IFS= read -r f; do examples+=("$f"); done < <(find "$build/examples" -maxdepth 1 -type f \
  -name 'dms_*' -perm -u+x | sort)
((${#examples[@]})) || fail "no dms_* executable in $build/examples (build the examples)"
bins+=("${examples[@]}")
for b in "${bins[@]}"; do
  [[ -x "$b" ]] || fail "missing $b (build it, or drop --reuse)"
done

# The binaries must hold sm_90 machine code (what an H200 runs): read from the device code with
# cuobjdump where the toolkit has it, else from the build's CMAKE_CUDA_ARCHITECTURES.
cache_value() { sed -n "s/^$1:[A-Z]*=//p" "$build/CMakeCache.txt" | head -n 1; }
archs=$(cache_value CMAKE_CUDA_ARCHITECTURES)
if [[ -x "$cuda_bin/cuobjdump" ]]; then
  arch_check="cuobjdump --list-elf"
  for b in "${bins[@]}"; do
    elfs=$("$cuda_bin/cuobjdump" --list-elf "$b" 2>/dev/null || true)
    if [[ -n "$elfs" ]] && ! grep -q 'sm_90' <<<"$elfs"; then
      fail "$b has no sm_90 code (CMAKE_CUDA_ARCHITECTURES must include 90)"
    fi
  done
else
  arch_check="CMAKE_CUDA_ARCHITECTURES (no cuobjdump in $cuda_bin)"
  [[ ";$archs;" =~ \;90(-real|a|a-real)?\; ]] ||
    fail "$build is built for CUDA architectures '$archs', without 90 (sm_90 for an H200)"
fi

# Libraries: everything ldd resolves but what a GPU machine has anyway (is_base_lib: the C/C++
# runtime and the CUDA driver).
# shellcheck source=libs.sh
. "$here/libs.sh"
declare -A libs=()
for b in "${bins[@]}"; do
  while IFS= read -r line; do
    if [[ $line == *"not found"* ]]; then
      fail "$b: $line"
    fi
    if [[ $line =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+=\>[[:space:]]+(/[^[:space:]]+) ]]; then
      name=${BASH_REMATCH[1]}
      path=${BASH_REMATCH[2]}
      is_base_lib "$name" || libs[$name]=$path
    fi
  done < <(ldd "$b")
done

# ---- pack -------------------------------------------------------------------------------------
[[ "$out" != "/" && "$out" != "." && "$out" != "$root" ]] || fail "refusing --out $out"
rm -rf "$out"
mkdir -p "$out/bin" "$out/lib" "$out/peers" "$out/examples"
cp -p "${bins[@]}" "$out/bin/"
for name in "${!libs[@]}"; do cp -pL "${libs[$name]}" "$out/lib/$name"; done
cp -p bench/peers/*.py "$here/peers.py" "$out/peers/"
cp -p "$here/run.sh" "$here/libs.sh" "$here/summarize.py" "$out/"
chmod +x "$out/run.sh"
# Data files next to the examples' sources (models, evaluation sets), same relative layout.
while IFS= read -r f; do
  rel=${f#examples/}
  mkdir -p "$out/examples/$(dirname "$rel")"
  cp -p "$f" "$out/examples/$rel"
done < <(find examples -type f ! -name '*.cpp' ! -name '*.cu' ! -name '*.cuh' ! -name '*.hpp' \
  ! -name '*.h' ! -name '*.py' ! -name '*.md' ! -name 'CMakeLists.txt' ! -name '*.cmake' | sort)
printf '%s\n' "${examples[@]##*/}" >"$out/examples.txt"


# ---- manifest and limits ----------------------------------------------------------------------
max_version() {  # the highest symbol version of one family (GLIBC, GLIBCXX) the binaries need
  for b in "$out"/bin/* "$out"/lib/*; do objdump -T "$b" 2>/dev/null; done |
    grep -o "$1_[0-9.]*" | sort -t_ -k2 -V | tail -n 1
}
{
  echo "dms GPU check pack"
  echo "created:     $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(. /etc/os-release 2>/dev/null && echo "${PRETTY_NAME:-unknown OS}")"
  echo "commit:      $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "build:       $(cache_value CMAKE_BUILD_TYPE), CUDA architectures $archs (checked with $arch_check), CUDA flags '$(cache_value CMAKE_CUDA_FLAGS)'"
  echo "nvcc:        $("$cuda_bin/nvcc" --version 2>/dev/null | grep -o 'release .*' || echo unknown)"
  echo "needs:       $(max_version GLIBC), $(max_version GLIBCXX) (the GPU machine's C/C++ runtime must be at least this)"
  echo "libraries:   ${!libs[*]}"
  echo "files:"
  (cd "$out" && find . -type f ! -name MANIFEST.txt | sort | while read -r f; do
    printf '  %10d  %s\n' "$(stat -c %s "$f")" "${f#./}"
  done)
} >"$out/MANIFEST.txt"

# Resolvable from the pack alone: what is not base comes from lib/ (the dry run's own check).
bash "$out/run.sh" --check-libs || fail "a library of the pack does not resolve through $out/lib"

bytes=$(du -sb "$out" | cut -f1)
files=$(find "$out" -type f | wc -l)
mib=$(((bytes + (1 << 20) - 1) >> 20))
echo "pack.sh: $out: $files files, $mib MiB (limit $limit_mib MiB), packed in $((SECONDS - started)) s"
((bytes <= limit_mib << 20)) || fail "$out is $mib MiB, over the $limit_mib MiB the device tool carries"
# The working tree travels with the pack; say so when the two together do not fit.
if git rev-parse --git-dir >/dev/null 2>&1; then
  tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null |
    tail -n 1 | cut -f1)
  if ((bytes + tree > limit_mib << 20)); then
    echo "pack.sh: warning: the pack + the working tree ($((tree >> 20)) MiB) exceed $limit_mib MiB" >&2
  fi
fi
