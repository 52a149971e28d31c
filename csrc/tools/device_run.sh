#!/bin/bash
# One device call: build gna_flex._C for sm_90a from the carried nvidia-cutlass
# wheel, smoke test, random sweep, benchmark, compute-sanitizer. Logs under $OUT.
# Usage (repo root, .whl/ carried): bash csrc/tools/device_run.sh [configs] [bench-dims]
set -o pipefail
export PYTHONUNBUFFERED=1
# gna_flex imports gna_flex.passes, which only an install maps to passes/; the
# device runs from the source tree, so map it there (device copy only).
[ -e gna_flex/passes ] || ln -s ../passes gna_flex/passes PYTHONPATH=$PWD
CONFIGS=${1:-300}
DIMS=${2:-128,64}
python3 -c "import zipfile; z=zipfile.ZipFile('.whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl'); z.extractall('/tmp/cl', [n for n in z.namelist() if n.startswith('cutlass_library/source/include/')])" || exit 1
export CUTLASS_INCLUDE=/tmp/cl/cutlass_library/source/include
start=$(date +%s)
GNA_FLEX_CUDA_ARCH=90a python3 setup.py build_ext --inplace > $OUT/build.log 2>&1 || { tail -40 $OUT/build.log; exit 1; }
echo "build $(( $(date +%s) - start )) s"; grep -i "spill\|C75\|warning" $OUT/build.log | sort | uniq -c | head
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader
timeout 60 python3 csrc/tools/check_sm90.py --configs 6 --small 2>&1 | tee $OUT/smoke.log || { echo SMOKE FAILED; exit 1; }
timeout 200 python3 csrc/tools/check_sm90.py --configs $CONFIGS --json $OUT/sweep.json > $OUT/sweep.log 2>&1; echo "sweep rc $?"
grep -v "^FAIL" $OUT/sweep.log | tail -12; grep "^FAIL" $OUT/sweep.log | head -6
timeout 200 python3 csrc/tools/check_sm90.py --configs 0 --bench --bench-dims $DIMS --json $OUT/bench.json 2>&1 | tee $OUT/bench.log
if [ -n "$ALT" ]; then  # the other scheduling variant, for comparison
  GNA_FLEX_SM90_PINGPONG=0 timeout 100 python3 csrc/tools/check_sm90.py --configs 100 > $OUT/sweep_nopp.log 2>&1; echo "sweep (no ping-pong) rc $?"; grep "configs passed" $OUT/sweep_nopp.log
  GNA_FLEX_SM90_PINGPONG=0 timeout 150 python3 csrc/tools/check_sm90.py --configs 0 --bench --bench-dims 128 --json $OUT/bench_nopp.json 2>&1 | tee $OUT/bench_nopp.log
fi
if [ -n "$PROFILE" ]; then  # one launch of one config under Nsight Compute
  timeout 120 ncu --kernel-name regex:gna_fwd --launch-skip 1 --launch-count 1 --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats python3 csrc/tools/check_sm90.py --profile $PROFILE > $OUT/ncu.txt 2>&1; echo "ncu rc $?"; grep -E "Throughput|Busy|Pipe|Issue|L2 Hit|Duration|SM Frequency|Stall" $OUT/ncu.txt | head -30
fi
timeout 100 compute-sanitizer --tool memcheck python3 csrc/tools/check_sm90.py --configs 3 --small > $OUT/sanitizer.log 2>&1; echo "sanitizer rc $?"; tail -4 $OUT/sanitizer.log
