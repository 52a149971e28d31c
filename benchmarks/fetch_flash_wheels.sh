#!/bin/bash
# Make .fa4/fa4site.tar.xz (git-ignored; add /.fa4/ to .git/info/exclude) for benchmarks/run_device.sh:
# torch's FLASH flex backend on the GPU machine (Python 3.12, x86-64, CUDA 13), i.e. flash-attn-4 and
# the CuTe DSL with its needs. The wheels are ~102 MB, over the device's 64 MiB carry limit, so they are
# unpacked into one site folder (minus the aarch64/QNX stubs) and packed again as a tar.xz with the x86
# filter: ~55 MiB. Carry .fa4 (with only .whl/nvidia_cutlass-*.whl beside it: both together fit).
# Takes a few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d "$work/w" \
  flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 \
  apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
mkdir -p "$work/site" .fa4
for w in "$work"/w/*.whl; do python3 -m zipfile -e "$w" "$work/site"; done
find "$work/site" -type d -path '*/stubs/aarch64*' -prune -exec rm -rf {} +
tar -C "$work/site" -cf - . | xz -T2 --x86 --lzma2=preset=9e,dict=256MiB > .fa4/fa4site.tar.xz
ls -la .fa4/fa4site.tar.xz
