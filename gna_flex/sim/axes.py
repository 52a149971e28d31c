"""Per-axis window tables for the simulator.

The simulator never evaluates the window rule itself: it asks
:func:`gna_flex.spec.axis_windows` for the window of every coordinate of an
axis and works on those arrays.

Dilation. A tiled kernel never mixes dilation groups in one tile: the fused
kernel loads a tile of group ``g`` with a TMA element stride of ``d``
(tokens ``g, g + d, g + 2d, ...`` of the native layout) and the flex path
folds the groups into the batch. Either way a tile is a box in the
coordinates *inside* one dilation group, and a query of group ``g`` only has
keys of group ``g``. So every axis is split into its dilation groups, and each
group is an undilated axis of length ``Lg`` whose windows are given in
group-local coordinates (``start <= j // d < end``).

Two properties of the rule's windows are used (and checked at run time, so a
rule change that broke them fails loudly instead of mis-counting): along a
group, window starts and ends never decrease, and the window of query ``i + 1``
starts no later than the window of ``i`` ends. Hence over a run of
consecutive queries ``a..b`` the union of the windows is the single interval
``[start[a], end[b])`` and their intersection is ``[start[b], end[a])``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..spec import GNAParams, axis_windows, make_params


@dataclass(frozen=True)
class GroupWindows:
    """Windows of one dilation group of one axis, in group-local coordinates.

    Attributes:
        length: ``Lg``, the number of tokens of the group on this axis.
        start, end: int64 arrays of shape ``[Lg]``; the keys of query ``ii``
            are ``start[ii] <= jj < end[ii]`` (group-local).
        multiplicity: how many dilation groups of the axis have exactly these
            windows (groups are merged by content, never by assumption).
    """

    length: int
    start: np.ndarray
    end: np.ndarray
    multiplicity: int


def _check_monotone(axis: int, start: np.ndarray, end: np.ndarray) -> None:
    if len(start) > 1:
        ok = (
            bool(np.all(np.diff(start) >= 0))
            and bool(np.all(np.diff(end) >= 0))
            and bool(np.all(start[1:] <= end[:-1]))
        )
        if not ok:
            raise RuntimeError(
                f"axis {axis}: the window rule no longer gives monotone, overlapping windows; "
                "the analytic simulator depends on it (see gna_flex/sim/axes.py)"
            )


@lru_cache(maxsize=4096)
def _axis_groups_cached(length: int, kernel_size: int, stride: int, dilation: int, is_causal: bool,
                        axis: int) -> tuple[GroupWindows, ...]:
    params = make_params(length, kernel_size, stride, dilation, is_causal)
    _, start_t, end_t = axis_windows(params, 0)
    start_all, end_all = start_t.numpy(), end_t.numpy()
    groups: list[GroupWindows] = []
    for g in range(dilation):
        s, e = start_all[g::dilation].copy(), end_all[g::dilation].copy()
        _check_monotone(axis, s, e)
        for k, other in enumerate(groups):
            if other.length == len(s) and np.array_equal(other.start, s) and np.array_equal(other.end, e):
                groups[k] = GroupWindows(other.length, other.start, other.end, other.multiplicity + 1)
                break
        else:
            s.setflags(write=False)
            e.setflags(write=False)
            groups.append(GroupWindows(len(s), s, e, 1))
    return tuple(groups)


def axis_groups(params: GNAParams, axis: int) -> tuple[GroupWindows, ...]:
    """The distinct dilation groups of ``axis`` with their windows (cached per axis config)."""
    return _axis_groups_cached(*params.axis(axis), axis)


@dataclass(frozen=True)
class AxisTiles:
    """Multi-tiling relation between the Q tiles and KV tiles of one group of one axis.

    Q tile ``r`` holds group-local queries ``[r*tq, min((r+1)*tq, Lg))``,
    KV tile ``c`` holds keys ``[c*tk, min((c+1)*tk, Lg))``.

    Attributes:
        kv_first, kv_last: int arrays ``[nq]``: KV tiles ``kv_first..kv_last``
            (inclusive) are the ones the Q tile's windows touch. On one axis
            this is both the box the kernel visits and the exact set.
        full_first, full_stop: int arrays ``[nq]``: KV tiles
            ``full_first <= c < full_stop`` are complete (no out-of-grid keys)
            and inside the window of every query of the tile.
        num_q, num_kv: numbers of Q and KV tiles of the group.
        q_complete: bool array ``[nq]``: the Q tile has no out-of-grid rows.
    """

    kv_first: np.ndarray
    kv_last: np.ndarray
    full_first: np.ndarray
    full_stop: np.ndarray
    num_q: int
    num_kv: int
    q_complete: np.ndarray

    @property
    def visited(self) -> np.ndarray:
        return self.kv_last - self.kv_first + 1

    @property
    def full(self) -> np.ndarray:
        return np.maximum(self.full_stop - self.full_first, 0)


def axis_tiles(group: GroupWindows, q_tile: int, kv_tile: int) -> AxisTiles:
    """Per-Q-tile visited and full KV tile ranges on one group of one axis."""
    length, start, end = group.length, group.start, group.end
    num_q = -(-length // q_tile)
    num_kv = -(-length // kv_tile)
    first = np.arange(num_q) * q_tile
    last = np.minimum(first + q_tile, length) - 1
    union_lo, union_hi = start[first], end[last]
    common_lo, common_hi = start[last], end[first]
    kv_first = union_lo // kv_tile
    kv_last = (union_hi - 1) // kv_tile
    full_first = -(-common_lo // kv_tile)
    # KV tiles that end past the group are incomplete, so never full.
    full_stop = np.minimum(common_hi, (length // kv_tile) * kv_tile) // kv_tile
    return AxisTiles(kv_first, kv_last, full_first, full_stop, num_q, num_kv, first + q_tile <= length)


@dataclass(frozen=True)
class AxisSummary:
    """Multi-tiling totals of one axis, summed over its dilation groups.

    The totals of a whole config are the products of these over the axes.
    ``pairs`` is the number of (query, key) neighbour pairs on the axis;
    ``full_complete_q`` counts the full pairs whose Q tile has no out-of-grid rows,
    ``num_q_complete`` those Q tiles.
    """

    num_q: int
    num_kv: int
    visited: int
    full: int
    full_complete_q: int
    num_q_complete: int
    q_slots: int
    kv_slots: int
    pairs: int
    #: pairs holding a neighbour; equals ``visited`` (the box rule) except for
    #: tiles of the undilated grid with dilation > 1.
    visited_exact: int = -1


@lru_cache(maxsize=65536)
def axis_summary(length: int, kernel_size: int, stride: int, dilation: int, is_causal: bool,
                 q_tile: int, kv_tile: int, axis: int = 0) -> AxisSummary:
    """Per-axis multi-tiling totals for one axis config and tile size (cached)."""
    nq = nk = vis = full = full_cq = nq_complete = q_slots = kv_slots = pairs = 0
    for group in _axis_groups_cached(length, kernel_size, stride, dilation, is_causal, axis):
        t = axis_tiles(group, q_tile, kv_tile)
        m = group.multiplicity
        nq += m * t.num_q
        nk += m * t.num_kv
        vis += m * int(t.visited.sum())
        full += m * int(t.full.sum())
        full_cq += m * int(t.full[t.q_complete].sum())
        nq_complete += m * int(t.q_complete.sum())
        q_slots += m * t.num_q * q_tile
        kv_slots += m * t.num_kv * kv_tile
        pairs += m * int((group.end - group.start).sum())
    return AxisSummary(nq, nk, vis, full, full_cq, nq_complete, q_slots, kv_slots, pairs, vis)


# Bounds the [rows, nk] temporaries of the undilated-tiling relation.
_NATIVE_CELLS = 1 << 22


@lru_cache(maxsize=4096)
def native_axis_summary(length: int, kernel_size: int, stride: int, dilation: int, is_causal: bool,
                        q_tile: int, kv_tile: int, axis: int = 0) -> AxisSummary:
    """Per-axis totals when tiles are ranges of the undilated axis (they mix dilation groups).

    This is the order of a tile-major layout that does not fold dilation (the
    flex path's). A Q range holds, per group ``g``, a run of consecutive
    group-local queries whose windows' union is one interval, so "holds a
    neighbour" is an OR over groups. With ``dilation > 1`` two consecutive
    tokens belong to different groups, so every (query, key) pair of a tile
    pair can be neighbours only when both tiles hold a single token. The box
    rule visits, per Q tile, the KV tiles between the lowest and the highest
    key (undilated coordinates) any of its queries attends to.
    """
    if dilation < 2:
        raise ValueError(f"native_axis_summary is for dilation > 1 (axis {axis}); use axis_summary")
    params = make_params(length, kernel_size, stride, dilation, is_causal)
    _, start_t, end_t = axis_windows(params, 0)
    start_all, end_all = start_t.numpy(), end_t.numpy()
    d = dilation
    num_q = -(-length // q_tile)
    num_kv = -(-length // kv_tile)
    ka = np.arange(num_kv) * kv_tile
    kb = np.minimum(ka + kv_tile, length)
    k_single_complete = (kb - ka == 1) & (kv_tile == 1)
    groups = []
    for g in range(d):
        s, e = start_all[g::d], end_all[g::d]
        _check_monotone(axis, s, e)
        kf = -(-(ka - g) // d)
        kl = (kb - 1 - g) // d
        groups.append((s, e, np.maximum(kf, 0), kl, kf <= kl))
    visited = visited_exact = full = full_cq = 0
    rows_per = max(1, _NATIVE_CELLS // max(1, num_kv))
    for r0 in range(0, num_q, rows_per):
        qa = np.arange(r0, min(num_q, r0 + rows_per)) * q_tile
        qb = np.minimum(qa + q_tile, length)
        hits = np.zeros((len(qa), num_kv), dtype=bool)
        lowest = np.full(len(qa), np.iinfo(np.int64).max)
        highest = np.full(len(qa), -1)
        for g, (s, e, kf, kl, k_ok) in enumerate(groups):
            lg = len(s)
            first = np.maximum(-(-(qa - g) // d), 0)
            last = np.minimum((qb - 1 - g) // d, lg - 1)
            q_ok = first <= last
            u_lo = s[np.clip(first, 0, lg - 1)]
            u_hi = e[np.clip(last, 0, lg - 1)]
            lowest = np.where(q_ok, np.minimum(lowest, g + d * u_lo), lowest)
            highest = np.where(q_ok, np.maximum(highest, g + d * (u_hi - 1)), highest)
            hits |= (q_ok[:, None] & k_ok[None, :] & (u_lo[:, None] <= kl[None, :])
                     & (kf[None, :] < u_hi[:, None]))
        visited += int((highest // kv_tile - lowest // kv_tile + 1).sum())
        visited_exact += int(hits.sum())
        q_single = qb - qa == 1
        all_pairs = hits & q_single[:, None] & k_single_complete[None, :]
        full += int(all_pairs.sum())
        full_cq += int(all_pairs[qb - qa == q_tile].sum())
    pairs = int((end_all - start_all).sum())
    return AxisSummary(num_q, num_kv, visited, full, full_cq, length // q_tile, num_q * q_tile,
                       num_kv * kv_tile, pairs, visited_exact)
