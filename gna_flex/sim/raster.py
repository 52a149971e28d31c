"""Single (raster-order) tiling: tiles of N consecutive tokens of a dilation group's sub-grid.

A run of consecutive raster tokens is a union of at most ``2 * ndim - 1``
boxes (a partial row, a block of whole rows, a partial row, recursively), and
the neighbour relation is a product over axes, so for a Q box the union of its
queries' windows and their intersection are boxes too (see ``axes.py``). A KV
tile is a raster run ``[x, y)``; it holds a neighbour of the Q tile iff one of
the union boxes has a point in ``[x, y)``, and it is fully unmasked iff it is
complete and lies inside the intersection box. Counting the points of a box
below a raster index is a closed form, so all of this is vectorised over
tiles.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Box = list[tuple[int, int]]

# Q tiles handled per vectorised step: bounds the [chunk, boxes, kv_tiles] temporaries.
_CHUNK = 64


def raster_boxes(a: int, b: int, shape: Sequence[int]) -> list[Box]:
    """Boxes (per-axis half-open ranges) whose union is the raster run ``[a, b)`` of ``shape``."""
    if a >= b:
        return []
    if len(shape) == 1:
        return [[(a, b)]]
    inner = math.prod(shape[1:])
    ra, rb = a // inner, b // inner
    ia, ib = a % inner, b % inner
    if ra == rb:
        return [[(ra, ra + 1)] + box for box in raster_boxes(ia, ib, shape[1:])]
    boxes: list[Box] = []
    if ia:
        boxes += [[(ra, ra + 1)] + box for box in raster_boxes(ia, inner, shape[1:])]
        ra += 1
    if rb > ra:
        boxes.append([(ra, rb)] + [(0, n) for n in shape[1:]])
    if ib:
        boxes += [[(rb, rb + 1)] + box for box in raster_boxes(0, ib, shape[1:])]
    return boxes


def _raster_strides(shape: Sequence[int]) -> np.ndarray:
    return np.array([math.prod(shape[k + 1:]) for k in range(len(shape))], dtype=np.int64)


def _coords(x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Raster indices ``[P]`` -> coordinates ``[P, ndim]``; index ``prod(shape)`` maps past axis 0."""
    strides = _raster_strides(shape)
    c = x[:, None] // strides[None, :]
    c[:, 1:] %= np.array(shape[1:], dtype=np.int64)
    return c


def _count_below(lo: np.ndarray, hi: np.ndarray, xc: np.ndarray) -> np.ndarray:
    """Points of the boxes ``[lo, hi)`` (``[..., ndim]``) with raster index below each of ``xc``.

    ``xc`` holds coordinates ``[P, ndim]``; returns ``[..., P]``. Empty boxes count 0.
    """
    size = np.maximum(hi - lo, 0)
    ndim = lo.shape[-1]
    total = np.zeros(lo.shape[:-1] + (xc.shape[0],), dtype=np.int64)
    inside_prefix = np.ones_like(total, dtype=bool)
    for k in range(ndim):
        after = np.prod(size[..., k + 1:], axis=-1)[..., None]
        lok, hik = lo[..., k, None], hi[..., k, None]
        xk = xc[:, k]
        term = np.clip(xk - lok, 0, size[..., k, None]) * after
        total += np.where(inside_prefix, term, 0)
        inside_prefix &= (lok <= xk) & (xk < hik)
    return total


def raster_counts(shape: Sequence[int], windows: Sequence[tuple[np.ndarray, np.ndarray]],
                  q_tile: int, kv_tile: int) -> dict[str, int]:
    """Tile-pair counts of one dilation group's sub-grid under single tiling.

    Args:
        shape: the sub-grid, ``(Lg_0, ..., Lg_{n-1})``.
        windows: per axis ``(start, end)`` arrays of length ``Lg_a`` (group-local).
        q_tile, kv_tile: tokens per Q tile and per KV tile.

    Returns:
        ``num_q``, ``num_kv``, ``visited_box`` (KV tiles between the lowest and
        the highest raster index any query of the tile attends to),
        ``visited_exact`` (KV tiles holding a neighbour), ``full`` and
        ``full_complete_q`` (full pairs whose Q tile holds ``q_tile`` tokens).
    """
    ndim = len(shape)
    total = math.prod(shape)
    num_q = -(-total // q_tile)
    num_kv = -(-total // kv_tile)
    tile_boxes = [raster_boxes(r * q_tile, min((r + 1) * q_tile, total), shape) for r in range(num_q)]
    nb = max(len(b) for b in tile_boxes)
    lo = np.zeros((num_q, nb, ndim), dtype=np.int64)
    hi = np.zeros((num_q, nb, ndim), dtype=np.int64)
    valid = np.zeros((num_q, nb), dtype=bool)
    for r, boxes in enumerate(tile_boxes):
        for k, box in enumerate(boxes):
            lo[r, k] = [p[0] for p in box]
            hi[r, k] = [p[1] for p in box]
            valid[r, k] = True
    # Union box of the windows of each Q box, and the intersection box over the whole tile.
    u_lo = np.zeros_like(lo)
    u_hi = np.zeros_like(hi)
    c_lo = np.zeros((num_q, ndim), dtype=np.int64)
    c_hi = np.zeros((num_q, ndim), dtype=np.int64)
    big = np.iinfo(np.int64).max
    for a, (start, end) in enumerate(windows):
        first = np.where(valid, lo[..., a], 0)
        last = np.where(valid, hi[..., a] - 1, 0)
        u_lo[..., a] = np.where(valid, start[first], 0)
        u_hi[..., a] = np.where(valid, end[last], 0)
        c_lo[:, a] = np.where(valid, start[last], -1).max(axis=1)
        c_hi[:, a] = np.where(valid, end[first], big).min(axis=1)
    strides = _raster_strides(shape)
    lowest = np.where(valid, (u_lo * strides).sum(-1), big).min(axis=1)
    highest = np.where(valid, ((u_hi - 1) * strides).sum(-1), -1).max(axis=1)
    visited_box = int((highest // kv_tile - lowest // kv_tile + 1).sum())

    bounds = np.minimum(np.arange(num_kv + 1, dtype=np.int64) * kv_tile, total)
    bc = _coords(bounds, shape)
    kv_size = np.diff(bounds)
    complete = kv_size == kv_tile
    visited_exact = 0
    full = 0
    full_complete_q = 0
    for c0 in range(0, num_q, _CHUNK):
        sl = slice(c0, c0 + _CHUNK)
        hits = np.diff(_count_below(u_lo[sl], u_hi[sl], bc), axis=-1).sum(axis=1)
        visited_exact += int((hits > 0).sum())
        inside = np.diff(_count_below(c_lo[sl], c_hi[sl], bc), axis=-1)
        is_full = (inside == kv_size) & complete
        full += int(is_full.sum())
        rows = np.arange(c0, min(c0 + _CHUNK, num_q))
        q_size = np.minimum((rows + 1) * q_tile, total) - rows * q_tile
        full_complete_q += int(is_full[q_size == q_tile].sum())
    return {
        "num_q": num_q,
        "num_kv": num_kv,
        "visited_box": visited_box,
        "visited_exact": visited_exact,
        "full": full,
        "full_complete_q": full_complete_q,
    }
