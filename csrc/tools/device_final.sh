#!/bin/bash
# Device call with the project's own GPU tests and benchmark (repo root; carry .whl):
# build gna_flex._C for sm_90a, pytest tests/gpu/test_kernel.py, compute-sanitizer
# on its --sanitize subset, benchmarks/bench_kernel.py (head dims 64 and 128, no flex).
# .whl/kt/ holds pytest, pluggy, iniconfig, packaging, pygments, hypothesis and
# sortedcontainers wheels (python3 -m pip download --no-deps --only-binary=:all: -d .whl/kt ...),
# .whl/ the nvidia-cutlass 4.2.0.0 wheel.
set -o pipefail
export PYTHONUNBUFFERED=1
# gna_flex imports gna_flex.passes, which only an install maps to passes/; the
# device runs from the source tree, so map it there (device copy only).
[ -e gna_flex/passes ] || ln -s ../passes gna_flex/passes
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/kt/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import zipfile; z=zipfile.ZipFile('.whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl'); z.extractall('/tmp/cl', [n for n in z.namelist() if n.startswith('cutlass_library/source/include/')])" || exit 1
export CUTLASS_INCLUDE=/tmp/cl/cutlass_library/source/include
start=$(date +%s)
GNA_FLEX_CUDA_ARCH=90a python3 setup.py build_ext --inplace > $OUT/build.log 2>&1 || { tail -40 $OUT/build.log; exit 1; }
echo "build $(( $(date +%s) - start )) s"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
timeout 130 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernel.py > $OUT/pytest.log 2>&1; echo "pytest rc $?"; tail -8 $OUT/pytest.log
timeout 40 compute-sanitizer --tool memcheck python3 tests/gpu/test_kernel.py --sanitize > $OUT/sanitizer.log 2>&1; echo "sanitizer rc $?"; tail -3 $OUT/sanitizer.log
timeout 45 python3 benchmarks/bench_kernel.py --head-dim 64 --no-flex --out $OUT/kernel.json > $OUT/bench64.log 2>&1; echo "bench64 rc $?"
timeout 45 python3 benchmarks/bench_kernel.py --head-dim 128 --no-flex --out $OUT/kernel.json > $OUT/bench128.log 2>&1; echo "bench128 rc $?"
tail -12 $OUT/bench64.log; tail -12 $OUT/bench128.log
