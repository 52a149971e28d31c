"""``recommend``: nearby GNA configs ranked by predicted speedup.

The search varies what the caller leaves open: the stride (when ``stride`` is
None: per axis 1, the window size and every multiple of the Q tile below it,
the values that can make a config perfectly block-sparse), the tile shapes
(when ``q_tile``/``kv_tile`` are None: every power-of-two shape of
``tile_volume`` tokens, Q and KV alike) and the window size (per axis within
``kernel_size_tolerance``). Grid, dilation, causality and extra tokens stay.

Every candidate is scored with the per-axis totals of the path's tiling (the
products that :func:`simulate` itself forms, with
:func:`~gna_flex.sim.cost.path_simulate_kwargs`) and the cost model,
vectorised over the candidates; the best ones are then re-simulated in full so
each returned entry carries its :class:`SimReport` and :class:`Estimate`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from ..spec import make_params, normalize_axes
from .axes import axis_summary, native_axis_summary
from .cost import (
    _PADDED_Q_IS_PARTIAL,
    Estimate,
    _dtype_info,
    cost_features,
    dense_time_ms,
    estimate,
    family_constants,
    path_simulate_kwargs,
    path_time_ms,
)
from .report import DEFAULT_TILES, SimReport, simulate

__all__ = ["Recommendation", "recommend"]

# Beyond this many candidates per tile shape the caller should narrow the search.
_MAX_CANDIDATES = 2_000_000


@dataclass
class Recommendation:
    """One config of a :func:`recommend` ranking (``rank`` 1 = best; 0 = the caller's config, outside the top)."""

    rank: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    flop_speedup: float
    tile_speedup: float
    predicted_speedup: float
    perfectly_block_sparse: bool
    #: True for the caller's own config (shown for comparison).
    is_input: bool
    report: SimReport
    estimate: Estimate

    def asdict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in (
            "rank", "kernel_size", "stride", "q_tile", "kv_tile", "flop_speedup", "tile_speedup",
            "predicted_speedup", "perfectly_block_sparse", "is_input")}
        out["predicted_ms"] = self.estimate.gna_ms
        out["dense_ms"] = self.estimate.dense_ms
        out["explanation"] = self.report.explanation
        return out


def _pow2_shapes(volume: int, ndim: int, grid: Sequence[int]) -> list[tuple[int, ...]]:
    if volume < 1 or volume & (volume - 1):
        raise ValueError(f"tile_volume must be a power of two >= 1, got {volume}")
    bits = volume.bit_length() - 1
    shapes = []
    for exps in itertools.product(range(bits + 1), repeat=ndim):
        if sum(exps) != bits:
            continue
        shape = tuple(1 << e for e in exps)
        # A tile more than twice an axis is mostly padding on that axis.
        if all(t <= max(1, 2 * n) for t, n in zip(shape, grid)):
            shapes.append(shape)
    return shapes


def _stride_options(w: int, q_t: int) -> list[int]:
    return sorted({1, w} | set(range(q_t, w + 1, q_t)))


def recommend(
    grid: Union[int, Sequence[int]],
    kernel_size: Union[int, Sequence[int]],
    stride: Union[int, Sequence[int], None] = None,
    dilation: Union[int, Sequence[int]] = 1,
    is_causal: Union[bool, Sequence[bool]] = False,
    q_tile: Union[int, Sequence[int], None] = None,
    kv_tile: Union[int, Sequence[int], None] = None,
    extra_tokens: int = 0,
    kernel_size_tolerance: Union[int, Sequence[int]] = 0,
    heads: int = 24,
    head_dim: int = 128,
    batch: int = 1,
    dtype: Union[str, torch.dtype] = torch.bfloat16,
    device: Union[str, torch.device, None] = "sm90",
    path: str = "kernel",
    tile_volume: int = 128,
    top: int = 10,
    calibration: Optional[dict[str, Any]] = None,
) -> list[Recommendation]:
    """Rank nearby configs by predicted speedup over dense attention (multi tiling).

    Args:
        grid, kernel_size, dilation, is_causal, extra_tokens: the problem, as
            for :func:`simulate`.
        stride: fixed stride, or None to search strides per axis.
        q_tile, kv_tile: fixed tile shapes, or None to search power-of-two
            shapes of ``tile_volume`` tokens (one given fixes the other too
            unless both are given).
        kernel_size_tolerance: per axis (or one int), how far the window may
            move from ``kernel_size`` (0 keeps it).
        heads, head_dim, batch, dtype, device, path, calibration: for
            :func:`estimate`.
        top: how many configs to return.

    Returns:
        Up to ``top`` :class:`Recommendation` entries, best first, plus the
        caller's own config (``is_input=True``) when ``stride`` is given and it
        is not among them.
    """
    params = make_params(grid, kernel_size, 1 if stride is None else stride, dilation, is_causal)
    ndim = params.ndim
    tol = normalize_axes(kernel_size_tolerance, ndim, "kernel_size_tolerance")
    for a, t in enumerate(tol):
        if t < 0:
            raise ValueError(f"kernel_size_tolerance[{a}] (axis {a}) must be >= 0, got {t}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}")
    fixed_stride = None if stride is None else params.stride

    if q_tile is None and kv_tile is None:
        tile_pairs = [(s, s) for s in _pow2_shapes(tile_volume, ndim, params.grid)]
        if not tile_pairs:
            raise ValueError(f"no tile of tile_volume={tile_volume} tokens fits the grid {params.grid} "
                             "(at most twice an axis long); give q_tile or a smaller tile_volume")
    else:
        qt = normalize_axes(q_tile if q_tile is not None else kv_tile, ndim, "q_tile")
        kt = normalize_axes(kv_tile if kv_tile is not None else q_tile, ndim, "kv_tile")
        for name, shape in (("q_tile", qt), ("kv_tile", kt)):
            for a, t in enumerate(shape):
                if t < 1:
                    raise ValueError(f"{name}[{a}] (axis {a}) must be >= 1, got {t}")
        tile_pairs = [(qt, kt)]

    family, consts = family_constants(device, calibration)
    slow = float(consts.get("float32_slowdown", 1.0))
    # Features that do not depend on the candidate: dense time and permutation bytes.
    base = cost_features(simulate(params.grid, params.kernel_size, params.stride, params.dilation,
                                  params.is_causal, q_tile=tile_pairs[0][0], kv_tile=tile_pairs[0][1],
                                  extra_tokens=extra_tokens, **path_simulate_kwargs(path)),
                         heads, head_dim, batch, dtype, path, slow)
    dense_ms = dense_time_ms(consts, base["dense_tflop"], head_dim)
    unit = 4.0 * head_dim * heads * batch * 1e-12 * (slow if _dtype_info(dtype)[1] == 4 else 1.0)
    e = extra_tokens
    padded_q_partial = path in _PADDED_Q_IS_PARTIAL
    sim_kwargs = path_simulate_kwargs(path)

    def _summary(a: int):
        fold = sim_kwargs["fold_dilation"] or params.dilation[a] == 1
        return axis_summary if fold else native_axis_summary

    scored: list[tuple[float, int, tuple]] = []
    for qt, kt in tile_pairs:
        q_vol, kv_vol = math.prod(qt), math.prod(kt)
        choices = []
        for a in range(ndim):
            length, w0, _, d, _ = params.axis(a)
            windows = [w for w in range(w0 - tol[a], w0 + tol[a] + 1) if 2 <= w and w * d <= length]
            choices.append([(w, s) for w in windows
                            for s in (_stride_options(w, qt[a]) if fixed_stride is None else [fixed_stride[a]])
                            if 1 <= s <= w])
        count = math.prod(len(c) for c in choices)
        if count > _MAX_CANDIDATES:
            raise ValueError(
                f"kernel_size_tolerance {tol} gives {count} candidates per tile shape; "
                "give a stride, tiles or a smaller tolerance"
            )
        if count:
            axis_opts = [
                [(w, s, _summary(a)(params.grid[a], w, s, params.dilation[a], params.is_causal[a], qt[a], kt[a], a))
                 for w, s in c]
                for a, c in enumerate(choices)
            ]
            visited = np.ones(1, dtype=np.float64)
            full = np.ones(1, dtype=np.float64)
            # Tie-breaks: closest window first, then the smallest stride (closest to sliding window).
            distance = np.zeros(1, dtype=np.float64)
            stride_prod = np.ones(1, dtype=np.float64)
            for a, opts in enumerate(axis_opts):
                visited = np.multiply.outer(visited, np.array([o[2].visited if sim_kwargs["visit"] == "box"
                                                               else o[2].visited_exact for o in opts],
                                                              dtype=np.float64))
                full = np.multiply.outer(full, np.array([o[2].full_complete_q if padded_q_partial else o[2].full
                                                         for o in opts], dtype=np.float64))
                distance = np.add.outer(distance, np.array([abs(o[0] - params.kernel_size[a]) for o in opts],
                                                           dtype=np.float64))
                stride_prod = np.multiply.outer(stride_prod, np.array([o[1] for o in opts], dtype=np.float64))
            num_q = math.prod(axis_opts[a][0][2].num_q for a in range(ndim))
            num_q_full = math.prod(axis_opts[a][0][2].num_q_complete for a in range(ndim))
            n_extra = -(-e // kv_vol)
            visited = visited.reshape(-1) + num_q * n_extra
            full = full.reshape(-1) + (num_q_full if padded_q_partial else num_q) * (e // kv_vol)
            per_pair = unit * q_vol * kv_vol
            terms = path_time_ms(consts, path, ndim, full * per_pair, (visited - full) * per_pair,
                                 base["permute_gb"], head_dim)
            gna = sum(terms.values())
            speed = dense_ms / gna
            order = np.lexsort((stride_prod.reshape(-1), distance.reshape(-1), -np.round(speed, 9)))[: top * 4]
            shape = [len(o) for o in axis_opts]
            for flat in order:
                idx = np.unravel_index(int(flat), shape)
                choice = tuple(axis_opts[a][i][:2] for a, i in enumerate(idx))
                scored.append((float(speed[flat]), qt, kt, choice))

    def key(item):
        speed, qt, kt, choice = item
        distance = sum(abs(w - w0) for (w, _), w0 in zip(choice, params.kernel_size))
        return (-round(speed, 9), distance, math.prod(s for _, s in choice), qt)

    scored.sort(key=key)
    seen = set()
    results: list[Recommendation] = []

    def build(qt, kt, ks, st, is_input) -> Recommendation:
        rep = simulate(params.grid, ks, st, params.dilation, params.is_causal, q_tile=qt, kv_tile=kt,
                       extra_tokens=extra_tokens, **sim_kwargs)
        est = estimate(rep, heads, head_dim, batch, dtype, family, path, calibration)
        return Recommendation(0, rep.kernel_size, rep.stride, rep.q_tile, rep.kv_tile, rep.flop_speedup,
                              rep.tile_speedup, est.speedup, rep.perfectly_block_sparse, is_input, rep, est)

    input_key = None
    if fixed_stride is not None:
        in_q = tile_pairs[0][0] if len(tile_pairs) == 1 else DEFAULT_TILES[ndim]
        in_kv = tile_pairs[0][1] if len(tile_pairs) == 1 else DEFAULT_TILES[ndim]
        input_key = (in_q, in_kv, params.kernel_size, params.stride)
    for _, qt, kt, choice in scored:
        ks = tuple(w for w, _ in choice)
        st = tuple(s for _, s in choice)
        k = (qt, kt, ks, st)
        if k in seen:
            continue
        seen.add(k)
        results.append(build(qt, kt, ks, st, k == input_key))
        if len(results) == top:
            break
    if input_key is not None and input_key not in seen:
        results.append(build(*input_key, True))
    for i, r in enumerate(results, 1):
        # The caller's config appended after the ranking has no rank among the searched ones.
        r.rank = 0 if (r.is_input and i > top) else i
    return results
