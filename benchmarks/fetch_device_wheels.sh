#!/bin/bash
# Fill .whl/ (git-ignored) with what the GPU machine lacks, for benchmarks/run_device.sh:
# the CUTLASS/CuTe headers (nvidia-cutlass), NATTEN's pure-Python flex backend (built here with no
# GPU visible), diffusers for the integration benchmark, and pytest/hypothesis for the GPU tests.
# The device runs Python 3.12 on x86-64; all of these are pure-Python wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl/kt
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$@"; }
dl .whl nvidia-cutlass==4.2.0.0 diffusers==0.42.1 importlib_metadata==10.2.0
dl .whl/kt pytest==9.0.3 pluggy==1.6.0 iniconfig==2.3.0 packaging==26.4 pygments==2.21.0 \
  hypothesis==6.155.2 sortedcontainers==2.4.0
[ -n "$(ls .whl/natten-*.whl 2>/dev/null)" ] || \
  CUDA_VISIBLE_DEVICES= NATTEN_CUDA_ARCH= python3 -m pip wheel -q --no-deps --no-build-isolation natten==0.21.7 -w .whl
ls -la .whl .whl/kt
