"""``simulate``: what a tiled GNA kernel visits, counted analytically.

Terms. Grid tokens are both the queries and the keys; ``extra_tokens`` are
additional keys (text tokens, registers) that every grid query attends to. A
*Q tile* / *KV tile* is the block of queries / keys a kernel handles at once.
A (Q tile, KV tile) pair is *visited* when the kernel computes it, *full* when
it needs no masking: the KV tile is complete (no out-of-grid slots) and every
query of the Q tile has every key of the KV tile as a neighbour. Visited pairs
that are not full are *partial*. A config is *perfectly block-sparse* when no
visited pair is partial: the kernel then runs with no masking at all.

Tilings:

- ``"multi"``: tiles are boxes (``q_tile``/``kv_tile`` give the per-axis
  shape, e.g. ``(2, 8, 8)``), in tile-major order, as the fused kernel and the
  tile-major flex path use them.
- ``"single"``: tiles are runs of ``N`` consecutive tokens in raster order
  (``q_tile``/``kv_tile`` give ``N``; a shape is read as its volume).

With dilation, every dilation group is its own sub-grid and tiles never mix
groups (see ``axes.py``): the fused kernel reads a group's tile with a TMA
element stride. ``fold_dilation=False`` instead cuts the undilated grid into
tiles (multi tiling only), as the flex path's tile-major order does; tiles
then mix groups and the two visit rules differ.

Visit rules:

- ``"box"``: per Q tile, the KV tiles between the first and the last key any
  of its queries attends to, as a fused kernel iterates: per axis from the
  window start of the tile's first query to the window end of its last query,
  rounded out to whole KV tiles (multi tiling); from the lowest to the highest
  raster index (single tiling).
- ``"exact"``: only the KV tiles holding at least one neighbour, as an
  analytic block mask has.

Under multi tiling (with dilation folded) both rules give the same pairs: on
each axis the union of a Q tile's windows is one interval, and the relation is
a product over axes, so the box of KV tiles the windows touch holds a
neighbour in every tile. They differ under single tiling and for tiles of the
undilated grid.

Extra tokens are tiled on their own after the grid (``ceil(E / kv_volume)``
KV tiles, visited by every Q tile; the last one is partial when ``E`` is not a
multiple of the KV tile volume). Extra *queries* are not counted: the kernel
returns grid queries only; the extra tokens' own attention over everything is
a separate dense attention of the caller.

Speedups are against dense attention of the grid queries over all keys:
``flop_speedup = N * (N + E) / allowed pairs`` and ``tile_speedup = dense tile
pairs / visited``, where dense tile pairs is what a dense kernel with tiles of
the same volumes visits: ``ceil(N / q_volume) * ceil((N + E) / kv_volume)``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

from ..spec import GNAParams, count_pairs, make_params, normalize_axes
from .axes import AxisSummary, axis_groups, axis_summary, axis_tiles, native_axis_summary
from .raster import raster_counts

__all__ = ["SimReport", "simulate", "DEFAULT_TILES", "TILINGS", "VISITS"]

#: The sm90 kernel's tiles (Q and KV alike): 128 tokens shaped per grid rank.
DEFAULT_TILES: dict[int, tuple[int, ...]] = {1: (128,), 2: (16, 8), 3: (2, 8, 8)}
TILINGS = ("multi", "single")
VISITS = ("box", "exact")

TileArg = Union[int, Sequence[int], None]


@dataclass
class SimReport:
    """What a tiled kernel visits for one GNA config (see the module docstring for the terms).

    Convert with :meth:`asdict` / :meth:`to_json`.
    """

    grid: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    extra_tokens: int
    tiling: str
    visit: str
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    #: dense (query, key) pairs / allowed pairs, grid queries over grid + extra keys.
    flop_speedup: float
    #: visited (Q tile, KV tile) pairs, extra KV tiles included.
    visited: int
    visited_full: int
    visited_partial: int
    #: dense tile pairs / visited pairs.
    tile_speedup: float
    perfectly_block_sparse: bool
    #: fraction of tile slots holding no token: {"q": ..., "kv": ...}.
    padding_waste: dict[str, float]
    #: in words: why the config is or is not perfectly block-sparse, per axis.
    explanation: str
    num_tokens: int = 0
    dense_pairs: int = 0
    allowed_pairs: int = 0
    num_q_tiles: int = 0
    num_kv_tiles: int = 0
    num_extra_kv_tiles: int = 0
    dense_tile_pairs: int = 0
    #: tiles inside one dilation group (True) or ranges of the undilated grid (False).
    fold_dilation: bool = True
    #: full pairs whose Q tile has no out-of-grid rows. A fused kernel needs no
    #: masking for padded query rows, but a FlexAttention block mask marks a Q
    #: block holding padding as partial, so the flex cost model counts these.
    visited_full_complete_q: int = 0
    reasons: list[str] = field(default_factory=list)

    @property
    def q_tile_volume(self) -> int:
        return math.prod(self.q_tile)

    @property
    def kv_tile_volume(self) -> int:
        return math.prod(self.kv_tile)

    def params(self) -> GNAParams:
        return make_params(self.grid, self.kernel_size, self.stride, self.dilation, self.is_causal)

    def asdict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.asdict(), **kwargs)


def _tile_shape(value: TileArg, ndim: int, tiling: str, name: str) -> tuple[int, ...]:
    if value is None:
        shape = DEFAULT_TILES[ndim]
        return (math.prod(shape),) if tiling == "single" else shape
    if tiling == "single":
        if isinstance(value, (tuple, list)):
            if not value:
                raise ValueError(f"{name} must not be empty")
            vol = 1
            for axis, v in enumerate(value):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise TypeError(f"{name}[{axis}] must be an integer, got {v!r}")
                vol *= v
            value = vol
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer number of tokens for single tiling, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1 token, got {value}")
        return (int(value),)
    shape = normalize_axes(value, ndim, name)
    for axis, t in enumerate(shape):
        if t < 1:
            raise ValueError(f"{name}[{axis}] (axis {axis}) must be >= 1, got {t}")
    return shape


def _multi_counts(params: GNAParams, q_tile: tuple[int, ...], kv_tile: tuple[int, ...],
                  fold_dilation: bool = True) -> list[AxisSummary]:
    """Per-axis totals (over dilation groups) of Q tiles, KV tiles, visited and full pairs.

    A Q tile and a KV tile are boxes, so "holds a neighbour" and "all pairs are
    neighbours" hold iff they hold on every axis, and the totals are products
    of per-axis sums. Dilation groups of different axes combine freely, so the
    sum over group combinations is again a product of per-axis sums.
    """
    return [
        (axis_summary if fold_dilation or params.dilation[a] == 1 else native_axis_summary)(
            *params.axis(a), q_tile[a], kv_tile[a], a)
        for a in range(params.ndim)
    ]


def _axis_tables(params: GNAParams, a: int, q_t: int, kv_t: int):
    return [(g.length, axis_tiles(g, q_t, kv_t), g) for g in axis_groups(params, a)]


def _axis_reasons(params: GNAParams, a: int, tables, q_t: int, kv_t: int) -> list[str]:
    """Why some visited pairs are partial on axis ``a`` of a multi-tiled config (in words)."""
    length, w, s, d, causal = params.axis(a)
    name = f"axis {a}"
    reasons = []
    padded = sorted({g for g, _, _ in tables if g % kv_t})
    if padded:
        glen = f"length {length}" if d == 1 else f"dilation-group length {'/'.join(map(str, padded))}"
        reasons.append(
            f"{name}: {glen} is not a multiple of the KV tile {kv_t}, so the last KV tile holds "
            "out-of-grid slots that must be masked"
        )
    shared = True
    aligned = True
    example = ""
    for glen, t, group in tables:
        first = [r * q_t for r in range(t.num_q)]
        for r, f in enumerate(first):
            last = min(f + q_t, glen) - 1
            s0, s1, e0, e1 = (int(group.start[f]), int(group.start[last]),
                              int(group.end[f]), int(group.end[last]))
            if (s0, e0) != (s1, e1):
                if shared:
                    example = (f"Q tile {r} (queries {f}..{last}) has windows starting at {s0}..{s1} "
                               f"and ending at {e0}..{e1}")
                shared = False
            elif s0 % kv_t or (e0 % kv_t and e0 != glen):
                if aligned and shared:
                    example = f"Q tile {r} (queries {f}..{last}) shares the window [{s0}, {e0})"
                aligned = False
    if not shared:
        if causal:
            why = "causal: each query's window ends at the query itself, so the diagonal KV tiles are partial"
        elif s % q_t and q_t > 1:
            why = f"stride {s} is not a multiple of the Q tile {q_t}"
        else:
            why = f"Q tiles of {q_t} straddle stride groups whose windows differ (border shift or stride {s})"
        reasons.append(f"{name}: the queries of a Q tile do not share one window ({why}; e.g. {example})")
    elif not aligned:
        why = (f"window {w} is not a multiple of the KV tile {kv_t}" if w % kv_t
               else f"window starts are not multiples of the KV tile {kv_t} (stride {s}, border shift)")
        reasons.append(f"{name}: windows do not start and end on KV tile boundaries ({why}; e.g. {example})")
    return reasons


def simulate(
    grid: Union[int, Sequence[int]],
    kernel_size: Union[int, Sequence[int]],
    stride: Union[int, Sequence[int]] = 1,
    dilation: Union[int, Sequence[int]] = 1,
    is_causal: Union[bool, Sequence[bool]] = False,
    q_tile: TileArg = None,
    kv_tile: TileArg = None,
    extra_tokens: int = 0,
    tiling: str = "multi",
    visit: str = "box",
    fold_dilation: bool = True,
) -> SimReport:
    """Count the (Q tile, KV tile) pairs a tiled kernel visits for a GNA config.

    Args:
        grid, kernel_size, stride, dilation, is_causal: the GNA parameters, as
            for :func:`gna_flex.spec.make_params` (validated there).
        q_tile, kv_tile: tile shape per axis for ``tiling="multi"`` (default the
            sm90 kernel's: ``128``, ``16x8``, ``2x8x8`` by rank); tokens per
            tile for ``tiling="single"`` (default 128).
        extra_tokens: keys every grid query attends to besides its window.
        tiling: ``"multi"`` (tile-major boxes) or ``"single"`` (raster runs).
        visit: ``"box"`` (fused-kernel iteration) or ``"exact"`` (block mask).
        fold_dilation: with dilation, tiles lie inside one dilation group
            (True: the fused kernel, and layouts that fold dilation into the
            batch) or are ranges of the undilated grid (False: the flex path's
            tile-major order; multi tiling only).

    Returns:
        A :class:`SimReport`. Runs in milliseconds for multi tiling at any grid
        size (per-axis arithmetic); single tiling is vectorised over tiles.

    Raises:
        ValueError / TypeError: invalid parameters, tiles, tiling or visit rule.
    """
    params = make_params(grid, kernel_size, stride, dilation, is_causal)
    if tiling not in TILINGS:
        raise ValueError(f"tiling must be one of {TILINGS}, got {tiling!r}")
    if visit not in VISITS:
        raise ValueError(f"visit must be one of {VISITS}, got {visit!r}")
    if isinstance(extra_tokens, bool) or not isinstance(extra_tokens, int) or extra_tokens < 0:
        raise ValueError(f"extra_tokens must be an integer >= 0, got {extra_tokens!r}")
    if not isinstance(fold_dilation, bool):
        raise TypeError(f"fold_dilation must be a bool, got {fold_dilation!r}")
    dilated = any(d > 1 for d in params.dilation)
    if not fold_dilation and tiling == "single" and dilated:
        raise ValueError("fold_dilation=False (tiles of the undilated grid) is supported for tiling='multi' only")
    ndim = params.ndim
    qt = _tile_shape(q_tile, ndim, tiling, "q_tile")
    kt = _tile_shape(kv_tile, ndim, tiling, "kv_tile")
    q_vol, kv_vol = math.prod(qt), math.prod(kt)
    n = params.num_tokens
    e = extra_tokens
    reasons: list[str] = []

    if tiling == "multi":
        per_axis = _multi_counts(params, qt, kt, fold_dilation)
        num_q = math.prod(p.num_q for p in per_axis)
        num_kv = math.prod(p.num_kv for p in per_axis)
        visited = math.prod(p.visited if visit == "box" else p.visited_exact for p in per_axis)
        full = math.prod(p.full for p in per_axis)
        full_cq = math.prod(p.full_complete_q for p in per_axis)
        num_q_complete = math.prod(p.num_q_complete for p in per_axis)
        q_slots = math.prod(p.q_slots for p in per_axis)
        kv_slots = math.prod(p.kv_slots for p in per_axis)
        if visited > full:
            for a in range(ndim):
                p = per_axis[a]
                if (p.visited if visit == "box" else p.visited_exact) <= p.full:
                    continue
                if fold_dilation or params.dilation[a] == 1:
                    reasons += _axis_reasons(params, a, _axis_tables(params, a, qt[a], kt[a]), qt[a], kt[a])
                else:
                    reasons.append(
                        f"axis {a}: dilation {params.dilation[a]} with tiles of the undilated grid "
                        "(fold_dilation=False): neighbouring tokens belong to different dilation groups, so "
                        "a tile pair can be fully unmasked only when both tiles hold one token"
                    )
    else:
        groups_per_axis = [axis_groups(params, a) for a in range(ndim)]
        num_q = num_kv = visited = full = full_cq = num_q_complete = 0
        for combo in itertools.product(*groups_per_axis):
            mult = math.prod(g.multiplicity for g in combo)
            counts = raster_counts([g.length for g in combo], [(g.start, g.end) for g in combo],
                                   qt[0], kt[0])
            num_q += mult * counts["num_q"]
            num_kv += mult * counts["num_kv"]
            visited += mult * counts["visited_" + visit]
            full += mult * counts["full"]
            full_cq += mult * counts["full_complete_q"]
            num_q_complete += mult * (math.prod(g.length for g in combo) // qt[0])
        q_slots, kv_slots = num_q * q_vol, num_kv * kv_vol
        if visited > full and ndim == 1:  # raster runs of a 1-D grid are the multi tiles
            reasons += _axis_reasons(params, 0, _axis_tables(params, 0, qt[0], kt[0]), qt[0], kt[0])
        elif visited > full:
            reasons.append(
                f"single tiling: a tile of {qt[0]} / {kt[0]} consecutive raster tokens is not a box "
                "aligned with the windows, so tiles straddling a window edge are partial"
            )

    num_extra = -(-e // kv_vol)
    visited += num_q * num_extra
    full += num_q * (e // kv_vol)
    full_cq += num_q_complete * (e // kv_vol)
    if e % kv_vol:
        reasons.append(
            f"extra tokens: {e} is not a multiple of the KV tile volume {kv_vol}, "
            "so the last extra KV tile is partly empty and must be masked"
        )
    partial = visited - full
    perfect = partial == 0

    allowed = count_pairs(params) + n * e
    dense_pairs = n * (n + e)
    dense_tiles = -(-n // q_vol) * -(-(n + e) // kv_vol)
    padding = {
        "q": 1.0 - n / q_slots,
        "kv": 1.0 - (n + e) / (kv_slots + num_extra * kv_vol),
    }
    if perfect:
        explanation = (f"perfectly block-sparse: all {visited} visited tile pairs are fully unmasked, "
                       "the kernel needs no masking")
    else:
        explanation = (f"not perfectly block-sparse: {partial} of {visited} visited tile pairs are "
                       "partially masked. " + " ".join(r.rstrip(".") + "." for r in reasons))
    return SimReport(
        grid=params.grid,
        kernel_size=params.kernel_size,
        stride=params.stride,
        dilation=params.dilation,
        is_causal=params.is_causal,
        extra_tokens=e,
        tiling=tiling,
        visit=visit,
        q_tile=qt,
        kv_tile=kt,
        flop_speedup=dense_pairs / allowed,
        visited=visited,
        visited_full=full,
        visited_partial=partial,
        tile_speedup=dense_tiles / visited,
        perfectly_block_sparse=perfect,
        padding_waste=padding,
        explanation=explanation,
        num_tokens=n,
        dense_pairs=dense_pairs,
        allowed_pairs=allowed,
        num_q_tiles=num_q,
        num_kv_tiles=num_kv,
        num_extra_kv_tiles=num_extra,
        dense_tile_pairs=dense_tiles,
        fold_dilation=fold_dilation,
        visited_full_complete_q=full_cq,
        reasons=reasons,
    )
