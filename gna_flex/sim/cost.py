"""Cost model: predicted GNA and dense attention times from a :class:`SimReport`.

For one call of batch ``B``, ``H`` heads and head dim ``D``::

    t_gna   = launch + full_work / full_rate + partial_work / partial_rate[rank]
              + permute_bytes / permute_bandwidth                  (paths that permute)
    t_dense = launch_dense + 4 * N * (N + E) * D * H * B / dense_rate

where ``full_work = visited_full * 4 * q_tile_volume * kv_tile_volume * D * H * B``
(and likewise for partial pairs): every visited tile pair costs a whole tile
of work, a partial one more because of masking. The flex path counts a full
pair whose Q tile holds padding rows as partial (its block mask does). The flex path reads queries,
keys, values and writes the output in the caller's layout and permutes each to
tile-major order and back: ``8 * N * H * D * B * element_size`` bytes (plus
the extra keys and values). Float32 divides every compute rate by the
family's ``float32_slowdown``.

Head-dim efficiency: the rates are fitted at one head dim (the family's
``head_dim_efficiency.reference``, 128 on sm90), and work grows linearly with
``D``, but kernels run at a lower rate for small head dims (on an H200, cuDNN
SDPA does about 466 TFLOP/s at ``D = 64`` against 610 at 128). Each compute
rate of a part (``"dense"``, ``"kernel"``, ``"flex"``) is multiplied by that
part's efficiency at ``D`` (:func:`head_dim_efficiency`); launch time and
permutation bandwidth are not. The efficiency table holds only measured head
dims (the reference, 1.0 by definition, and those fitted by
``benchmarks/calibrate_sim.py``); other head dims are interpolated linearly in
``log2(D)`` between the nearest measured ones and clamped to the nearest
measured value outside their range, and :class:`Estimate` marks them as not
measured (``efficiency["gna_measured"]`` / ``["dense_measured"]``).

The constants live in ``calibration.json`` per device family (``"sm90"``
and ``"default"``), each with the card and date it came from and a
``status`` that stays ``"uncalibrated"`` until ``benchmarks/calibrate_sim.py``
has fitted it on a GPU.

How a path tiles and visits (:func:`path_simulate_kwargs`): the fused kernel
visits boxes (``"box"``) of tiles inside one dilation group; the flex path
follows its block mask (``"exact"``) over tiles of the undilated grid. Without
dilation, any multi-tiled report serves both paths (the rules coincide);
otherwise :func:`estimate` refuses a report simulated the other way.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .report import SimReport

__all__ = [
    "Estimate",
    "estimate",
    "cost_features",
    "load_calibration",
    "device_family",
    "PATHS",
    "DEVICES",
    "PATH_VISIT",
    "PATH_FOLDS_DILATION",
    "path_simulate_kwargs",
    "report_fits_path",
    "head_dim_efficiency",
    "path_time_ms",
    "dense_time_ms",
    "family_constants",
]

PATHS = ("kernel", "flex")
DEVICES = ("sm90", "default")
PATH_VISIT = {"kernel": "box", "flex": "exact"}
#: Whether a path's tiles lie inside one dilation group (see ``simulate(fold_dilation=...)``).
PATH_FOLDS_DILATION = {"kernel": True, "flex": False}
_PERMUTING_PATHS = ("flex",)
_PADDED_Q_IS_PARTIAL = ("flex",)

_DTYPES = {
    "bfloat16": (torch.bfloat16, 2),
    "bf16": (torch.bfloat16, 2),
    "float16": (torch.float16, 2),
    "fp16": (torch.float16, 2),
    "half": (torch.float16, 2),
    "float32": (torch.float32, 4),
    "fp32": (torch.float32, 4),
    "float": (torch.float32, 4),
}


@dataclass(frozen=True)
class Estimate:
    """Predicted times (milliseconds) of one attention call, GNA and dense, and their ratio."""

    path: str
    device: str
    dtype: str
    gna_ms: float
    dense_ms: float
    speedup: float
    #: gna_ms split into launch, full-tile, partial-tile and permutation time.
    breakdown: dict[str, float]
    #: "calibrated" or "uncalibrated" (seed constants), and where they came from.
    status: str
    card: str
    #: Head-dim efficiency applied to the compute rates: ``{"head_dim", "gna", "dense",
    #: "gna_measured", "dense_measured"}`` (``*_measured`` is False for an interpolated
    #: or clamped head dim; see :func:`head_dim_efficiency`).
    efficiency: dict[str, Any] = field(default_factory=dict)

    def asdict(self) -> dict[str, Any]:
        return asdict(self)


def _calibration_text(path: Optional[Union[str, Path]]) -> str:
    if path is not None:
        return Path(path).read_text()
    return resources.files("gna_flex.sim").joinpath("calibration.json").read_text()


@lru_cache(maxsize=8)
def _load_cached(path: Optional[str]) -> str:
    return _calibration_text(path)


def load_calibration(path: Optional[Union[str, Path]] = None) -> dict[str, Any]:
    """The calibration constants (the packaged ``calibration.json`` unless ``path`` is given)."""
    data = json.loads(_load_cached(None if path is None else str(path)))
    if data.get("format") != 1 or "families" not in data:
        raise ValueError(f"calibration file {path or 'calibration.json'} is not format 1 with 'families'")
    return data


def device_family(device: Union[str, torch.device, None] = None) -> str:
    """``"sm90"`` for a Hopper CUDA device, ``"default"`` for anything else.

    Accepts a family name (returned as is), a CUDA device, or ``None`` for the
    current CUDA device when there is one.
    """
    if isinstance(device, str) and device in DEVICES:
        return device
    dev = torch.device(device) if device is not None else None
    if dev is None:
        if not torch.cuda.is_available():
            return "default"
        dev = torch.device("cuda")
    if dev.type != "cuda" or not torch.cuda.is_available():
        return "default"
    major, _ = torch.cuda.get_device_capability(dev)
    return "sm90" if major == 9 else "default"


def _dtype_info(dtype: Union[str, torch.dtype]) -> tuple[str, int]:
    if isinstance(dtype, torch.dtype):
        for name, (dt, size) in _DTYPES.items():
            if dt == dtype:
                return str(dt).removeprefix("torch."), size
    elif isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        dt, size = _DTYPES[dtype.removeprefix("torch.")]
        return str(dt).removeprefix("torch."), size
    raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def path_simulate_kwargs(path: str) -> dict[str, Any]:
    """The ``simulate`` arguments that describe how ``path`` tiles and visits (multi tiling)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    return {"tiling": "multi", "visit": PATH_VISIT[path], "fold_dilation": PATH_FOLDS_DILATION[path]}


def report_fits_path(report: SimReport, path: str) -> Optional[str]:
    """None when the report's counts are those ``path`` visits, else the reason (in words)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    dilated = any(d > 1 for d in report.dilation)
    if dilated and report.fold_dilation != PATH_FOLDS_DILATION[path]:
        return (f"path {path!r} uses fold_dilation={PATH_FOLDS_DILATION[path]}, but the report was simulated "
                f"with fold_dilation={report.fold_dilation} and dilation {report.dilation}")
    rules_differ = report.tiling == "single" or (dilated and not report.fold_dilation)
    if rules_differ and report.visit != PATH_VISIT[path]:
        return (f"path {path!r} visits tiles by the {PATH_VISIT[path]!r} rule, but the report was simulated "
                f"with tiling={report.tiling!r}, visit={report.visit!r}")
    return None


def _check_path(report: SimReport, path: str) -> None:
    reason = report_fits_path(report, path)
    if reason is not None:
        kwargs = ", ".join(f"{k}={v!r}" for k, v in path_simulate_kwargs(path).items())
        raise ValueError(f"{reason}; simulate with {kwargs}")


def cost_features(
    report: SimReport,
    heads: int,
    head_dim: int,
    batch: int = 1,
    dtype: Union[str, torch.dtype] = torch.bfloat16,
    path: str = "kernel",
    float32_slowdown: float = 1.0,
) -> dict[str, float]:
    """The model's inputs for one call: time = sum of each feature over its rate (see module doc).

    Keys: ``"full_tflop"``, ``"partial_tflop"`` (TFLOP of tile work, scaled by
    ``float32_slowdown`` for float32), ``"permute_gb"`` (GB moved; 0 for paths
    that do not permute), ``"dense_tflop"`` and ``"rank"``.
    """
    _check_path(report, path)
    for name, v in (("heads", heads), ("head_dim", head_dim), ("batch", batch)):
        _check_positive(name, v)
    dtype_name, size = _dtype_info(dtype)
    slow = float32_slowdown if size == 4 else 1.0
    per_pair = 4.0 * report.q_tile_volume * report.kv_tile_volume * head_dim * heads * batch * 1e-12 * slow
    n, e = report.num_tokens, report.extra_tokens
    # FlexAttention's block mask counts a Q block with padding rows as partial.
    full = report.visited_full_complete_q if path in _PADDED_Q_IS_PARTIAL else report.visited_full
    permute = 0.0
    if path in _PERMUTING_PATHS:
        permute = (8 * n + 4 * e) * heads * head_dim * batch * size * 1e-9
    return {
        "full_tflop": full * per_pair,
        "partial_tflop": (report.visited - full) * per_pair,
        "permute_gb": permute,
        "dense_tflop": 4.0 * n * (n + e) * head_dim * heads * batch * 1e-12 * slow,
        "rank": float(len(report.grid)),
    }


def head_dim_efficiency(consts: dict[str, Any], part: str, head_dim: int) -> tuple[float, bool]:
    """``(factor, measured)``: the compute-rate multiplier of ``part`` at ``head_dim``.

    ``part`` is ``"dense"``, ``"kernel"`` or ``"flex"``; ``consts`` one family's
    constants. The factor comes from ``consts["head_dim_efficiency"][part]``
    (head dim as a string -> factor; 1.0 at the reference head dim). A head dim
    in the table is measured; one between two measured head dims is
    interpolated linearly in ``log2(head_dim)``, one outside their range takes
    the nearest measured value (no extrapolated trend), both not measured. A
    family or part without a table gives ``(1.0, False)``: time linear in
    ``head_dim``, an assumption rather than a measurement.
    """
    _check_positive("head_dim", head_dim)
    table = (consts.get("head_dim_efficiency") or {}).get(part) or {}
    points = sorted((int(k), float(v)) for k, v in table.items())
    bad = [(d, e) for d, e in points if not e > 0]
    if bad:
        raise ValueError(f"head_dim_efficiency[{part!r}] factors must be > 0, got {dict(bad)}")
    if not points:
        return 1.0, False
    for d, e in points:
        if d == head_dim:
            return e, True
    if head_dim < points[0][0]:
        return points[0][1], False
    if head_dim > points[-1][0]:
        return points[-1][1], False
    for (d0, e0), (d1, e1) in zip(points, points[1:]):
        if d0 < head_dim < d1:
            w = (math.log2(head_dim) - math.log2(d0)) / (math.log2(d1) - math.log2(d0))
            return e0 + w * (e1 - e0), False
    raise AssertionError("unreachable: head_dim lies in the table's range")


def path_time_ms(consts: dict[str, Any], path: str, rank: int, full_tflop, partial_tflop, permute_gb,
                 head_dim: Optional[int] = None) -> dict[str, Any]:
    """The model's terms (ms) for one path of one family's constants; works on floats or numpy arrays.

    With ``head_dim`` the compute rates are scaled by the path's head-dim
    efficiency (:func:`head_dim_efficiency`); without it they are the rates at
    the reference head dim.
    """
    pc = consts[path]
    eff = 1.0 if head_dim is None else head_dim_efficiency(consts, path, head_dim)[0]
    partial_rate = pc["partial_tflops"]
    if isinstance(partial_rate, dict):
        partial_rate = partial_rate[str(rank)]
    bandwidth = pc.get("permute_gbps")
    return {
        "launch_ms": pc["launch_us"] * 1e-3,
        "full_ms": full_tflop / (pc["full_tflops"] * eff) * 1e3,
        "partial_ms": partial_tflop / (partial_rate * eff) * 1e3,
        "permute_ms": permute_gb / bandwidth * 1e3 if bandwidth else 0.0 * permute_gb,
    }


def dense_time_ms(consts: dict[str, Any], dense_tflop, head_dim: Optional[int] = None):
    """Predicted dense attention time (ms) for ``dense_tflop`` of work (rate scaled as in :func:`path_time_ms`)."""
    eff = 1.0 if head_dim is None else head_dim_efficiency(consts, "dense", head_dim)[0]
    return consts["dense"]["launch_us"] * 1e-3 + dense_tflop / (consts["dense"]["tflops"] * eff) * 1e3


def family_constants(device: Union[str, torch.device, None], calibration: Optional[dict[str, Any]] = None
                     ) -> tuple[str, dict[str, Any]]:
    """``(family, constants)`` for a device (see :func:`device_family`)."""
    family = device_family(device)
    cal = calibration if calibration is not None else load_calibration()
    if family not in cal["families"]:
        raise ValueError(f"device family {family!r} has no constants; known: {sorted(cal['families'])}")
    return family, cal["families"][family]


def estimate(
    report: SimReport,
    heads: int,
    head_dim: int,
    batch: int = 1,
    dtype: Union[str, torch.dtype] = torch.bfloat16,
    device: Union[str, torch.device, None] = "sm90",
    path: str = "kernel",
    calibration: Optional[dict[str, Any]] = None,
) -> Estimate:
    """Predict the time of one GNA call and of dense attention on the same problem.

    Args:
        report: from :func:`gna_flex.sim.simulate`.
        heads, head_dim, batch: the attention problem (grid size comes from the report).
        dtype: bfloat16, float16 or float32 (a torch dtype or its name).
        device: ``"sm90"``, ``"default"``, or a CUDA device (mapped by
            :func:`device_family`).
        path: ``"kernel"`` (fused kernel, no permutation) or ``"flex"``
            (FlexAttention on a tile-major permutation).
        calibration: constants to use instead of the packaged ones
            (the structure of ``calibration.json``).

    Returns:
        An :class:`Estimate` with ``gna_ms``, ``dense_ms`` and ``speedup = dense_ms / gna_ms``;
        its ``efficiency`` says which head-dim efficiency was applied and whether
        it was measured at this head dim.
    """
    family, consts = family_constants(device, calibration)
    slow = float(consts.get("float32_slowdown", 1.0))
    feats = cost_features(report, heads, head_dim, batch, dtype, path, slow)
    breakdown = path_time_ms(consts, path, len(report.grid), feats["full_tflop"], feats["partial_tflop"],
                             feats["permute_gb"], head_dim)
    gna_ms = math.fsum(breakdown.values())
    dense_ms = dense_time_ms(consts, feats["dense_tflop"], head_dim)
    gna_eff, gna_measured = head_dim_efficiency(consts, path, head_dim)
    dense_eff, dense_measured = head_dim_efficiency(consts, "dense", head_dim)
    return Estimate(
        path=path,
        device=family,
        dtype=_dtype_info(dtype)[0],
        gna_ms=gna_ms,
        dense_ms=dense_ms,
        speedup=dense_ms / gna_ms,
        breakdown=breakdown,
        status=consts.get("status", "uncalibrated"),
        card=consts.get("card", "unknown"),
        efficiency={"head_dim": head_dim, "gna": gna_eff, "dense": dense_eff, "gna_measured": gna_measured,
                    "dense_measured": dense_measured},
    )
