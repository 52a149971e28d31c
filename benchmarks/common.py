"""Shared helpers for the gna_flex benchmark scripts.

Every result file names the card, the torch / triton / CUDA versions and the
git commit, and every speed claim is a ratio against dense cuDNN SDPA timed
in the same process (see DESIGN.md, "Measuring").

Timing: on CUDA, ``triton.testing.do_bench`` (median of repeats after
warm-up, L2 flushed between repeats); on the CPU (dry runs only), the median
of a few wall-clock repeats.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def card_name(device: Optional[torch.device] = None) -> str:
    """Marketing name of the GPU (``torch.cuda.get_device_name``), or ``"cpu"``."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        return torch.cuda.get_device_name(device)
    return "cpu"


def card_slug(name: Optional[str] = None) -> str:
    """File-name form of the card: ``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``, ``"cpu"`` -> ``"cpu"``."""
    name = (name or card_name()).lower()
    for key in ("b200", "gb200", "h200", "h100", "h800", "a100", "l40s", "l4"):
        if key in name:
            return key
    return "".join(c if c.isalnum() else "-" for c in name).strip("-") or "unknown"


COMMIT_ENV = "GNA_FLEX_COMMIT"


def git_commit() -> str:
    """The commit the measured tree is at: ``$GNA_FLEX_COMMIT`` if set, else git's ``HEAD``.

    ``GNA_FLEX_COMMIT`` (environment variable, any non-empty string, stored
    as given): set it where the tree has no git metadata, e.g. the copy run
    on the GPU machine, so result files name the commit instead of
    ``"unknown"``. The caller computes it where git is (``git rev-parse HEAD``,
    plus ``-dirty`` when the copied tree has uncommitted changes) and passes
    the value literally: ``GNA_FLEX_COMMIT=<hash> bash benchmarks/run_device.sh``
    (see that script's header).
    Unset or empty: ``git rev-parse HEAD`` of this repository, with
    ``-dirty`` appended when tracked files differ from it; ``"unknown"`` when
    git is missing or this tree is not the top of a git repository.
    """
    given = os.environ.get(COMMIT_ENV, "").strip()
    if given:
        return given
    try:
        top, head = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=REPO, capture_output=True,
                                   text=True, check=True).stdout.splitlines()
        if Path(top).resolve() != REPO:  # a copy without .git inside some other repository: not our commit
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError, ValueError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def environment() -> dict[str, Any]:
    """Card, versions, commit and time: the header of every result file."""
    env: dict[str, Any] = {
        "card": card_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": git_commit(),
        "utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def sync(device: Optional[torch.device] = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize(device)


def bench_ms(fn: Callable[[], Any], *, device: Optional[torch.device] = None, warmup: int = 25, rep: int = 100,
             cpu_repeats: int = 3) -> float:
    """Median time of ``fn()`` in milliseconds.

    CUDA: ``triton.testing.do_bench(fn, warmup, rep, return_mode="median")``
    (``warmup``/``rep`` are milliseconds of GPU time). CPU: median of
    ``cpu_repeats`` calls after one warm-up call.
    """
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()
    times = []
    for _ in range(cpu_repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def wall_ms(fn: Callable[[], Any], device: Optional[torch.device] = None) -> tuple[float, Any]:
    """One call of ``fn`` timed on the wall clock (synchronising the device); ``(ms, result)``."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3, out


def dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense SDPA on ``[B, heads, S, D]``: cuDNN on CUDA (and only cuDNN), math on the CPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.CUDNN_ATTENTION if q.device.type == "cuda" else SDPBackend.MATH
    with sdpa_kernel(backend):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def dense_baseline_name(device: torch.device) -> str:
    return "cudnn_sdpa" if torch.device(device).type == "cuda" else "math_sdpa_cpu"


def attention_tflops(pairs: int, heads: int, head_dim: int, batch: int, ms: float) -> float:
    """Useful TFLOP/s: ``4 * D * heads * batch * pairs / time`` (QK^T and PV, 2 FLOPs per MAC)."""
    return 4.0 * head_dim * heads * batch * pairs / (ms * 1e-3) / 1e12 if ms > 0 else math.nan


def write_json(path: Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    return path


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table; ``columns`` are ``(key, header, format)`` with ``format`` like ``"{:.2f}"``."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, fmt in columns:
            v = r.get(key)
            line.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for j, c in enumerate(cells):
        out.append("  ".join(s.rjust(w) if j else s.ljust(w) for s, w in zip(c, widths)))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
