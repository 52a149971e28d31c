"""Benchmark of the fused sm90 GNA kernel against dense cuDNN SDPA and the gna flex path.

For each config of :data:`CONFIGS` (bf16, batch 1, 24 heads, head dim 128 by
default) it measures, in one process on one GPU, with
``triton.testing.do_bench`` medians after warm-up:

* dense cuDNN SDPA on the same tokens (``[B, heads, S, D]`` inputs, every
  query sees every key): the baseline;
* the whole fused-kernel op, :func:`gna_flex.cutlass.forward` on native-layout
  ``[B, *grid, heads, D]`` inputs (output allocation included);
* the whole flex path, :func:`gna_flex.flex.flex_na` (permutation included);
  a failure there is recorded and the column left empty.

It reports time, speedup over cuDNN, the FLOP-wise bound (dense pairs / pairs
the rule allows, :func:`gna_flex.spec.count_pairs`), useful TFLOP/s
(``4 * D * heads * batch * pairs / time``) and the kernel's speedup over the
flex path, writes ``benchmarks/results/kernel-<card>.json`` (card, torch
version, git commit, date; runs of other head dims in that file are kept) and
prints a compact table last.

    python benchmarks/bench_kernel.py                  # head dim 128
    python benchmarks/bench_kernel.py --head-dim 64
    python benchmarks/bench_kernel.py --configs 3d-s16x8x8 1d-s256 --no-flex
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark problem: a token grid and its GNA window (no dilation, not causal)."""

    name: str
    grid: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]


# The problems of issue 4 (DESIGN.md, "Measuring"); tests/gpu/test_kernel.py checks them too.
CONFIGS: tuple[BenchConfig, ...] = (
    BenchConfig("3d-s16x8x8", (30, 48, 80), (18, 24, 24), (16, 8, 8)),
    BenchConfig("3d-s1", (30, 48, 80), (18, 24, 24), (1, 1, 1)),
    BenchConfig("2d-s16x16", (256, 256), (80, 80), (16, 16)),
    BenchConfig("2d-s1", (256, 256), (80, 80), (1, 1)),
    BenchConfig("1d-s1", (32768,), (2048,), (1,)),
    BenchConfig("1d-s256", (32768,), (2048,), (256,)),
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def median_ms(fn: Callable[[], Any], warmup_ms: float, rep_ms: float, min_reps: int = 10) -> float:
    """Median time of ``fn`` in ms (:func:`common.bench_ms`, i.e. do_bench), after one untimed call.

    The budgets grow with the op's own duration so that slow ops (dense
    attention over 100k tokens takes hundreds of ms) still get ``min_reps``
    timed repeats instead of do_bench's single one.
    """
    device = torch.device("cuda")
    fn()  # compiles, autotunes, allocates; never timed
    once_ms, _ = common.wall_ms(fn, device)
    return common.bench_ms(fn, device=device, warmup=max(warmup_ms, 2 * once_ms),
                           rep=max(rep_ms, min_reps * once_ms))


def _error(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()[-1500:]


# --------------------------------------------------------------------------- one config


def bench_config(cfg: BenchConfig, *, head_dim: int, heads: int, batch: int, dtype: torch.dtype,
                 run_flex: bool, warmup_ms: float, rep_ms: float) -> dict:
    """Time cuDNN, the kernel and the flex path on one config; returns one result row."""
    from gna_flex import cutlass
    from gna_flex.spec import count_pairs, make_params

    params = make_params(cfg.grid, cfg.kernel_size, cfg.stride)
    tokens = params.num_tokens
    pairs = count_pairs(params)
    scale = head_dim ** -0.5
    row: dict = {**asdict(cfg), "tokens": tokens, "pairs": pairs, "flop_bound": tokens * tokens / pairs}

    dev = torch.device("cuda")
    q_dense, k_dense, v_dense = (torch.randn(batch, heads, tokens, head_dim, device=dev, dtype=dtype)
                                 for _ in range(3))
    try:
        row["cudnn_ms"] = median_ms(lambda: common.dense_sdpa(q_dense, k_dense, v_dense), warmup_ms, rep_ms)
        row["cudnn_tflops"] = common.attention_tflops(tokens * tokens, heads, head_dim, batch, row["cudnn_ms"])
    except Exception as exc:  # noqa: BLE001 (recorded in the result file)
        row["cudnn_error"] = _error(exc)
    q_dense = k_dense = v_dense = None  # free the dense inputs before the native-layout ones

    shape = (batch, *cfg.grid, heads, head_dim)
    q, k, v = (torch.randn(shape, device=dev, dtype=dtype) for _ in range(3))
    kernel_out = None
    try:
        row["kernel_ms"] = median_ms(lambda: cutlass.forward(q, k, v, params, scale=scale), warmup_ms, rep_ms)
        row["kernel_tflops"] = common.attention_tflops(pairs, heads, head_dim, batch, row["kernel_ms"])
        kernel_out, _ = cutlass.forward(q, k, v, params, scale=scale)
        row["kernel_output_finite"] = bool(torch.isfinite(kernel_out).all())
    except Exception as exc:  # noqa: BLE001
        row["kernel_error"] = _error(exc)

    if run_flex:
        try:
            from gna_flex.flex import flex_na

            row["flex_ms"] = median_ms(lambda: flex_na(q, k, v, params, scale=scale), warmup_ms, rep_ms)
            row["flex_tflops"] = common.attention_tflops(pairs, heads, head_dim, batch, row["flex_ms"])
            if kernel_out is not None:
                flex_out = flex_na(q, k, v, params, scale=scale)
                row["max_abs_diff_kernel_vs_flex"] = float((kernel_out.float() - flex_out.float()).abs().max())
        except Exception as exc:  # noqa: BLE001
            row["flex_error"] = _error(exc)

    if "cudnn_ms" in row and "kernel_ms" in row:
        row["speedup_vs_cudnn"] = row["cudnn_ms"] / row["kernel_ms"]
        row["fraction_of_bound"] = row["speedup_vs_cudnn"] / row["flop_bound"]
    if "cudnn_ms" in row and "flex_ms" in row:
        row["flex_speedup_vs_cudnn"] = row["cudnn_ms"] / row["flex_ms"]
    if "kernel_ms" in row and "flex_ms" in row:
        row["speedup_vs_flex"] = row["flex_ms"] / row["kernel_ms"]
    return row


# --------------------------------------------------------------------------- output

COLUMNS = [
    ("name", "config", "{}"),
    ("flop_bound", "bound", "{:.1f}"),
    ("cudnn_ms", "cuDNN ms", "{:.3f}"),
    ("kernel_ms", "kernel ms", "{:.3f}"),
    ("speedup_vs_cudnn", "x cuDNN", "{:.2f}"),
    ("kernel_tflops", "TFLOP/s", "{:.0f}"),
    ("flex_ms", "flex ms", "{:.3f}"),
    ("speedup_vs_flex", "x flex", "{:.2f}"),
]


def table(rows: list[dict], head_dim: int) -> str:
    lines = [f"head dim {head_dim}", common.format_table(rows, COLUMNS)]
    for r in rows:
        for key in ("cudnn_error", "kernel_error", "flex_error"):
            if key in r:
                lines.append(f"  {r['name']} {key}: {r[key].splitlines()[-1][:160]}")
    return "\n".join(lines)


def write_results(path: Path, head_dim: int, run: dict) -> None:
    """Store ``run`` under ``runs["d<head_dim>"]`` of ``path``, keeping other head dims' runs of the same card."""
    data: dict = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = {}
    if data.get("card") != run["card"]:
        data = {}
    data["card"] = run["card"]
    data.setdefault("runs", {})[f"d{head_dim}"] = run
    common.write_json(path, data)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dim", type=int, nargs="+", default=[128], choices=(64, 128))
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--configs", nargs="+", choices=[c.name for c in CONFIGS], default=None,
                        help="subset of configs (default: all)")
    parser.add_argument("--no-flex", action="store_true", help="skip the flex path column")
    parser.add_argument("--warmup-ms", type=float, default=100.0)
    parser.add_argument("--rep-ms", type=float, default=500.0)
    parser.add_argument("--out", type=Path, default=None, help="result file (default results/kernel-<card>.json)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernel: no CUDA device", file=sys.stderr)
        return 1
    from gna_flex import cutlass

    path = args.out or common.RESULTS / f"kernel-{common.card_slug()}.json"
    configs = [c for c in CONFIGS if args.configs is None or c.name in args.configs]
    tables = []
    for head_dim in args.head_dim:
        rows = []
        for cfg in configs:
            print(f"bench_kernel: {cfg.name}, head dim {head_dim} ...", file=sys.stderr, flush=True)
            rows.append(bench_config(cfg, head_dim=head_dim, heads=args.heads, batch=args.batch,
                                     dtype=DTYPES[args.dtype], run_flex=not args.no_flex,
                                     warmup_ms=args.warmup_ms, rep_ms=args.rep_ms))
            torch.cuda.empty_cache()
        run = {
            **common.environment(),
            "kernel_unavailable_reason": cutlass.unavailable_reason(),
            "dtype": args.dtype,
            "batch": args.batch,
            "heads": args.heads,
            "head_dim": head_dim,
            "baseline": "dense cuDNN SDPA, [B, heads, S, D], same process",
            "timing": (f"triton.testing.do_bench median; warmup >= {args.warmup_ms} ms, rep >= {args.rep_ms} ms "
                       f"and >= 10 repeats"),
            "rows": rows,
        }
        write_results(path, head_dim, run)
        tables.append(table(rows, head_dim))
    print(f"bench_kernel: wrote {path}", file=sys.stderr)
    print(f"{common.card_name()}, torch {torch.__version__}, {args.dtype}, batch {args.batch}, {args.heads} heads")
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
