#!/usr/bin/env bash
# CI compile check of csrc/ (no GPU needed): every csrc/**/*.cu for sm_90a (and
# sm_100a when csrc/sm100/ exists) to object files in a temp dir, 2 nvcc jobs at
# a time, plus csrc/binding.cpp. Fails on any compile error; prints timings.
# The flags come from setup.py (imported, not run), so they match real builds.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvcc >/dev/null 2>&1 && [ ! -x "${CUDA_HOME:-/nonexistent}/bin/nvcc" ]; then
  echo "compile_csrc: nvcc not found, skipping the csrc compile check"
  exit 0
fi

archs="90a"
[ -d csrc/sm100 ] && archs="90a;100a"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
start=$(date +%s)
echo "compile_csrc: archs $archs, objects in $out"

GNA_FLEX_CHECK_ARCHS="$archs" GNA_FLEX_CHECK_OUT="$out" "${PYTHON:-python3}" - <<'PY'
import importlib.util
import os
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location("gna_flex_setup", "setup.py")
setup = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = setup  # dataclasses look their module up there
spec.loader.exec_module(setup)  # its setup() call runs only as __main__
try:
    setup.compile_check(
        setup.parse_archs(os.environ["GNA_FLEX_CHECK_ARCHS"]),
        jobs=int(os.environ.get(setup.JOBS_ENV) or 2),
        out_dir=Path(os.environ["GNA_FLEX_CHECK_OUT"]),
    )
except setup.BuildConfigError as error:
    sys.exit(f"compile_csrc: FAILED: {error}")
PY
echo "compile_csrc: ok in $(( $(date +%s) - start )) s"
