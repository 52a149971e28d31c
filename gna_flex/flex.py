"""GNA as FlexAttention: exact mask_mods, analytic BlockMasks, and the flex path.

Token order
-----------
Tokens are either in raster order of the grid (``tile=None``) or in
tile-major order (``tile`` given; see :mod:`gna_flex.layout`: tiles of
``tile`` tokens contiguous, the grid zero-padded to whole tiles). After the
``S_g`` grid tokens (``S_g = prod(grid)`` in raster order, ``prod(padded
grid)`` in tile-major order) come ``extra_tokens`` extra (global) tokens.
A sequence may be longer still (e.g. padded to a block multiple): those
trailing tokens are invalid.

The mask: a padding or invalid token is nobody's neighbour and sees nothing;
a grid query sees the grid keys of its window (the rule of
:mod:`gna_flex.spec`) and every extra key; an extra query sees every valid
key (grid and extra).

No recompiles
-------------
The mask_mod reads every GNA parameter (kernel_size, stride, dilation,
causal flags) from int32 tensors it captures, never from Python constants,
so one compiled ``flex_attention`` serves every configuration of a grid and
token order: Dynamo guards on the captured tensors' metadata, not their
values. Two implementations compute the same mask (``mask_impl``; the
module default is :data:`DEFAULT_MASK_IMPL`):

* ``"tables"`` (default): per-token tables built on the host from
  :func:`gna_flex.spec.axis_windows`. Every query position holds, per axis,
  the interval ``[lo, hi)`` of key positions its window allows; every key
  position holds, per axis, its position in that space (dilation group times
  a band, plus its index inside the group). Per (query, key) element the
  mask is two compares per axis (plus one AND and one OR with extra tokens);
  per query row and per key column it is a few table loads. No division by
  a runtime value runs anywhere. The table shapes depend only on the grid,
  the order and the number of extra tokens, so dilation, too, changes only
  table values (1 and > 1 alike): no recompile for any parameter change.
* ``"arith"``: decodes token index -> coordinates and evaluates the rule
  per query row and per key column with integer divisions and modulos by
  the captured parameters (on a 3-D grid, 24 per row and 18 per column, on
  top of the same compares per element). It holds only a few scalars per
  mask (the tables hold ``3 * ndim``, ``+ 2`` with extra tokens, int32 per
  token) but runtime divisions are slow on a GPU (no strength reduction),
  and the column work repeats for every KV block. Kept to compare against.

Structural (each changes the sequence anyway): the rank, the grid, raster
vs tile-major order and the tile, and whether there are extra tokens (for
``"tables"`` also their number, which sizes the tables).

Block masks
-----------
:func:`block_mask` builds the ``BlockMask`` analytically. A contiguous block
of token positions is a union of a few boxes (products of per-axis
coordinate ranges) in both orders, and the neighbour relation is a product
over axes, so for a Q box and a KV box "some pair is a neighbour" and "every
pair is a neighbour" factor into per-axis questions about coordinate ranges.
Windows of consecutive queries of one dilation group have monotone starts and
ends, and consecutive windows overlap or touch (``stride <= kernel_size``),
so the union of the windows of a query range is the interval ``[start(first),
end(last))`` and their intersection is ``[start(last), end(first))``. The
per-axis answers are a handful of comparisons per (Q block, KV block) pair;
no token pair is ever evaluated. The work is proportional to ``nQ * nK``
block pairs, the size of the ``BlockMask`` index tensors torch itself uses.

Marker: every mask built here carries ``_gna_params = (GNAParams, tile,
extra_tokens)`` as a Python attribute of the ``BlockMask``, of each of its
tensors (block counts and indices), of its mask_mod function and of the
tensors that mask_mod captures. :func:`gna_params_of` reads it from any of
these objects. Inside a Dynamo/FX graph a BlockMask is flattened into
tensors and a traced mask_mod; those tensors reach a backend as placeholders
whose real values are the marked tensors, which is how a graph pass
recognises a gna_flex mask. (A ``BlockMask`` copy such as ``.to(device)``
keeps the mask_mod and its captured tensors, hence the marker.)
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .checks import check_inputs_for
from .layout import (
    coords_valid,
    default_tile,
    make_tile_layout,
    permute,
    tile_major_coords,
    unpermute,
    unravel_open,
)
from .spec import GNAParams, axis_window, axis_windows, make_params

__all__ = [
    "MaskSpec",
    "mask_spec",
    "mask_mod",
    "block_mask",
    "gna_params_of",
    "flex_na",
    "default_kernel_options",
    "DEFAULT_BLOCK_SIZE",
    "MASK_IMPLS",
    "DEFAULT_MASK_IMPL",
]

DEFAULT_BLOCK_SIZE = 128
MASK_IMPLS = ("tables", "arith")
# Read at call time wherever ``mask_impl=None``: a benchmark may switch it for a whole run.
DEFAULT_MASK_IMPL = "tables"
_MARKER = "_gna_params"


@dataclass(frozen=True)
class MaskSpec:
    """Everything that decides the mask: the GNA parameters and the token order.

    Attributes:
        params: validated GNA parameters (the grid is ``params.grid``).
        tile: tile-major tile per axis, or ``None`` for raster order.
        extra_tokens: extra (global) tokens after the grid tokens.
    """

    params: GNAParams
    tile: Optional[tuple[int, ...]]
    extra_tokens: int

    @property
    def order_tile(self) -> tuple[int, ...]:
        """Tile of the order; raster order is tile-major with one tile per row."""
        if self.tile is not None:
            return self.tile
        g = self.params.grid
        return (1,) * (len(g) - 1) + (g[-1],)

    @property
    def order_tiles(self) -> tuple[int, ...]:
        return tuple(-(-n // t) for n, t in zip(self.params.grid, self.order_tile))

    @property
    def grid_tokens(self) -> int:
        """Positions taken by grid tokens, padding included."""
        return math.prod(n * t for n, t in zip(self.order_tiles, self.order_tile))

    @property
    def valid_tokens(self) -> int:
        return self.grid_tokens + self.extra_tokens


def mask_spec(
    grid,
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    tile=None,
    extra_tokens: int = 0,
) -> MaskSpec:
    """Validate arguments (see :func:`gna_flex.spec.make_params`) into a :class:`MaskSpec`."""
    params = grid if isinstance(grid, GNAParams) else make_params(grid, kernel_size, stride, dilation, is_causal)
    return _spec_from_params(params, tile, extra_tokens)


def _spec_from_params(params: GNAParams, tile, extra_tokens: int) -> MaskSpec:
    if tile is not None:
        tile = make_tile_layout(params.grid, tile).tile
    if isinstance(extra_tokens, bool) or not isinstance(extra_tokens, int) or extra_tokens < 0:
        raise ValueError(f"extra_tokens must be an integer >= 0, got {extra_tokens!r}")
    return MaskSpec(params, tile, int(extra_tokens))


def _device_key(device) -> torch.device:
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# ---------------------------------------------------------------------------
# mask_mod


def _mask_impl(mask_impl: Optional[str]) -> str:
    """``mask_impl`` or, for ``None``, the module default :data:`DEFAULT_MASK_IMPL` (validated)."""
    impl = DEFAULT_MASK_IMPL if mask_impl is None else mask_impl
    if impl not in MASK_IMPLS:
        raise ValueError(f"mask_impl must be one of {MASK_IMPLS} (or None for DEFAULT_MASK_IMPL), got {impl!r}")
    return impl


def _window_tables(spec: MaskSpec, device: torch.device) -> tuple[Tensor, Tensor]:
    """The per-token tables of the ``"tables"`` mask_mod, built on the host.

    Positions ``0 .. T - 1`` (``T = spec.valid_tokens``) are the tokens in
    the order of ``spec``; position ``T`` is a sentinel (an invalid token)
    that the mask_mod clamps every index ``>= T`` to, so any ``q_len`` and
    ``kv_len`` are served by the same tables.

    Returns ``(q_table, k_table)``, int32 on ``device``, rows contiguous:

    * ``q_table [2 * ndim + e, T + 1]``: rows ``2a`` and ``2a + 1`` hold the
      interval ``[lo, hi)`` of key positions on axis ``a`` the query's window
      allows. With extra tokens (``e = 1``), row ``2 * ndim`` is 1 for grid
      queries, which also see every extra key.
    * ``k_table [ndim + e, T + 1]``: row ``a`` holds the key's position on
      axis ``a``; with extra tokens, row ``ndim`` is 1 for extra keys.

    Key positions on an axis of length ``L`` and dilation ``d``, with
    ``band = ceil(L / d)`` (the longest dilation group): a grid key at
    coordinate ``j`` sits at ``group(j) * band + j // d``, so the rule's
    window ``(group, start, end)`` of a query (:func:`gna_flex.spec.axis_windows`)
    is exactly the interval ``[group * band + start, group * band + end)``:
    a window never leaves its group (``end <= band``), and within a group
    position order is coordinate order. Extra keys sit at ``d * band``, past
    every grid key; padding and invalid keys at ``-1``, below every interval.
    Extra queries get ``[0, d * band + 1)`` (every valid key), padding and
    invalid queries the empty ``[0, 0)``.
    """
    params = spec.params
    n = params.ndim
    sg, total = spec.grid_tokens, spec.valid_tokens
    has_extra = spec.extra_tokens > 0
    pos = torch.arange(sg)
    if spec.tile is None:
        coords = unravel_open(pos, params.grid)
    else:
        coords = tile_major_coords(pos, spec.tile, spec.order_tiles)
    is_grid = coords_valid(coords, params.grid)
    q_table = torch.zeros(2 * n + has_extra, total + 1, dtype=torch.int64)
    k_table = torch.full((n + has_extra, total + 1), -1, dtype=torch.int64)
    for a in range(n):
        length, _, _, d, _ = params.axis(a)
        band = -(-length // d)
        group, start, end = axis_windows(params, a)
        c = coords[a].clamp(max=length - 1)
        base = group[c] * band
        q_table[2 * a, :sg] = torch.where(is_grid, base + start[c], 0)
        q_table[2 * a + 1, :sg] = torch.where(is_grid, base + end[c], 0)
        # A key's group and index inside its group: the same split the rule applies to queries.
        k_table[a, :sg] = torch.where(is_grid, base + c // d, -1)
        q_table[2 * a + 1, sg:total] = d * band + 1
        k_table[a, sg:total] = d * band
    if has_extra:
        q_table[2 * n, :sg] = is_grid.long()
        k_table[n] = 0
        k_table[n, sg:total] = 1
    return (q_table.to(device=device, dtype=torch.int32).contiguous(),
            k_table.to(device=device, dtype=torch.int32).contiguous())


def _make_table_mask_mod(spec: MaskSpec, device: torch.device) -> Callable:
    n = spec.params.ndim
    q_table, k_table = _window_tables(spec, device)
    # Python constants, fixed by the grid, order and extra-token count (which
    # fix the sequence anyway): Dynamo guards them, the tables' values are not.
    last = spec.valid_tokens
    has_extra = spec.extra_tokens > 0

    def gna_table_mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        # Loads run per query row ([M, 1] in flex's kernel) or per key column
        # ([1, N]); only the compares run per (query, key) element. The clamp
        # maps past-the-end indices (any q_len / kv_len) to the sentinel, so
        # every load stays inside the tables.
        qi = torch.clamp(q_idx, 0, last)
        ki = torch.clamp(kv_idx, 0, last)
        near = None
        for a in range(n):
            key = k_table[a][ki]
            m = (q_table[2 * a][qi] <= key) & (key < q_table[2 * a + 1][qi])
            near = m if near is None else near & m
        if not has_extra:
            return near
        return near | ((q_table[2 * n][qi] != 0) & (k_table[n][ki] != 0))

    marker = (spec.params, spec.tile, spec.extra_tokens)
    for obj in (gna_table_mask_mod, q_table, k_table):
        setattr(obj, _MARKER, marker)
    return gna_table_mask_mod


def _make_arith_mask_mod(spec: MaskSpec, device: torch.device) -> Callable:
    params = spec.params
    n = params.ndim
    # int32 like flex's q_idx / kv_idx: int64 parameters would promote every
    # per-element operation of the mask to 64-bit integer math on the GPU.
    # Rows: grid, kernel_size, stride, dilation, causal, order tile, order tiles.
    p = torch.tensor(
        [params.grid, params.kernel_size, params.stride, params.dilation, [int(c) for c in params.is_causal],
         spec.order_tile, spec.order_tiles],
        dtype=torch.int32,
        device=device,
    )
    counts = torch.tensor([spec.grid_tokens, spec.valid_tokens], dtype=torch.int32, device=device)
    raster = spec.tile is None
    has_extra = spec.extra_tokens > 0  # structural: extra tokens change the sequence length anyway

    def coords(idx: Tensor) -> list[Tensor]:
        if raster:
            return unravel_open(idx, [p[0, a] for a in range(n)])
        return tile_major_coords(idx, [p[5, a] for a in range(n)], [p[6, a] for a in range(n)])

    def gna_mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        # Work is split so that almost everything runs per query row or per key
        # column, and only two compares per axis run per (query, key) element:
        # a key at coordinate j gets the position  group(j) * (m + 1) + min(j // d, m)
        # (m = ceil(L / d), the longest group), and a query's window becomes one
        # interval of those positions. Slot m of each band is never inside a
        # window (windows end at <= m), which absorbs padding and past-the-end
        # keys: their coordinates exceed the grid on some axis, so they are
        # nobody's neighbour without any per-element test.
        qc = coords(q_idx)
        kc = coords(kv_idx)
        q_grid = q_idx < counts[0]
        for a in range(n):
            q_grid = q_grid & (qc[a] < p[0, a])
        near = None
        for a in range(n):
            length, w, stride, d, causal = p[0, a], p[1, a], p[2, a], p[3, a], p[4, a]
            band = (length + d - 1) // d + 1
            g, start, end = axis_window(qc[a].clamp(max=length - 1), length, w, stride, d, causal)
            lo = torch.where(q_grid, g * band + start, 0).to(torch.int32)
            hi = torch.where(q_grid, g * band + end, 0).to(torch.int32)
            key = (kc[a] % d) * band + torch.clamp(kc[a] // d, max=band - 1)
            m = (lo <= key) & (key < hi)
            near = m if near is None else near & m
        if not has_extra:
            return near
        k_grid = kv_idx < counts[0]
        for a in range(n):
            k_grid = k_grid & (kc[a] < p[0, a])
        q_extra = (q_idx >= counts[0]) & (q_idx < counts[1])
        k_extra = (kv_idx >= counts[0]) & (kv_idx < counts[1])
        return near | (q_grid & k_extra) | (q_extra & (k_grid | k_extra))

    marker = (params, spec.tile, spec.extra_tokens)
    for obj in (gna_mask_mod, p, counts):
        setattr(obj, _MARKER, marker)
    return gna_mask_mod


# Table masks hold 3 * ndim (+ 2 with extra tokens) int32 per token on the
# device: 4 MiB for a 30x48x80 grid, less than one BlockMask of that grid
# (whose cache of 64 keeps its mask_mod alive anyway). The cache stays at that
# size so a sweep over many configurations of a large grid does not pin GiBs.
@functools.lru_cache(maxsize=64)
def _cached_mask_mod(spec: MaskSpec, device: torch.device, impl: str) -> Callable:
    make = _make_table_mask_mod if impl == "tables" else _make_arith_mask_mod
    return make(spec, device)


def mask_mod(
    grid,
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    tile=None,
    extra_tokens: int = 0,
    *,
    device=None,
    mask_impl: Optional[str] = None,
) -> Callable:
    """The exact GNA mask_mod ``(b, h, q_idx, kv_idx) -> bool`` for FlexAttention.

    Args:
        grid, kernel_size, stride, dilation, is_causal: as in
            :func:`gna_flex.spec.make_params` (``grid`` may also be a
            :class:`GNAParams`, then the next four are ignored).
        tile: ``None`` for tokens in raster order, or the tile of the
            tile-major order (:mod:`gna_flex.layout`).
        extra_tokens: extra (global) tokens after the grid tokens.
        device: device of the captured parameter tensors (that of q/k/v).
        mask_impl: ``"tables"`` or ``"arith"`` (see the module docstring;
            both give the same mask), ``None`` for :data:`DEFAULT_MASK_IMPL`.

    The mask follows the rules in the module docstring. Its parameters are
    captured as tensors, so a compiled ``flex_attention`` does not recompile
    when only kernel_size / stride / dilation / is_causal change. Masks are
    cached: equal arguments give the same function object.

    Raises:
        ValueError: an invalid parameter (see :func:`gna_flex.spec.make_params`),
            tile, ``extra_tokens`` or ``mask_impl``.
    """
    spec = mask_spec(grid, kernel_size, stride, dilation, is_causal, tile, extra_tokens)
    return _cached_mask_mod(spec, _device_key(device), _mask_impl(mask_impl))


# ---------------------------------------------------------------------------
# Analytic block mask.


def _range_boxes(start: Tensor, stop: Tensor, radices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Split index ranges ``[start, stop)`` of a mixed-radix order into digit boxes.

    A position's digits are its mixed-radix representation with ``radices``
    (most significant first). A box fixes a prefix of digits, lets one digit
    run over a range and leaves the later digits free; at most ``2 * m`` boxes
    cover a range (``m`` digits).

    Returns ``(lo, hi, nonempty)``: digit bounds ``[N, 2m, m]`` (hi exclusive)
    and ``[N, 2m]`` flags.
    """
    m = len(radices)
    dev = start.device
    total = math.prod(radices)
    weight = torch.tensor([math.prod(radices[k + 1 :]) for k in range(m)], device=dev)  # W[k]
    weight_up = torch.tensor([total] + weight[:-1].tolist(), device=dev)  # W[k - 1]
    radix = torch.tensor(radices, device=dev)
    a, b = start[:, None], stop[:, None]

    def roundup(x, w):
        return (x + w - 1) // w * w

    # Climb: at level k (least significant first) run digit k up to the next
    # multiple of W[k - 1]; stop climbing at the first level that would pass
    # ``stop``. Starts and ends of the climb are monotone in k, so every level
    # is computed at once.
    up_from = roundup(a, weight)
    up_to = roundup(a, weight_up)
    up_ok = up_to <= b
    up_count = torch.where(up_ok, (up_to - up_from) // weight, 0)
    reached = torch.where(up_ok, up_to, a).amax(1, keepdim=True)
    # Descend: whole runs of digit k (most significant first) below ``stop``.
    down_to = b // weight * weight
    prev = torch.cat([torch.full_like(a, -1), down_to[:, :-1]], 1)
    down_from = torch.maximum(reached, prev)
    down_count = torch.where(down_to > down_from, (down_to - down_from) // weight, 0)

    cur = torch.cat([up_from, down_from], 1)  # [N, 2m]
    count = torch.cat([up_count, down_count], 1)
    level = torch.arange(m, device=dev).repeat(2)  # the digit that runs, per box
    digits = (cur[..., None] // weight) % radix  # [N, 2m, m]
    j = torch.arange(m, device=dev)
    lv = level[:, None]
    lo = torch.where(j <= lv, digits, 0)
    hi = torch.where(j < lv, digits + 1, torch.where(j == lv, digits + count[..., None], radix))
    return lo, hi, count > 0


@dataclass
class _Blocks:
    """Blocks of one side (Q or KV) as coordinate boxes plus per-block flags."""

    lo: Tensor  # [N, K, ndim] box start per axis (clipped to the grid)
    hi: Tensor  # [N, K, ndim] box end per axis (exclusive, clipped)
    box: Tensor  # [N, K] box holds at least one valid grid token
    has_grid: Tensor  # [N]
    has_extra: Tensor  # [N]
    has_invalid: Tensor  # [N] padding / invalid / past-the-end positions


def _blocks(spec: MaskSpec, seq_len: int, block: int, device: torch.device) -> _Blocks:
    num = -(-seq_len // block)
    first = torch.arange(num, device=device, dtype=torch.int64) * block
    last = first + block  # nominal end; positions >= seq_len are padding of the block reduction
    sg, sv = spec.grid_tokens, spec.valid_tokens
    stop = torch.clamp(torch.clamp(last, max=seq_len), max=sg)
    start = torch.clamp(first, max=sg)
    stop = torch.maximum(stop, start)
    tile, tiles = spec.order_tile, spec.order_tiles
    n = len(tile)
    dlo, dhi, ok = _range_boxes(start, stop, tiles + tile)
    t_lo, r_lo = dlo[..., :n], dlo[..., n:]
    t_hi, r_hi = dhi[..., :n], dhi[..., n:]
    tt = torch.tensor(tile, device=device)
    lo = t_lo * tt + r_lo
    hi = (t_hi - 1) * tt + r_hi
    grid = torch.tensor(spec.params.grid, device=device)
    padded = (ok & (hi > grid).any(-1)).any(-1)
    hi = torch.minimum(hi, grid)
    box = ok & (lo < hi).all(-1)
    # Keep only as many box slots as the busiest block needs, valid ones first.
    order = torch.sort((~box).to(torch.int8), dim=1, stable=True).indices
    keep = max(int(box.sum(1).max()) if box.numel() else 0, 1)
    order = order[:, :keep]
    lo = torch.gather(lo, 1, order[..., None].expand(-1, -1, n))
    hi = torch.gather(hi, 1, order[..., None].expand(-1, -1, n))
    box = torch.gather(box, 1, order)
    ext_lo = torch.clamp(first, min=sg)
    ext_hi = torch.clamp(torch.clamp(last, max=seq_len), max=sv)
    return _Blocks(
        lo=lo,
        hi=hi,
        box=box,
        has_grid=box.any(1),
        has_extra=ext_lo < ext_hi,
        has_invalid=padded | (last > min(sv, seq_len)),
    )


def _axis_terms(params: GNAParams, axis: int, qb: _Blocks, kb: _Blocks, device) -> list:
    """Per-axis any/all as functions of broadcast Q-box and KV-box tensors.

    Returns ``(any_fn, all_fn)`` closures over precomputed per-box values;
    each takes row slice ``rows`` and returns ``[r, Kq, nK, Kk]`` bools.
    The per-box values are computed where ``qb`` / ``kb`` live (the host) and
    moved to ``device``, where the ``nQ x nK`` work runs.
    """
    length, w, s, d, c = params.axis(axis)
    group, start, end = axis_windows(params, axis, qb.lo.device)
    ql = qb.lo[..., axis].clamp(0, length - 1)
    qh = (qb.hi[..., axis] - 1).clamp(0, length - 1)
    kl = kb.lo[..., axis]
    kh = kb.hi[..., axis]
    if d == 1:
        # union of the windows of the query range, and their intersection
        u_lo, u_hi, a_lo, a_hi, kl, kh = (t.to(device) for t in (start[ql], end[qh], start[qh], end[ql], kl, kh))
        kl4, kh4 = kl[None, None, :, :], kh[None, None, :, :]

        def any_fn(rows):
            return (u_lo[rows, :, None, None] < kh4) & (kl4 < u_hi[rows, :, None, None])

        def all_fn(rows):
            return (a_lo[rows, :, None, None] <= kl4) & (kh4 <= a_hi[rows, :, None, None])

        return [any_fn, all_fn]

    q_single = (qb.hi[..., axis] - qb.lo[..., axis]) == 1
    k_single = (kh - kl) == 1
    per_group = []
    for g in range(d):
        first = ql + (g - ql) % d
        last = qh - (qh - g) % d
        q_ok = first <= last
        u_lo = start[first.clamp(0, length - 1)]
        u_hi = end[last.clamp(0, length - 1)]
        kf = kl + (g - kl) % d
        kL = kh - 1 - (kh - 1 - g) % d
        k_ok = kf <= kL
        per_group.append(tuple(t.to(device) for t in (q_ok, u_lo, u_hi, k_ok, kf // d, kL // d + 1)))
    q_single, k_single = q_single.to(device), k_single.to(device)

    def any_fn(rows):
        out = None
        for q_ok, u_lo, u_hi, k_ok, k_lo, k_hi in per_group:
            m = (
                (q_ok[rows, :, None, None] & k_ok[None, None])
                & (u_lo[rows, :, None, None] < k_hi[None, None])
                & (k_lo[None, None] < u_hi[rows, :, None, None])
            )
            out = m if out is None else out | m
        return out

    def all_fn(rows):
        return any_fn(rows) & q_single[rows, :, None, None] & k_single[None, None]

    return [any_fn, all_fn]


def _block_relation(spec: MaskSpec, qb: _Blocks, kb: _Blocks, device) -> tuple[Tensor, Tensor]:
    """``(any, all)`` bool ``[nQ, nK]``: some / every (query, key) pair of the blocks is allowed."""
    params = spec.params
    nq, kq = qb.box.shape
    nk, kk = kb.box.shape
    terms = [_axis_terms(params, a, qb, kb, device) for a in range(params.ndim)]
    qbox, kbox = qb.box.to(device), kb.box.to(device)
    q_flags = torch.stack([qb.has_grid, qb.has_extra, qb.has_invalid]).to(device)
    k_flags = torch.stack([kb.has_grid, kb.has_extra, kb.has_invalid]).to(device)
    any_out = torch.empty(nq, nk, dtype=torch.bool, device=device)
    all_out = torch.empty(nq, nk, dtype=torch.bool, device=device)
    # Rows per chunk: keep the [rows, Kq, nK, Kk] temporaries around 16M elements.
    rows_per = max(1, (1 << 24) // max(1, kq * nk * kk))
    kbox = kbox[None, None, :, :]
    for r0 in range(0, nq, rows_per):
        rows = slice(r0, min(nq, r0 + rows_per))
        pair = qbox[rows, :, None, None] & kbox
        near_any = pair
        near_all = torch.ones_like(pair)
        for any_fn, all_fn in terms:
            near_any = near_any & any_fn(rows)
            near_all = near_all & all_fn(rows)
        grid_any = near_any.any(3).any(1)
        grid_all = (near_all | ~pair).all(3).all(1)
        qg, qe, qi = (f[rows, None] for f in q_flags)
        kg, ke, ki = (f[None] for f in k_flags)
        row_any = (qg & (grid_any | ke)) | (qe & (kg | ke))
        any_out[rows] = row_any
        all_out[rows] = row_any & ~qi & ~ki & grid_all
    return any_out, all_out


def _dense_to_ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """Block bool ``[nQ, nK]`` -> (counts ``[nQ]``, indices ``[nQ, nK]``) int32, ascending."""
    counts = dense.sum(-1, dtype=torch.int32)
    indices = torch.sort((~dense).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return counts, indices


def _block_sizes(block_size) -> tuple[int, int]:
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        bs = (block_size, block_size)
    elif isinstance(block_size, (tuple, list)) and len(block_size) == 2:
        bs = tuple(block_size)
    else:
        raise ValueError(f"block_size must be an int or a (Q, KV) pair of ints, got {block_size!r}")
    for name, v in zip(("Q", "KV"), bs):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"block_size ({name}) must be a positive integer, got {v!r}")
    return bs


def _build_block_mask(
    spec: MaskSpec,
    q_len: int,
    kv_len: int,
    block_size: tuple[int, int],
    B: Optional[int],
    H: Optional[int],
    device: torch.device,
    impl: Optional[str] = None,
) -> BlockMask:
    bq, bk = block_size
    # Per-block boxes are small (O(nQ + nK)) and take many tiny ops: build them
    # on the host; the O(nQ * nK) relation and the index lists run on `device`.
    host = torch.device("cpu")
    qb = _blocks(spec, q_len, bq, host)
    kb = qb if (q_len, bq) == (kv_len, bk) else _blocks(spec, kv_len, bk, host)
    any_m, all_m = _block_relation(spec, qb, kb, device)
    partial = any_m & ~all_m
    kv_num, kv_idx = _dense_to_ordered(partial)
    full_num, full_idx = _dense_to_ordered(all_m)
    b, h = (B or 1), (H or 1)

    def lift(t: Tensor) -> Tensor:
        t = t[None, None]
        return t.expand(b, h, *t.shape[2:]).contiguous() if (b, h) != (1, 1) else t.contiguous()

    # Only arguments that torch 2.11 and 2.13 share (2.13 adds keyword-only
    # dq_write_order / dq_kv_order, left at their defaults).
    bm = BlockMask.from_kv_blocks(
        lift(kv_num),
        lift(kv_idx),
        full_kv_num_blocks=lift(full_num),
        full_kv_indices=lift(full_idx),
        BLOCK_SIZE=(bq, bk),
        mask_mod=_cached_mask_mod(spec, device, _mask_impl(impl)),
        seq_lengths=(q_len, kv_len),
    )
    marker = (spec.params, spec.tile, spec.extra_tokens)
    setattr(bm, _MARKER, marker)
    for value in vars(bm).values():
        if isinstance(value, Tensor):
            setattr(value, _MARKER, marker)
    return bm


@functools.lru_cache(maxsize=64)
def _cached_block_mask(spec, q_len, kv_len, block_size, B, H, device, impl) -> BlockMask:
    return _build_block_mask(spec, q_len, kv_len, block_size, B, H, device, impl)


def block_mask(
    grid,
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    tile=None,
    extra_tokens: int = 0,
    block_size: Union[int, tuple[int, int]] = DEFAULT_BLOCK_SIZE,
    B: Optional[int] = None,
    H: Optional[int] = None,
    device=None,
    *,
    q_len: Optional[int] = None,
    kv_len: Optional[int] = None,
    mask_impl: Optional[str] = None,
) -> BlockMask:
    """A FlexAttention ``BlockMask`` for GNA, built analytically from the rule.

    Args:
        grid, kernel_size, stride, dilation, is_causal, tile, extra_tokens:
            as in :func:`mask_mod` (the token order and the mask).
        block_size: sparse block size, an int or a ``(Q, KV)`` pair. With a
            tile of ``block_size`` tokens, one tile is one block, and a
            configuration whose windows start on tile boundaries is
            perfectly block-sparse (every visited block is full, so flex
            skips the mask_mod).
        B, H: batch and heads of the block tensors (``None``: 1, broadcast).
        device: where the mask lives (that of q/k/v).
        q_len, kv_len: sequence lengths (default: grid tokens, padding
            included, plus extra tokens). Shorter query sequences keep only
            the first ``q_len`` rows (e.g. grid queries only); longer ones
            hold invalid trailing tokens (e.g. padding to a block multiple).
        mask_impl: implementation of the mask_mod the BlockMask carries
            (see :func:`mask_mod`); the block tensors do not depend on it.

    Block ``(i, j)`` is *full* when every (query, key) pair of the two blocks
    is allowed (positions past the sequence end count as not allowed, as in
    ``create_block_mask``) and *partial* when some but not all are.
    ``to_dense()`` equals the reference mask reduced over blocks. Results are
    cached by their arguments (the same object comes back), and carry the
    marker read by :func:`gna_params_of`.
    """
    spec = mask_spec(grid, kernel_size, stride, dilation, is_causal, tile, extra_tokens)
    bs = _block_sizes(block_size)
    q_len = spec.valid_tokens if q_len is None else int(q_len)
    kv_len = spec.valid_tokens if kv_len is None else int(kv_len)
    if q_len < 1 or kv_len < 1:
        raise ValueError(f"q_len and kv_len must be >= 1, got {q_len} and {kv_len}")
    for name, v in (("B", B), ("H", H)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be None or a positive integer, got {v!r}")
    return _cached_block_mask(spec, q_len, kv_len, bs, B, H, _device_key(device), _mask_impl(mask_impl))


def gna_params_of(mask: Any) -> Optional[tuple[GNAParams, Optional[tuple[int, ...]], int]]:
    """``(GNAParams, tile, extra_tokens)`` of an object gna_flex marked, else ``None``.

    ``mask`` may be a BlockMask from :func:`block_mask`, one of its tensors, a
    mask_mod from :func:`mask_mod`, or a tensor such a mask_mod captures.
    """
    marker = getattr(mask, _MARKER, None)
    if marker is None and isinstance(mask, BlockMask):
        marker = getattr(mask.mask_mod, _MARKER, None)
    return marker


# ---------------------------------------------------------------------------
# The flex path.

_COMPILED_FLEX: Optional[Callable] = None
# torch >= 2.9 returns the logsumexp through AuxRequest; return_lse is deprecated there.
_HAS_AUX = "return_aux" in inspect.signature(flex_attention).parameters


def _lse_request() -> dict:
    if _HAS_AUX:
        from torch.nn.attention.flex_attention import AuxRequest

        return {"return_aux": AuxRequest(lse=True)}
    return {"return_lse": True}


def _compiled_flex() -> Callable:
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        # dynamic=False: shapes are fixed per grid and block masks are cached,
        # so static shapes give the best kernels and never re-trace per config
        # (the mask parameters are tensors).
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return _COMPILED_FLEX


def _recompile_headroom():
    """Raise Dynamo's per-function recompile limit while the compiled flex runs.

    Every grid shape, dtype and kernel-option set is one compiled entry of
    flex_attention's code object (configs of one grid share an entry: their
    parameters are tensors). Past the default limit of 8 Dynamo silently runs
    flex eagerly, which materialises the S x S score matrix (hundreds of GiB
    for a video grid); a model with more attention shapes than that must
    keep compiling instead.
    """
    import torch._dynamo.config as dynamo_config

    limits = {}
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            limits[name] = max(getattr(dynamo_config, name), 256)
            break
    return dynamo_config.patch(**limits)


def default_kernel_options(
    dtype: torch.dtype,
    head_dim: int,
    padded_rows: bool,
    block_size: tuple[int, int] = (DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE),
    capability: Optional[tuple[int, int]] = None,
) -> dict:
    """Flex kernel options used by :func:`flex_na` on CUDA when none are given.

    * On sm90 (H100/H200), 16-bit inputs, head dim 128, sparse blocks that
      are multiples of (128, 64): ``BLOCK_M=128, BLOCK_N=64, num_warps=8,
      num_stages=3``. A 128-row Q tile is exactly one 128-token tile (one
      sparse Q block), so a Q program never straddles two KV lists; a
      64-wide KV step keeps the 128x64 S/P tiles in registers with 8 warps;
      3 stages of K/V (2 x 16 KiB each) plus Q (32 KiB) fit shared memory
      and hide load latency. This is torch's own sm90 pick today; pinning it
      keeps results from moving with torch's heuristics. Wider KV steps
      (128) or TMA loads are what ``benchmarks/bench_flex.py`` compares
      against it; change this default only with a result file behind it.
    * ``ROWS_GUARANTEED_SAFE`` when no query row is padding: every grid
      query has a non-empty window (kernel_size >= 2), so the kernel may skip
      its all-masked-row guard. Padding rows (tile-major with a grid that is
      not a tile multiple) see nothing, so the guard stays on for them.
    Everything else is left to torch's heuristics.
    """
    opts: dict = {}
    if capability is None and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability()
    if (
        capability == (9, 0)
        and dtype in (torch.float16, torch.bfloat16)
        and head_dim == 128
        and block_size[0] % 128 == 0
        and block_size[1] % 64 == 0
    ):
        opts.update(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    if not padded_rows:
        opts["ROWS_GUARANTEED_SAFE"] = True
    return opts


def _run_flex(fn, q, k, v, bm, scale, gqa, kernel_options, return_lse) -> tuple[Tensor, Optional[Tensor]]:
    """``fn`` (flex_attention, compiled or not) on ``[B, heads, S, D]``; returns ``(out, lse or None)``."""
    kwargs = dict(block_mask=bm, scale=scale, enable_gqa=gqa, kernel_options=kernel_options)
    if return_lse:
        kwargs.update(_lse_request())
    with warnings.catch_warnings():
        # Eager flex on CPU warns that it materialises the score matrix: that is the point of the CPU path.
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        res = fn(q, k, v, **kwargs)
    if not return_lse:
        return res, None
    return (res[0], res[1].lse) if _HAS_AUX else res


class _CpuFlexAttention(torch.autograd.Function):
    """Eager flex on the CPU with a backward.

    torch's FlexAttention refuses inputs that require grad on the CPU. The
    forward here is eager flex itself; the backward is the standard attention
    backward evaluated densely under the same mask_mod (the eager CPU forward
    materialises the score matrix too), so CPU autograd of the flex path
    computes the exact gradient of the exact function.
    """

    @staticmethod
    def forward(ctx, q, k, v, bm, scale, gqa):
        out, lse = _run_flex(flex_attention, q.detach(), k.detach(), v.detach(), bm, scale, gqa, None, True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.bm, ctx.scale = bm, scale
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        b, hq, sq, dim = q.shape
        hkv, skv = k.shape[1], k.shape[2]
        group = hq // hkv
        scale = dim ** -0.5 if ctx.scale is None else ctx.scale
        z = torch.zeros((), dtype=torch.int32)
        mask = ctx.bm.mask_mod(z, z, torch.arange(sq, dtype=torch.int32)[:, None],
                               torch.arange(skv, dtype=torch.int32)[None, :])
        kx = k.repeat_interleave(group, 1) if group > 1 else k
        vx = v.repeat_interleave(group, 1) if group > 1 else v
        s = (q.float() @ kx.float().transpose(-1, -2)) * scale
        lse_f = torch.where(torch.isfinite(lse), lse, 0).float()[..., None]
        p = torch.where(mask, torch.exp(s - lse_f), 0)
        d_out = torch.zeros_like(out, dtype=torch.float32) if d_out is None else d_out.float()
        dv = p.transpose(-1, -2) @ d_out
        dp = d_out @ vx.float().transpose(-1, -2)
        delta = (d_out * out.float()).sum(-1, keepdim=True)
        if d_lse is not None:
            delta = delta - d_lse.float()[..., None]
        ds = p * (dp - delta)
        dq = (ds @ kx.float()) * scale
        dk = (ds.transpose(-1, -2) @ q.float()) * scale
        if group > 1:
            dk = dk.unflatten(1, (hkv, group)).sum(2)
            dv = dv.unflatten(1, (hkv, group)).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def flex_na(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    params: GNAParams,
    *,
    scale: Optional[float] = None,
    additional_keys: Optional[Tensor] = None,
    additional_values: Optional[Tensor] = None,
    return_lse: bool = False,
    tile=None,
    block_size=None,
    kernel_options: Optional[dict] = None,
    compile: Optional[bool] = None,
    mask_impl: Optional[str] = None,
):
    """Neighborhood attention through FlexAttention in tile-major order.

    Args:
        query: ``[B, *grid, heads, D]``.
        key, value: ``[B, *grid, heads_kv, D]`` / ``[B, *grid, heads_kv, Dv]``;
            ``heads_kv`` divides ``heads`` (GQA).
        params: :class:`GNAParams` of the grid.
        scale: softmax scale (default ``D ** -0.5``).
        additional_keys, additional_values: ``[B, E, heads_kv, D]`` extra
            keys/values every grid query attends to, in one softmax with its
            window.
        return_lse: also return the logsumexp ``[B, *grid, heads]`` (fp32,
            natural log).
        tile: tile of the tile-major order (default :func:`gna_flex.layout.default_tile`
            for the Q block size).
        block_size: sparse block size, int or ``(Q, KV)``; default 128.
        kernel_options: flex kernel options (default :func:`default_kernel_options`
            on CUDA; pass ``{}`` for torch's heuristics).
        compile: use the compiled flex_attention (default: on CUDA only; eager
            flex on CPU evaluates the whole score matrix, fine for small tests).
        mask_impl: mask_mod implementation, ``"tables"`` or ``"arith"``
            (:func:`mask_mod`); ``None`` for :data:`DEFAULT_MASK_IMPL`.

    Returns:
        ``out [B, *grid, heads, Dv]`` (and ``lse`` if asked). Autograd works
        through flex's own backward on CUDA. torch's FlexAttention has no
        CPU backward; on the CPU, inputs that require grad go through eager
        flex with a dense backward under the same mask_mod (``_CpuFlexAttention``).
    """
    check_inputs_for(query, key, value, params, additional_keys, additional_values)
    bq, bk = _block_sizes(DEFAULT_BLOCK_SIZE if block_size is None else block_size)
    grid = params.grid
    if tile is None:
        tile = default_tile(grid, bq)
    extra = 0 if additional_keys is None else additional_keys.shape[1]
    spec = _spec_from_params(params, tile, extra)
    sg = spec.grid_tokens
    # Pad the KV sequence to a whole number of KV blocks, so the kernel can use
    # its divisible fast path; the trailing tokens are invalid in the mask.
    kv_len = -(-(sg + extra) // bk) * bk
    qt, layout = permute(query.movedim(-2, 1), grid, tile, heads_last=False)
    kt, _ = permute(key.movedim(-2, 1), grid, tile, heads_last=False, extra=kv_len - sg)
    vt, _ = permute(value.movedim(-2, 1), grid, tile, heads_last=False, extra=kv_len - sg)
    if extra:
        kt[:, :, sg : sg + extra] = additional_keys.movedim(2, 1)
        vt[:, :, sg : sg + extra] = additional_values.movedim(2, 1)
    bm = block_mask(params, None, tile=tile, extra_tokens=extra, block_size=(bq, bk), device=query.device,
                    q_len=sg, kv_len=kv_len, mask_impl=mask_impl)
    if compile is None:
        compile = query.device.type == "cuda"
    if kernel_options is None:
        kernel_options = (
            default_kernel_options(query.dtype, query.shape[-1], layout.is_padded, (bq, bk),
                                   torch.cuda.get_device_capability(query.device))
            if query.device.type == "cuda"
            else None
        )
    gqa = query.shape[-2] != key.shape[-2]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (qt, kt, vt))
    if query.device.type == "cpu" and needs_grad:
        out, lse = _CpuFlexAttention.apply(qt, kt, vt, bm, scale, gqa)
    elif compile:
        with _recompile_headroom():
            out, lse = _run_flex(_compiled_flex(), qt, kt, vt, bm, scale, gqa, kernel_options or None, return_lse)
    else:
        out, lse = _run_flex(flex_attention, qt, kt, vt, bm, scale, gqa, kernel_options or None, return_lse)
    # unpermute returns a view when the order is unchanged (e.g. 1-D without
    # padding); callers get NATTEN's contiguous [B, *grid, heads, D] either way.
    out = unpermute(out.transpose(1, 2), layout).contiguous()
    if not return_lse:
        return out
    return out, unpermute(lse.transpose(1, 2), layout).float().contiguous()
