#!/usr/bin/env bash
# Compiles the CPU kernels and the op registration for AArch64 with a cross compiler (objects
# only, nothing is linked or run), so that an x86 machine can check that the portable paths
# build on ARM: the AVX2/AVX-512 entries of csrc/cpu/cpu_capability.h become plain copies there.
#
#   apt-get install g++-aarch64-linux-gnu      # Debian/Ubuntu
#   scripts/check_aarch64_compile.sh [python]  # the python whose torch headers to use
set -euo pipefail
cd "$(dirname "$0")/.."
CXX="${AARCH64_CXX:-aarch64-linux-gnu-g++}"
PYTHON="${1:-python}"
if ! command -v "$CXX" > /dev/null; then
  echo "check_aarch64_compile: $CXX not found; install an AArch64 cross compiler (e.g. apt-get install g++-aarch64-linux-gnu) or set AARCH64_CXX" >&2
  exit 2
fi
INCLUDE="$("$PYTHON" -c 'import torch.utils.cpp_extension as e; print(" ".join("-I" + p for p in e.include_paths()))')"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
for source in csrc/cpu/*.cpp csrc/torch_bindings.cpp; do
  # shellcheck disable=SC2086  # INCLUDE is a list of flags
  "$CXX" -std=c++20 -O2 -fopenmp -fno-trapping-math -fPIC -Icsrc $INCLUDE -c "$source" -o "$OUT/$(basename "$source").o"
  echo "aarch64: compiled $source"
done
