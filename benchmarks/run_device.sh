#!/bin/bash
# One GPU-machine call (repo root, carry .whl): build gna_flex._C for sm_90a, then in order of
# priority the flex benchmark, the GPU tests and the simulator calibration, each under its own
# time limit, skipping what would run past BUDGET seconds. Logs and result files go to $OUT.
#   .whl/    nvidia-cutlass 4.2.0.0, natten 0.21.7, diffusers 0.42.1 and importlib_metadata wheels
#   .whl/kt/ pytest + hypothesis wheels (python3 -m pip download --no-deps --only-binary=:all: -d .whl ...)
#   (benchmarks/fetch_device_wheels.sh fills .whl/; wheels that are absent are skipped)
#   .fa4/fa4site.tar.xz  optional: flash-attn-4 and the CuTe DSL (benchmarks/fetch_flash_wheels.sh), for the
#            FLASH flex backend. With it, carry [".fa4", ".whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl"]
#            (the whole .whl/ does not fit beside it); the device image has pytest and hypothesis.
# Usage: GNA_FLEX_COMMIT=<hash> bash benchmarks/run_device.sh [steps...]   (default: flex tests calibrate)
# flexsel: bench_flex on $FLEX_CONFIGS (comma-separated names) with $FLEX_OPTIONS (option-set names).
# GNA_FLEX_COMMIT: the commit of the tree being copied over. The device copy has no .git, so without it every
# result file records commit "unknown" (benchmarks/common.py git_commit reads it). Compute it in the checkout
# before the call and pass the value literally (no $(git ...) in the device command: git has nothing to read
# there):  echo "$(git rev-parse HEAD)$(git diff --quiet HEAD || echo -dirty)"
set -o pipefail
export PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-560}
OUT=${OUT:-/tmp/gna_out}; mkdir -p "$OUT"
if [ -n "$GNA_FLEX_COMMIT" ]; then export GNA_FLEX_COMMIT; echo "commit: $GNA_FLEX_COMMIT"
else echo "commit: GNA_FLEX_COMMIT not set: result files will record \"unknown\""; fi
# The source tree is used in place: map gna_flex.passes to passes/ as an install would.
[ -e gna_flex/passes ] || ln -s ../passes gna_flex/passes
wheels=$(ls .whl/kt/*.whl .whl/natten-*.whl .whl/diffusers-*.whl .whl/importlib_metadata-*.whl 2>/dev/null)
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site --upgrade $wheels || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
# torch's FLASH flex backend, when .fa4/fa4site.tar.xz was carried (benchmarks/fetch_flash_wheels.sh);
# its .pth is not read from PYTHONPATH, so the CuTe DSL's package folder goes there by hand.
if [ -f .fa4/fa4site.tar.xz ]; then
  python3 -c "import tarfile; tarfile.open('.fa4/fa4site.tar.xz').extractall('/tmp/site')" || exit 1
  export PYTHONPATH=$PYTHONPATH:/tmp/site/nvidia_cutlass_dsl/dsl_packages
  echo "flash-attn-4 unpacked at ${SECONDS} s"
fi
python3 -c "import zipfile; z=zipfile.ZipFile('.whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl'); z.extractall('/tmp/cl', [n for n in z.namelist() if n.startswith('cutlass_library/source/include/')])" || exit 1
export CUTLASS_INCLUDE=/tmp/cl/cutlass_library/source/include
GNA_FLEX_CUDA_ARCH=90a python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build done at ${SECONDS} s"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader

step() {  # step NAME LIMIT COMMAND...
  local name=$1 limit=$2; shift 2
  if (( SECONDS + limit > BUDGET )); then limit=$(( BUDGET - SECONDS )); fi
  if (( limit < 20 )); then echo "$name: skipped (no time left)"; return; fi
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "$name: rc $? at ${SECONDS} s"; tail -${TAIL:-14} "$OUT/$name.log"
}
steps=${*:-flex tests calibrate}
for s in $steps; do
  case $s in
    flex) step bench_flex 330 python3 benchmarks/bench_flex.py --quick --out "$OUT/flex.json" ;;
    flexfinal) step bench_flex_final 300 python3 benchmarks/bench_flex.py --options default --out "$OUT/flex.json" ;;
    flexflash) step bench_flex_flash 330 python3 benchmarks/bench_flex.py --options default,triton --rep 60 --out "$OUT/flex.json" ;;
    flexab) step bench_flex_ab 330 python3 benchmarks/bench_flex.py --quick --configs 3d-s1,2d-s1 --mask-impl tables,arith --out "$OUT/flex_ab.json" ;;
    flexopts) step bench_flex_opts 330 python3 benchmarks/bench_flex.py --configs 3d-s16x8x8,2d-s16 --options all --rep 60 --out "$OUT/flex_opts.json" ;;
    flexall) step bench_flex_all 540 python3 benchmarks/bench_flex.py --out "$OUT/flex_all.json" ;;
    tests) step gpu_tests 420 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernel.py tests/gpu/test_flex_gpu.py tests/gpu/test_layout_gpu.py ;;
    layout) step layout_tests 60 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_layout_gpu.py
            step bench_layout 60 python3 benchmarks/bench_layout.py --out "$OUT/layout.json" ;;
    alltests) step all_gpu_tests 520 python3 -m pytest -q -p no:cacheprovider tests/gpu ;;
    backendtests) step backend_tests 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_backend_gpu.py ;;
    calibrate) step calibrate_sim 200 python3 benchmarks/calibrate_sim.py --quick --out "$OUT/calibrate.json" ;;
    backend) step bench_backend 240 python3 benchmarks/bench_backend.py --out "$OUT/backend.json" ;;
    diffusers) step bench_diffusers 540 python3 benchmarks/bench_diffusers.py --layer-scale 0.25 --out "$OUT/diffusers.json" ;;
    diffusersfull) step bench_diffusers_full 440 python3 benchmarks/bench_diffusers.py --warmup 0 --reps 1 --out "$OUT/diffusers_full.json" ;;
    kernel) step bench_kernel 240 python3 benchmarks/bench_kernel.py --head-dim 128 64 --out "$OUT/kernel.json" ;;
    flexsel) step bench_flex_sel 300 python3 benchmarks/bench_flex.py --configs "${FLEX_CONFIGS:-3d-s16x8x8}" --options "${FLEX_OPTIONS:-default}" --rep 60 --out "$OUT/flex_sel.json" ;;
    flexwide) step bench_flex_wide 300 python3 benchmarks/bench_flex.py --wide-q --configs 3d-s16x8x8,2d-s16,1d-s256 --options default,m256n128w16s2tma,m256n64w16s3tma --rep 60 --out "$OUT/flex_wide.json" ;;
    flextests) step flex_tests 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_flex_gpu.py ;;
    flexopts1d) step bench_flex_opts1d 150 python3 benchmarks/bench_flex.py --configs 1d-s256 --options all --rep 60 --out "$OUT/flex_opts1d.json" ;;
    *) echo "unknown step $s" ;;
  esac
done
