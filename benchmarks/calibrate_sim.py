"""Calibrate the cost model of gna_flex.sim on the GPU at hand.

Runs in one process on one CUDA GPU (a few minutes): for a set of configs
chosen to separate the constants (perfectly block-sparse ones of several sizes
for the full-tile rate, sliding-window and mid strides of each rank for the
partial-tile rates, a small one for the launch overhead, one with extra
tokens), it measures

* dense cuDNN SDPA on the same problem (``[B, heads, S, D]``),
* the flex path, :func:`gna_flex.flex.flex_na` (``[B, *grid, heads, D]``),
* the flex path's token permutation alone (the same ``gna_flex.layout`` calls),
* the fused kernel through ``gna_flex.ops.na(..., backend="cutlass")`` when it
  is built (``--no-kernel`` skips it),

with ``triton.testing.do_bench`` medians, then fits the constants of the
device family by non-negative least squares on relative errors, writes a
result file under ``benchmarks/results/`` (card, torch version, git commit,
every measurement, the fitted constants in ``calibration.json`` form) and
prints prediction vs measurement. ``--write`` also stores the fitted family
in ``gna_flex/sim/calibration.json``.

    python benchmarks/calibrate_sim.py            # measure, fit, report
    python benchmarks/calibrate_sim.py --write    # ... and update the package constants
    python benchmarks/calibrate_sim.py --dry-run  # no GPU: synthetic timings, checks the fit and the report
    python benchmarks/calibrate_sim.py --cpu-smoke  # no GPU: the measuring code on tiny CPU shapes
    python benchmarks/calibrate_sim.py --head-dims 64   # also measure head dim 64: fit its efficiency
    python benchmarks/calibrate_sim.py --from-results benchmarks/results/calibrate-h200.json \
        benchmarks/results/kernel-h200.json --write   # no GPU: refit from saved result files

Head-dim efficiency (see ``gna_flex.sim.cost.head_dim_efficiency``): the
rates are fitted at the reference head dim (``--head-dim``, 128). Every
record at another head dim -- measured here with ``--head-dims``, or read from
any result file that ``compare_sim.py`` understands (``bench_kernel.py``'s
``runs.d64`` holds the kernel and cuDNN at head dim 64) -- goes into a
one-parameter fit per part (dense, kernel, flex) and head dim: the factor on
the compute rates that minimises the squared relative error, with launch and
permutation time held at their reference values. The reference head dim has
factor 1.0 by definition; a part with no record at a head dim gets no entry
there (the model then interpolates and marks the head dim as not measured).

``--from-results`` refits from saved files, no GPU: the base constants from
the records of ``calibrate_sim.py`` result files among them (their card,
torch version and measurement date are kept; none given: the packaged
constants stay), the efficiencies from all records of all files.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from gna_flex.sim import simulate
from gna_flex.sim.cost import (
    PATHS,
    _dtype_info,
    cost_features,
    dense_time_ms,
    device_family,
    load_calibration,
    path_simulate_kwargs,
    path_time_ms,
)
from gna_flex.spec import make_params

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script or loaded by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

ROOT = common.REPO
PACKAGE_CALIBRATION = ROOT / "gna_flex" / "sim" / "calibration.json"

# name, grid, kernel_size, stride, tile, extra tokens, causal
CONFIGS: list[tuple[str, tuple, tuple, tuple, tuple, int, Any]] = [
    # perfectly block-sparse: full-tile rate (three ranks, two sizes of work each)
    ("3d paper 16x8x8", (30, 48, 80), (18, 24, 24), (16, 8, 8), (2, 8, 8), 0, False),
    ("3d 8x16x16 blocked", (30, 48, 80), (8, 16, 16), (8, 16, 16), (2, 8, 8), 0, False),
    ("2d paper 16x16", (256, 256), (80, 80), (16, 16), (16, 8), 0, False),
    ("2d 32x32 blocked", (256, 256), (32, 32), (32, 32), (16, 8), 0, False),
    ("1d paper 2048/256", (32768,), (2048,), (256,), (128,), 0, False),
    ("1d 512 blocked", (32768,), (512,), (512,), (128,), 0, False),
    # partial tiles: sliding window and mid strides per rank
    ("3d stride 1", (30, 48, 80), (18, 24, 24), (1, 1, 1), (2, 8, 8), 0, False),
    ("3d stride 2x8x4", (30, 48, 80), (18, 24, 24), (2, 8, 4), (2, 8, 8), 0, False),
    ("2d stride 1", (256, 256), (80, 80), (1, 1), (16, 8), 0, False),
    ("2d stride 16x8", (256, 256), (80, 80), (16, 8), (16, 8), 0, False),
    ("1d stride 1", (32768,), (2048,), (1,), (128,), 0, False),
    ("1d 384 stride 1", (32768,), (384,), (1,), (128,), 0, False),
    ("1d causal stride 1", (32768,), (2048,), (1,), (128,), 0, True),
    # extra tokens (a partial extra tile) and a small call (launch overhead)
    ("2d paper + 300 extra", (256, 256), (80, 80), (16, 16), (16, 8), 300, False),
    ("1d small 4096/512", (4096,), (512,), (512,), (128,), 0, False),
]

# --cpu-smoke: tiny shapes that run eagerly on the CPU in seconds.
SMOKE_CONFIGS = [
    ("smoke 3d", (2, 4, 8), (2, 2, 4), (2, 2, 4), (1, 2, 8), 0, False),
    ("smoke 2d stride 1", (8, 12), (4, 6), (1, 1), (4, 4), 5, False),
    ("smoke 1d causal", (64,), (16,), (1,), (16,), 0, True),
]


# ---------------------------------------------------------------------------
# Measurement


def _bench(fn: Callable[[], Any], expected_ms: float = 1.0, device: str = "cuda") -> float:
    """:func:`common.bench_ms` with warm-up and repeat budgets grown from ``expected_ms``.

    On the CPU (``--cpu-smoke``) one timed call: it checks the measuring code, the numbers mean nothing.
    """
    return common.bench_ms(fn, device=torch.device(device), warmup=max(25, 2 * expected_ms),
                           rep=max(200, 8 * expected_ms), cpu_repeats=1)


def measure(configs, heads: int, head_dim: int, batch: int, dtype: torch.dtype, with_kernel: bool,
            device: str = "cuda") -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from gna_flex.flex import flex_na, tile_major_inputs, tile_major_output

    # One compile per sequence shape; the mask parameters are tensors, so configs
    # of one shape share it. Raise the limit so a few shapes never fall back to eager.
    dyn = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dyn, name):
            setattr(dyn, name, max(getattr(dyn, name), 64))
    kernel_ops = None
    if with_kernel:
        try:
            from gna_flex import cutlass, ops

            kernel_ops = ops if cutlass.is_available() else None
            if kernel_ops is None:
                print("fused kernel not available: measuring the flex path only", file=sys.stderr)
        except ImportError as exc:
            print(f"fused kernel not importable ({exc}): measuring the flex path only", file=sys.stderr)

    dev = torch.device(device)
    dense_cache: dict[tuple, float] = {}
    records = []
    for name, grid, ks, stride, tile, extra, causal in configs:
        params = make_params(grid, ks, stride, 1, causal)
        n = params.num_tokens
        shape = (batch, *grid, heads, head_dim)
        q = torch.randn(shape, device=dev, dtype=dtype)
        k = torch.randn(shape, device=dev, dtype=dtype)
        v = torch.randn(shape, device=dev, dtype=dtype)
        ak = av = None
        if extra:
            ak = torch.randn(batch, extra, heads, head_dim, device=dev, dtype=dtype)
            av = torch.randn(batch, extra, heads, head_dim, device=dev, dtype=dtype)
        rep = simulate(grid, ks, stride, 1, causal, q_tile=tile, kv_tile=tile, extra_tokens=extra,
                       **path_simulate_kwargs("flex"))
        expect = 4.0 * n * (n + extra) * head_dim * heads * batch / 400e12 * 1e3

        key = (n, extra)
        if key not in dense_cache:
            qd = torch.randn(batch, heads, n, head_dim, device=dev, dtype=dtype)
            kd = torch.randn(batch, heads, n + extra, head_dim, device=dev, dtype=dtype)
            vd = torch.randn(batch, heads, n + extra, head_dim, device=dev, dtype=dtype)
            try:
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    dense_cache[key] = (_bench(lambda: sdpa(qd, kd, vd), expect, device), "cudnn")
            except RuntimeError as exc:  # recorded, so a result never passes another baseline off as cuDNN
                print(f"{name}: cuDNN SDPA unavailable ({exc}); dense baseline is torch's default SDPA",
                      file=sys.stderr)
                dense_cache[key] = (_bench(lambda: sdpa(qd, kd, vd), expect, device), "sdpa-default")
            del qd, kd, vd

        def run_flex():
            return flex_na(q, k, v, params, additional_keys=ak, additional_values=av, tile=tile)

        run_flex()  # compile and build the block mask outside the timing
        flex_ms = _bench(run_flex, expect / max(rep.tile_speedup, 1.0), device)

        permute_ms = None
        try:
            sg = math.prod(-(-g // t) * t for g, t in zip(grid, tile))
            kv_len = -(-(sg + extra) // 128) * 128

            def run_permute():  # the flex path's own layout calls, without the kernel
                qt, _, _, lay = tile_major_inputs(q, k, v, grid, tile, kv_len, ak, av)
                return tile_major_output(qt, lay)

            run_permute()
            permute_ms = _bench(run_permute, 1.0, device)
        except Exception as exc:  # the layout API is another module's; the fit copes without it
            print(f"{name}: permutation not measured separately ({type(exc).__name__}: {exc})", file=sys.stderr)

        kernel_ms = None
        if kernel_ops is not None:
            try:
                def run_kernel():
                    return kernel_ops.na(q, k, v, params, scale=head_dim ** -0.5, additional_keys=ak,
                                         additional_values=av, backend="cutlass")

                run_kernel()
                kernel_ms = _bench(run_kernel, expect / max(rep.tile_speedup, 1.0), device)
            except Exception as exc:  # unsupported inputs for the kernel: measured on the flex path only
                print(f"{name}: kernel not measured ({type(exc).__name__}: {exc})", file=sys.stderr)

        dense_ms, dense_backend = dense_cache[key]
        rec = _record(name, params, tile, extra, heads, head_dim, batch, dtype, dense_ms, flex_ms, permute_ms,
                      kernel_ms)
        rec["dense_backend"] = dense_backend
        records.append(rec)
        print(f"measured {name:<24} dense {dense_ms:9.3f} ms  flex {flex_ms:9.3f} ms"
              + (f"  permute {permute_ms:7.3f} ms" if permute_ms is not None else "")
              + (f"  kernel {kernel_ms:9.3f} ms" if kernel_ms is not None else ""), flush=True)
        q = k = v = ak = av = None  # free this config's inputs before the next one
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return records


def _record(name, params, tile, extra, heads, head_dim, batch, dtype, dense_ms, flex_ms, permute_ms,
            kernel_ms) -> dict:
    return {
        "name": name,
        "grid": list(params.grid),
        "kernel_size": list(params.kernel_size),
        "stride": list(params.stride),
        "dilation": list(params.dilation),
        "is_causal": list(params.is_causal),
        "tile": list(tile),
        "extra_tokens": extra,
        "heads": heads,
        "head_dim": head_dim,
        "batch": batch,
        "dtype": str(dtype).removeprefix("torch."),
        "dense_ms": dense_ms,
        "flex_ms": flex_ms,
        "permute_ms": permute_ms,
        "kernel_ms": kernel_ms,
    }


def synthetic(configs, heads, head_dim, batch, dtype, family: str, with_kernel: bool, seed: int = 0,
              constants: Optional[dict] = None, noise: float = 0.05) -> list[dict]:
    """Timings from ``constants`` (default: the packaged ones) with relative noise (``--dry-run``: no GPU).

    The compute rates are scaled by the constants' head-dim efficiency at ``head_dim``.
    """
    rng = np.random.default_rng(seed)
    consts = constants if constants is not None else load_calibration()["families"][family]
    out = []
    for name, grid, ks, stride, tile, extra, causal in configs:
        params = make_params(grid, ks, stride, 1, causal)
        rep = simulate(grid, ks, stride, 1, causal, q_tile=tile, kv_tile=tile, extra_tokens=extra,
                       **path_simulate_kwargs("flex"))

        def noisy(x: float) -> float:
            return float(x * rng.normal(1.0, noise)) if noise else float(x)

        f = cost_features(rep, heads, head_dim, batch, dtype, "flex")
        flex = sum(path_time_ms(consts, "flex", len(grid), f["full_tflop"], f["partial_tflop"],
                                f["permute_gb"], head_dim).values())
        perm = path_time_ms(consts, "flex", len(grid), 0.0, 0.0, f["permute_gb"])["permute_ms"]
        kern = None
        if with_kernel:
            rk = simulate(grid, ks, stride, 1, causal, q_tile=tile, kv_tile=tile, extra_tokens=extra,
                          **path_simulate_kwargs("kernel"))
            fk = cost_features(rk, heads, head_dim, batch, dtype, "kernel")
            kern = noisy(sum(path_time_ms(consts, "kernel", len(grid), fk["full_tflop"], fk["partial_tflop"],
                                          0.0, head_dim).values()))
        out.append(_record(name, params, tile, extra, heads, head_dim, batch, dtype,
                           noisy(dense_time_ms(consts, f["dense_tflop"], head_dim)), noisy(flex), noisy(perm), kern))
    return out


# ---------------------------------------------------------------------------
# Fitting


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with x >= 0 (active set: drop variables that come out negative, refit)."""
    free = np.ones(a.shape[1], dtype=bool)
    x = np.zeros(a.shape[1])
    while free.any():
        sol, *_ = np.linalg.lstsq(a[:, free], b, rcond=None)
        if (sol >= 0).all():
            x[:] = 0
            x[free] = sol
            return x
        idx = np.flatnonzero(free)
        free[idx[sol < 0]] = False
    return x


def report_of(rec: dict, path: str = "flex"):
    return simulate(tuple(rec["grid"]), tuple(rec["kernel_size"]), tuple(rec["stride"]), tuple(rec["dilation"]),
                    tuple(rec["is_causal"]), q_tile=tuple(rec["tile"]), kv_tile=tuple(rec["tile"]),
                    extra_tokens=rec["extra_tokens"], **path_simulate_kwargs(path))


def fit(records: list[dict], family: str, card: str, torch_version: str, date: Optional[str] = None,
        source: Optional[str] = None) -> dict:
    """Fitted constants for ``family`` in calibration.json form (unfitted terms keep their old values).

    ``date`` (default today) and ``source`` (default: the configs fitted) are
    stored with the constants; the head-dim efficiency table is kept as it was
    (refit it with :func:`fit_head_dim_efficiency`).
    """
    old = load_calibration()["families"][family]
    new = copy.deepcopy(old)
    feats = [(rec, report_of(rec)) for rec in records]

    # Dense: t = launch_us * 1e-3 + tflop / rate * 1e3.
    rows, rhs = [], []
    for rec, rep in feats:
        f = cost_features(rep, rec["heads"], rec["head_dim"], rec["batch"], rec["dtype"], "flex")
        t = rec["dense_ms"]
        rows.append([1e-3 / t, f["dense_tflop"] * 1e3 / t])
        rhs.append(1.0)
    x = nnls(np.array(rows), np.array(rhs))
    new["dense"]["launch_us"] = float(x[0])
    if x[1] > 0:
        new["dense"]["tflops"] = float(1.0 / x[1])

    for path, key in (("flex", "flex_ms"), ("kernel", "kernel_ms")):
        usable = [(rec, report_of(rec, path)) for rec in records if rec.get(key) is not None]
        if not usable:
            continue
        pc = new[path]
        permute_known = path == "flex" and all(rec.get("permute_ms") is not None for rec, _ in usable)
        if permute_known:
            gb = np.array([cost_features(rep, rec["heads"], rec["head_dim"], rec["batch"], rec["dtype"], "flex")
                           ["permute_gb"] for rec, rep in usable])
            ms = np.array([rec["permute_ms"] for rec, _ in usable])
            w = 1.0 / ms
            inv = nnls((gb * 1e3 * w)[:, None], ms * w)[0]
            if inv > 0:
                pc["permute_gbps"] = float(1.0 / inv)
        ranks = sorted({len(rec["grid"]) for rec, rep in usable if rep.visited_partial})
        cols = ["launch", "full"] + [f"partial{r}" for r in ranks]
        if path == "flex" and not permute_known:
            cols.append("permute")
        rows, rhs = [], []
        for rec, rep in usable:
            f = cost_features(rep, rec["heads"], rec["head_dim"], rec["batch"], rec["dtype"], path)
            t = rec[key]
            if path == "flex" and permute_known:
                t_fit = t - f["permute_gb"] / pc["permute_gbps"] * 1e3
            else:
                t_fit = t
            row = {"launch": 1e-3, "full": f["full_tflop"] * 1e3, "permute": f["permute_gb"] * 1e3}
            for r in ranks:
                row[f"partial{r}"] = f["partial_tflop"] * 1e3 if len(rec["grid"]) == r else 0.0
            rows.append([row[c] / t for c in cols])
            rhs.append(t_fit / t)
        x = dict(zip(cols, nnls(np.array(rows), np.array(rhs))))
        pc["launch_us"] = float(x["launch"])
        if x["full"] > 0:
            pc["full_tflops"] = float(1.0 / x["full"])
        rates = dict(pc["partial_tflops"]) if isinstance(pc["partial_tflops"], dict) else {
            str(r): pc["partial_tflops"] for r in (1, 2, 3)}
        for r in ranks:
            if x[f"partial{r}"] > 0:
                rates[str(r)] = float(1.0 / x[f"partial{r}"])
        pc["partial_tflops"] = rates
        if "permute" in x and x["permute"] > 0:
            pc["permute_gbps"] = float(1.0 / x["permute"])

    new["status"] = "calibrated"
    new["card"] = card
    new["date"] = date or dt.date.today().isoformat()
    new["torch"] = torch_version
    new["dtype"] = records[0]["dtype"]
    new["source"] = source or (f"benchmarks/calibrate_sim.py: non-negative least squares on relative error over "
                               f"{len(records)} configs ({', '.join(r['name'] for r in records)})")
    return new


def _compare_module():
    """benchmarks/compare_sim.py (its result-file readers), loaded by path so this works as a script or module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_sim", Path(__file__).resolve().parent / "compare_sim.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def normalised(records: list[dict]) -> list[dict]:
    """This script's records in compare_sim.py's form (problem, ``times`` per path, ``dense_ms``)."""
    return _compare_module().records_of({"records": records})


def _efficiency_rows(rec: dict, consts: dict) -> list[tuple[str, float, float, float]]:
    """``(part, compute_ms at factor 1, other_ms, measured_ms)`` for each time of one normalised record."""
    out = []
    kv_tile = rec["kv_tile"] or rec["q_tile"]
    args = (int(rec["heads"]), int(rec["head_dim"]), int(rec["batch"]), rec["dtype"])
    for path, measured in rec["times"].items():
        if measured is None:
            continue
        model_path = "flex" if path == "flex-nopermute" else path
        if model_path not in PATHS:
            continue
        rep = simulate(rec["grid"], rec["kernel_size"], rec["stride"], rec["dilation"], rec["is_causal"],
                       q_tile=rec["q_tile"], kv_tile=kv_tile, extra_tokens=int(rec["extra_tokens"]),
                       **path_simulate_kwargs(model_path))
        f = cost_features(rep, *args, model_path, float(consts.get("float32_slowdown", 1.0)))
        t = path_time_ms(consts, model_path, len(rec["grid"]), f["full_tflop"], f["partial_tflop"], f["permute_gb"])
        other = t["launch_ms"] + (0.0 if path == "flex-nopermute" else t["permute_ms"])
        out.append((model_path, t["full_ms"] + t["partial_ms"], other, float(measured)))
    if rec.get("dense_ms"):
        rep = simulate(rec["grid"], rec["kernel_size"], rec["stride"], rec["dilation"], rec["is_causal"],
                       q_tile=rec["q_tile"], kv_tile=kv_tile, extra_tokens=int(rec["extra_tokens"]),
                       **path_simulate_kwargs("kernel"))
        f = cost_features(rep, *args, "kernel", float(consts.get("float32_slowdown", 1.0)))
        launch = consts["dense"]["launch_us"] * 1e-3
        out.append(("dense", dense_time_ms(consts, f["dense_tflop"]) - launch, launch, float(rec["dense_ms"])))
    return out


def fit_head_dim_efficiency(records: list[dict], constants: dict, reference: int, files: Optional[list[str]] = None,
                            dtype: str = "bfloat16") -> dict:
    """The ``head_dim_efficiency`` table for ``constants`` (one family) from normalised records.

    For each part (dense, kernel, flex) and each head dim other than
    ``reference`` with records in ``dtype``: the factor ``e`` on the compute
    rates minimising ``sum(((other + compute / e - t) / t) ** 2)`` (launch and
    permutation time held), a closed-form least squares in ``1 / e``. The
    reference head dim gets 1.0. ``fitted_from`` lists, per part and head dim,
    the record count, source files and the in-sample errors of the fit.
    """
    groups: dict[tuple[str, int], list[tuple[float, float, float, str]]] = {}
    for rec in records:
        if int(rec["head_dim"]) == reference or _dtype_info(rec["dtype"])[0] != _dtype_info(dtype)[0]:
            continue
        for part, compute, other, t in _efficiency_rows(rec, constants):
            groups.setdefault((part, int(rec["head_dim"])), []).append((compute, other, t, rec.get("file", "?")))
    table: dict[str, Any] = {"reference": reference, "dtype": dtype}
    fitted_from: dict[str, dict[str, Any]] = {}
    for part in ("dense",) + PATHS:
        table[part] = {str(reference): 1.0}
    for (part, d), rows in sorted(groups.items()):
        a = np.array([c / t for c, _, t, _ in rows])
        b = np.array([(t - o) / t for _, o, t, _ in rows])
        inv = float(a @ b / (a @ a))
        if not inv > 0:
            print(f"head dim {d}, {part}: no positive efficiency fits (launch time exceeds the measurements); "
                  "left out", file=sys.stderr)
            continue
        e = 1.0 / inv
        errs = [100.0 * (o + c / e - t) / t for c, o, t, _ in rows]
        table[part][str(d)] = e
        fitted_from.setdefault(part, {})[str(d)] = {
            "records": len(rows),
            "files": sorted({f for *_, f in rows}),
            "max_error_pct": float(max(abs(x) for x in errs)),
            "rms_error_pct": float(math.sqrt(sum(x * x for x in errs) / len(errs))),
        }
    for part in ("dense",) + PATHS:
        table[part] = dict(sorted(table[part].items(), key=lambda kv: int(kv[0])))
    fitted = ", ".join(f"{part} at {', '.join(ds)}" for part, ds in fitted_from.items()) or "none"
    table["source"] = (f"benchmarks/calibrate_sim.py fit_head_dim_efficiency: one factor per part and head dim on the "
                       f"compute rates fitted at head dim {reference} (1.0 there by definition), least squares on "
                       f"relative error, in-sample; fitted: {fitted}; from {', '.join(files or ['measured records'])}. "
                       f"Head dims not listed are not measured: interpolated in log2(head_dim), clamped outside "
                       f"the measured range.")
    table["fitted_from"] = fitted_from
    return table


# ---------------------------------------------------------------------------
# Reporting


def predictions(records: list[dict], family: str, constants: dict) -> list[dict]:
    from gna_flex.sim import estimate

    cal = {"format": 1, "families": {family: constants}}
    rows = []
    for rec in records:
        for path, key in (("flex", "flex_ms"), ("kernel", "kernel_ms")):
            if rec.get(key) is None:
                continue
            rep = report_of(rec, path)
            est = estimate(rep, rec["heads"], rec["head_dim"], rec["batch"], rec["dtype"], family, path, cal)
            rows.append({
                "name": rec["name"],
                "path": path,
                "measured_ms": rec[key],
                "predicted_ms": est.gna_ms,
                "error_pct": 100.0 * (est.gna_ms - rec[key]) / rec[key],
                "measured_speedup": rec["dense_ms"] / rec[key],
                "predicted_speedup": est.speedup,
                "dense_measured_ms": rec["dense_ms"],
                "dense_predicted_ms": est.dense_ms,
                "flop_speedup": rep.flop_speedup,
                "tile_speedup": rep.tile_speedup,
                "perfectly_block_sparse": rep.perfectly_block_sparse,
            })
    return rows


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    head = (f"{'config':<24}{'path':<7}{'measured':>10}{'predicted':>11}{'error':>8}"
            f"{'speedup':>9}{'pred.':>7}{'FLOP':>7}{'tile':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:<24}{r['path']:<7}{r['measured_ms']:>8.3f}ms{r['predicted_ms']:>9.3f}ms"
              f"{r['error_pct']:>+7.1f}%{r['measured_speedup']:>8.2f}x{r['predicted_speedup']:>6.2f}x"
              f"{r['flop_speedup']:>7.2f}{r['tile_speedup']:>7.2f}")
    if rows:
        errs = np.abs([r["error_pct"] for r in rows])
        print(f"max |error| {errs.max():.1f}%, median {np.median(errs):.1f}%, "
              f"within 15%: {int((errs <= 15).sum())}/{len(errs)}")


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


class ResultsError(ValueError):
    """A set of result files that cannot be refitted (unreadable, synthetic, mixed families or head dims)."""


def refit_from_results(files: list[Path], family: Optional[str] = None) -> tuple[str, dict, list[dict]]:
    """``(family, constants, comparison rows)`` refitted from saved result files (no GPU).

    The base constants come from the ``calibrate_sim.py`` result files among
    ``files`` (records at each file's reference head dim; none: the packaged
    constants), the head-dim efficiency from every record of every file
    (:func:`fit_head_dim_efficiency`). The rows are ``compare_sim.compare`` of
    all records under the refitted constants.
    """
    cmp = _compare_module()
    base_records: list[dict] = []
    base_meta: list[tuple[str, dict]] = []
    all_records: list[dict] = []
    families = set()
    for path in files:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ResultsError(f"cannot read {path}: {exc}") from exc
        name = _relative(Path(path))
        if isinstance(data, dict) and data.get("kind") == "gna_sim_calibration":
            if data.get("dry_run"):
                raise ResultsError(f"{name} holds synthetic (dry-run) timings; not fitted")
            # The rates are fitted at the run's reference head dim; its other head dims feed the efficiency fit.
            ref = int(data.get("reference_head_dim") or data["records"][0]["head_dim"])
            base_records += [r for r in data["records"] if int(r["head_dim"]) == ref]
            base_meta.append((name, data))
        recs = cmp.records_of(data)
        for rec in recs:
            rec["file"] = name
        all_records += recs
        families.add(cmp.family_of(data, family))
    if len(families) != 1:
        raise ResultsError(f"the files are of several device families {sorted(families)}; give --family")
    family = families.pop()
    before = load_calibration()["families"][family]
    if base_records:
        dims = {int(r["head_dim"]) for r in base_records}
        if len(dims) != 1:
            raise ResultsError(f"calibrate_sim.py files with different reference head dims {sorted(dims)}")
        reference = dims.pop()
        cards = sorted({d["card"] for _, d in base_meta})
        torches = sorted({d["torch"] for _, d in base_meta})
        dates = sorted({str(d.get("date", ""))[:10] for _, d in base_meta if d.get("date")})
        source = (f"benchmarks/calibrate_sim.py --from-results: non-negative least squares on relative error over "
                  f"{len(base_records)} configs ({', '.join(r['name'] for r in base_records)}) of "
                  f"{', '.join(n for n, _ in base_meta)}")
        constants = fit(base_records, family, " / ".join(cards), " / ".join(torches),
                        date=" / ".join(dates) or None, source=source)
    else:
        constants = copy.deepcopy(before)
        reference = int((before.get("head_dim_efficiency") or {}).get("reference", 128))
    dtype = str(constants.get("dtype", "bfloat16"))
    constants["head_dim_efficiency"] = fit_head_dim_efficiency(
        all_records, constants, reference, [_relative(Path(p)) for p in files], dtype)
    rows = cmp.compare(all_records, family, {"format": 1, "families": {family: constants}})
    return family, constants, rows


def from_results(files: list[Path], family: Optional[str], write: bool) -> int:
    """``--from-results``: refit, print the efficiencies, the comparison and the constants; ``write``: store them."""
    try:
        family, constants, rows = refit_from_results(files, family)
    except ResultsError as exc:
        print(f"calibrate_sim.py: {exc}", file=sys.stderr)
        return 2
    table = constants["head_dim_efficiency"]
    for part, dims in table["fitted_from"].items():
        for d, info in dims.items():
            print(f"head dim {d}, {part}: efficiency {table[part][d]:.4f} from {info['records']} records "
                  f"(in-sample max |error| {info['max_error_pct']:.1f}%)")
    print(f"\nprediction vs measurement, refitted constants ({family}; * = head dim without a measured efficiency)")
    _compare_module().print_rows(rows)
    print("\nfitted constants:\n" + json.dumps(constants, indent=2))
    if write:
        write_package_calibration(family, constants)
    return 0


def write_package_calibration(family: str, constants: dict) -> None:
    data = json.loads(PACKAGE_CALIBRATION.read_text())
    data["families"][family] = constants
    common.write_json(PACKAGE_CALIBRATION, data)
    print(f"updated {PACKAGE_CALIBRATION.relative_to(ROOT)} [{family}]")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    ap.add_argument("--no-kernel", action="store_true", help="skip the fused kernel even when it is built")
    ap.add_argument("--quick", action="store_true", help="only the first config of each kind (fewer compiles)")
    ap.add_argument("--write", action="store_true", help="store the fitted constants in the package")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: synthetic timings from the current constants")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="no GPU: run the measuring code on tiny CPU shapes (numbers mean nothing; nothing is fitted)")
    ap.add_argument("--family", choices=("sm90", "default"), default=None,
                    help="device family to fit (default: the one of the current GPU)")
    ap.add_argument("--out", type=Path, default=None, help="result file (default benchmarks/results/...)")
    ap.add_argument("--head-dims", type=str, default="",
                    help="further head dims to measure (comma separated) for the head-dim efficiency fit")
    ap.add_argument("--from-results", type=Path, nargs="+", default=None, metavar="FILE",
                    help="no GPU: refit from saved result files (calibrate_sim.py, bench_kernel.py, ...)")
    args = ap.parse_args(argv)
    if args.from_results:
        return from_results(args.from_results, args.family, args.write)

    dtype = getattr(torch, args.dtype)
    if args.cpu_smoke:
        records = measure(SMOKE_CONFIGS, 2, 16, 1, torch.float32, False, device="cpu")
        print(json.dumps(records, indent=2))
        return 0
    configs = CONFIGS
    if args.quick:
        keep = {"3d paper 16x8x8", "2d paper 16x16", "1d paper 2048/256", "3d stride 1", "2d stride 1",
                "1d stride 1", "1d small 4096/512"}
        configs = [c for c in CONFIGS if c[0] in keep]
    if args.dry_run:
        family = args.family or "sm90"
        card, capability = "synthetic (dry run)", None
        records = synthetic(configs, args.heads, args.head_dim, args.batch, dtype, family, not args.no_kernel)
    else:
        if not torch.cuda.is_available():
            print("calibrate_sim.py: no CUDA device (use --dry-run to check the pipeline)", file=sys.stderr)
            return 2
        family = args.family or device_family(torch.device("cuda"))
        card = common.card_name()
        capability = list(torch.cuda.get_device_capability())
        records = measure(configs, args.heads, args.head_dim, args.batch, dtype, not args.no_kernel)
    other_dims = [int(d) for d in args.head_dims.split(",") if d.strip() and int(d) != args.head_dim]
    extra_records = []
    for d in other_dims:
        if args.dry_run:
            extra_records += synthetic(configs, args.heads, d, args.batch, dtype, family, not args.no_kernel)
        else:
            extra_records += measure(configs, args.heads, d, args.batch, dtype, not args.no_kernel)

    before = load_calibration()["families"][family]
    fitted = fit(records, family, card, torch.__version__)
    if extra_records:
        fitted["head_dim_efficiency"] = fit_head_dim_efficiency(
            normalised(records + extra_records), fitted, args.head_dim, ["this run"], args.dtype)
    records = records + extra_records
    rows_before = predictions(records, family, before)
    rows_after = predictions(records, family, fitted)
    print_table(rows_before, f"prediction vs measurement, constants before ({before.get('status')}, "
                             f"{before.get('card')})")
    print_table(rows_after, f"prediction vs measurement, fitted constants ({card})")
    print("\nfitted constants:\n" + json.dumps(fitted, indent=2))

    env = common.environment()  # versions, commit (see common.git_commit), time
    stamp = env["utc"].replace("-", "").replace(":", "")  # 20260101T120000Z
    out = args.out or common.RESULTS / f"calibrate_sim_{family}_{stamp}{'_dry' if args.dry_run else ''}.json"
    result = {
        "kind": "gna_sim_calibration",
        **env,
        "card": card,
        "capability": capability,
        "date": env["utc"],
        "family": family,
        "dry_run": args.dry_run,
        "reference_head_dim": args.head_dim,
        "baseline": "dense cuDNN SDPA (SDPBackend.CUDNN_ATTENTION), same process; per record: dense_backend",
        "timing": "triton.testing.do_bench median",
        "records": records,
        "constants_before": before,
        "constants": fitted,
        "predictions_before": rows_before,
        "predictions": rows_after,
    }
    common.write_json(out, result)
    print(f"\nwrote {out}")
    if args.write:
        if args.dry_run:
            print("--write ignored with --dry-run (synthetic timings)", file=sys.stderr)
        else:
            write_package_calibration(family, fitted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
