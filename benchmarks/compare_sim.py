"""Prediction of gna_flex.sim.estimate vs measurement, from benchmark result files.

    python benchmarks/compare_sim.py benchmarks/results/*.json
    python benchmarks/compare_sim.py RESULT.json --calibration benchmarks/results/calibrate_sim_sm90_....json

Reads result JSONs written by ``benchmarks/calibrate_sim.py``,
``bench_flex.py`` (every variant; its ``whole_ms`` is the flex path, its
``kernel_ms`` the flex kernel without the permutation, shown as path
``flex-nopermute``) and ``bench_kernel.py`` (every head dim's run; its
``kernel_ms`` is the fused kernel). Any other file is either a list of records or
an object holding one under ``records`` / ``results`` / ``rows`` /
``measurements`` / ``configs`` / ``runs``; a record (or its ``config`` sub-object)
names the problem and the measured times:

* ``grid``, ``kernel_size`` (or ``window``), ``stride``, ``dilation``,
  ``is_causal`` (or ``causal``), ``tile`` (or ``q_tile`` / ``kv_tile``; default
  the sm90 kernel's), ``extra_tokens``, ``heads``, ``head_dim``, ``batch``,
  ``dtype`` (each may also sit at the file's top level);
* times in milliseconds: ``flex_ms`` for the flex path, ``kernel_ms`` (or
  ``cutlass_ms``) for the fused kernel, ``dense_ms`` (or ``cudnn_ms`` /
  ``sdpa_ms``) for the dense baseline.

For every path time found it prints measured and predicted time, the error
in percent, and measured vs predicted speedup over dense; every distinct dense
time (per problem and head dim, once per file) gets a row of path ``dense``,
the dense model's prediction. The model scales each compute rate by its
head-dim efficiency (``gna_flex.sim.cost.head_dim_efficiency``); the ``hd``
column marks with ``*`` a row whose head dim has no measured efficiency for
that part (interpolated or clamped). The device family comes from
``--family``, the file's ``family``, or its ``card`` name.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

from gna_flex.sim import estimate, simulate
from gna_flex.sim.cost import path_simulate_kwargs

_LIST_KEYS = ("records", "results", "rows", "measurements", "configs", "runs")
_PATH_KEYS = {
    "flex": ("flex_ms", "gna_flex_ms"),
    "kernel": ("kernel_ms", "cutlass_ms", "gna_kernel_ms"),
}
_DENSE_KEYS = ("dense_ms", "cudnn_ms", "sdpa_ms", "sdpa_cudnn_ms")
_FIELDS = {
    "grid": ("grid", "shape"),
    "kernel_size": ("kernel_size", "window", "kernel"),
    "stride": ("stride",),
    "dilation": ("dilation",),
    "is_causal": ("is_causal", "causal"),
    "q_tile": ("q_tile", "tile"),
    "kv_tile": ("kv_tile", "tile"),
    "extra_tokens": ("extra_tokens", "extra"),
    "heads": ("heads", "num_heads"),
    "head_dim": ("head_dim", "dim"),
    "batch": ("batch", "batch_size"),
    "dtype": ("dtype",),
    "name": ("name", "label", "config_name"),
}
_DEFAULTS = {"stride": 1, "dilation": 1, "is_causal": False, "extra_tokens": 0, "heads": 24, "head_dim": 128,
             "batch": 1, "dtype": "bfloat16"}


def _first(sources: list[dict], names: tuple[str, ...]) -> Any:
    for src in sources:
        for n in names:
            if isinstance(src, dict) and src.get(n) is not None:
                return src[n]
    return None


def _as_tuple(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(v)
    if isinstance(v, str) and "x" in v:
        return tuple(int(p) for p in v.split("x"))
    return v


def family_of(data: dict, override: Optional[str]) -> str:
    if override:
        return override
    if isinstance(data, dict):
        if data.get("family") in ("sm90", "default"):
            return data["family"]
        env = data.get("env", {}) if isinstance(data.get("env"), dict) else {}
        runs = list(data["runs"].values()) if isinstance(data.get("runs"), dict) else []
        for src in [data, env] + runs:
            card = str(src.get("card", "")) + str(src.get("device", ""))
            cap = src.get("capability")
            major = cap[0] if isinstance(cap, list) and cap else (str(cap).split(".")[0] if cap else None)
            if str(major) == "9" or any(t in card for t in ("H100", "H200", "H800", "H20", "GH200")):
                return "sm90"
    return "default"


def _sub_tile(tile: tuple[int, ...], block: int) -> Optional[tuple[int, ...]]:
    """The box of ``block`` consecutive tile-major positions of ``tile`` (None when it is not a box)."""
    vol = math.prod(tile)
    if block == vol:
        return tuple(tile)
    if block > vol or vol % block:
        return None
    for a in range(len(tile)):
        inner = math.prod(tile[a + 1:])
        if block % inner == 0 and tile[a] % (block // inner) == 0:
            return (1,) * a + (block // inner,) + tuple(tile[a + 1:])
    return None


def _bench_flex_records(data: dict) -> list[dict]:
    """bench_flex.py: one record per (config, tile, block, kernel options) variant.

    Its ``whole_ms`` is the flex path (permutation included), its ``kernel_ms``
    the flex kernel alone on tile-major inputs (path ``flex-nopermute`` here).
    """
    setup = data.get("setup", {})
    out = []
    for entry in data.get("configs", []):
        for var in entry.get("variants", []):
            if "whole_ms" not in var and "kernel_ms" not in var:
                continue
            tile = tuple(var["tile"])
            q_tile, kv_tile = _sub_tile(tile, var["block"][0]), _sub_tile(tile, var["block"][1])
            if q_tile is None or kv_tile is None:
                print(f"compare_sim.py: {entry['name']} tile {tile} block {var['block']}: a block is not a box "
                      "of the tile-major order; skipped", file=sys.stderr)
                continue
            rec = {
                "name": f"{entry['name']} {'x'.join(map(str, tile))}/{var['block'][1]}/{var.get('options', '')}",
                "grid": tuple(entry["grid"]), "kernel_size": tuple(entry["kernel_size"]),
                "stride": tuple(entry["stride"]), "dilation": 1, "is_causal": False,
                "q_tile": q_tile, "kv_tile": kv_tile, "extra_tokens": 0,
                "heads": setup.get("heads", 24), "head_dim": setup.get("head_dim", 128),
                "batch": setup.get("batch", 1), "dtype": setup.get("dtype", "bfloat16"),
                "dense_ms": entry.get("dense", {}).get("ms"),
                "times": {"flex": var.get("whole_ms"), "flex-nopermute": var.get("kernel_ms")},
            }
            out.append(rec)
    return out


def records_of(data: Any) -> list[dict]:
    """Normalised records (problem, measured times) from one result file's JSON."""
    if isinstance(data, dict) and data.get("benchmark") == "bench_flex":
        return _bench_flex_records(data)
    if isinstance(data, dict) and isinstance(data.get("runs"), dict):  # bench_kernel.py: runs per head dim
        return [rec for run in data["runs"].values() for rec in records_of(run)]
    top = data if isinstance(data, dict) else {}
    items = data if isinstance(data, list) else None
    if items is None:
        for key in _LIST_KEYS:
            if isinstance(top.get(key), list):
                items = top[key]
                break
        else:
            items = [top]
    out = []
    for item in items:
        if not isinstance(item, dict):
            continue
        sources = [item, item.get("config", {}), top]
        rec = {k: _first(sources, names) for k, names in _FIELDS.items()}
        if rec["grid"] is None or rec["kernel_size"] is None:
            continue
        for k, v in _DEFAULTS.items():
            if rec[k] is None:
                rec[k] = v
        for k in ("grid", "kernel_size", "stride", "dilation", "is_causal", "q_tile", "kv_tile"):
            rec[k] = _as_tuple(rec[k])
        rec["dense_ms"] = _first([item], _DENSE_KEYS)
        rec["times"] = {p: _first([item], keys) for p, keys in _PATH_KEYS.items()}
        if not any(v is not None for v in rec["times"].values()):
            continue
        if rec["name"] is None:
            rec["name"] = "/".join("x".join(map(str, v)) if isinstance(v, tuple) else str(v)
                                   for v in (rec["grid"], rec["kernel_size"], rec["stride"]))
        out.append(rec)
    return out


def compare(records: list[dict], family: str, calibration: Optional[dict]) -> list[dict]:
    """Prediction vs measurement: one row per path time of each record, one per distinct dense time."""
    rows = []
    seen_dense: set = set()
    for rec in records:
        est = None
        for path, measured in rec["times"].items():
            if measured is None:
                continue
            model_path = "flex" if path == "flex-nopermute" else path
            rep = simulate(rec["grid"], rec["kernel_size"], rec["stride"], rec["dilation"], rec["is_causal"],
                           q_tile=rec["q_tile"], kv_tile=rec["kv_tile"] or rec["q_tile"],
                           extra_tokens=int(rec["extra_tokens"]), **path_simulate_kwargs(model_path))
            est = estimate(rep, int(rec["heads"]), int(rec["head_dim"]), int(rec["batch"]), rec["dtype"], family,
                           model_path, calibration)
            predicted = est.gna_ms - (est.breakdown["permute_ms"] if path == "flex-nopermute" else 0.0)
            rows.append({
                "name": rec["name"],
                "path": path,
                "head_dim": int(rec["head_dim"]),
                "measured_ms": float(measured),
                "predicted_ms": predicted,
                "error_pct": 100.0 * (predicted - measured) / measured,
                "measured_speedup": rec["dense_ms"] / measured if rec["dense_ms"] else None,
                "predicted_speedup": est.dense_ms / predicted,
                "flop_speedup": rep.flop_speedup,
                "tile_speedup": rep.tile_speedup,
                "status": est.status,
                "head_dim_measured": est.efficiency["gna_measured"],
            })
        # The same dense measurement is often repeated for every config of one problem size.
        key = (tuple(rec["grid"]), int(rec["extra_tokens"]), int(rec["heads"]), int(rec["head_dim"]),
               int(rec["batch"]), str(rec["dtype"]), rec["dense_ms"])
        if est is not None and rec["dense_ms"] and key not in seen_dense:
            seen_dense.add(key)
            dense = float(rec["dense_ms"])
            rows.append({
                "name": rec["name"],
                "path": "dense",
                "head_dim": int(rec["head_dim"]),
                "measured_ms": dense,
                "predicted_ms": est.dense_ms,
                "error_pct": 100.0 * (est.dense_ms - dense) / dense,
                "measured_speedup": None,
                "predicted_speedup": None,
                "flop_speedup": None,
                "tile_speedup": None,
                "status": est.status,
                "head_dim_measured": est.efficiency["dense_measured"],
            })
    return rows


def summary(rows: list[dict], goal_pct: float = 15.0) -> str:
    """``max |error| .., median .., within 15%: n/m`` over ``rows``."""
    errs = np.abs([r["error_pct"] for r in rows])
    return (f"max |error| {errs.max():.1f}%, median {np.median(errs):.1f}%, "
            f"within {goal_pct:g}%: {int((errs <= goal_pct).sum())}/{len(errs)}")


def _cell(value: Optional[float], fmt: str, width: int, suffix: str = "") -> str:
    return f"{format(value, fmt)}{suffix}".rjust(width) if value is not None else "-".rjust(width)


def print_rows(rows: list[dict]) -> None:
    head = (f"{'config':<34}{'path':<15}{'hd':>5}{'measured':>11}{'predicted':>11}{'error':>8}"
            f"{'speedup':>9}{'pred.':>7}{'FLOP':>7}{'tile':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        hd = f"{r.get('head_dim', '?')}{'' if r.get('head_dim_measured', True) else '*'}"
        print(f"{r['name'][:33]:<34}{r['path']:<15}{hd:>5}{r['measured_ms']:>9.3f}ms{r['predicted_ms']:>9.3f}ms"
              f"{r['error_pct']:>+7.1f}%{_cell(r['measured_speedup'], '.2f', 9, 'x')}"
              f"{_cell(r['predicted_speedup'], '.2f', 7, 'x')}{_cell(r['flop_speedup'], '.2f', 7)}"
              f"{_cell(r['tile_speedup'], '.2f', 7)}")
    if rows:
        print(summary(rows))
        paths = sorted({r["path"] for r in rows})
        if len(paths) > 1:
            for p in paths:
                print(f"  {p:<15}" + summary([r for r in rows if r["path"] == p]))


def load_constants(path: Optional[Path]) -> Optional[dict]:
    """A calibration.json, or a calibrate_sim.py result (its fitted ``constants``)."""
    if path is None:
        return None
    data = json.loads(path.read_text())
    if data.get("kind") == "gna_sim_calibration":
        return {"format": 1, "families": {data["family"]: data["constants"]}}
    return data


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="prediction vs measurement for benchmark result files")
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--calibration", type=Path, default=None,
                    help="constants to use: a calibration.json or a calibrate_sim.py result")
    ap.add_argument("--family", choices=("sm90", "default"), default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    calibration = load_constants(args.calibration)
    all_rows = []
    for path in args.results:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"compare_sim.py: cannot read {path}: {exc}", file=sys.stderr)
            return 2
        records = records_of(data)
        family = family_of(data, args.family)
        if calibration is not None and family not in calibration["families"]:
            family = next(iter(calibration["families"]))
        rows = compare(records, family, calibration)
        for r in rows:
            r["file"] = str(path)
        all_rows += rows
        if not args.json:
            card = "?"
            if isinstance(data, dict):
                card = data.get("card") or data.get("env", {}).get("card") or next(
                    (r.get("card") for r in (data.get("runs") or {}).values()), "?")
            print(f"\n{path} (card {card}, family {family}, {len(records)} records)")
            print_rows(rows)
    if args.json:
        print(json.dumps(all_rows, indent=2))
    elif len(args.results) > 1 and all_rows:
        print(f"\nall files ({len(all_rows)} rows)")
        print(summary(all_rows))
        for p in sorted({r["path"] for r in all_rows}):
            print(f"  {p:<15}" + summary([r for r in all_rows if r["path"] == p]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
