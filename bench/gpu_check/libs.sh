# shellcheck shell=bash
# SPDX-License-Identifier: Apache-2.0
# Sourced by pack.sh and run.sh (the pack holds a copy): which shared libraries a GPU machine is
# assumed to have. The C/C++ runtime is on every Linux machine (a newer one runs these binaries;
# the pack's MANIFEST.txt names the oldest that will do), and the CUDA driver must be the GPU
# machine's own. Every other library a binary loads goes into the pack's lib/.
is_base_lib() {
  case $1 in
    linux-vdso.so* | ld-linux*.so* | libc.so.* | libm.so.* | libpthread.so.* | libdl.so.* | \
      librt.so.* | libgcc_s.so.* | libstdc++.so.* | libcuda.so.* | libnvidia-*.so*) return 0 ;;
    *) return 1 ;;
  esac
}
