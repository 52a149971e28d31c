"""GNA mask_mods for FlexAttention: the token order, the mask and its two implementations.

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

Marker: every mask_mod built here, and the tensors it captures, carry
``(GNAParams, tile, extra_tokens)`` as the attribute named by :data:`_MARKER`
(``_gna_params``); :mod:`gna_flex.flex.block_masks` marks its BlockMasks the
same way and reads the marker back (:func:`~gna_flex.flex.block_masks.gna_params_of`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..layout import coords_valid, make_tile_layout, tile_major_coords, unravel_open
from ..spec import GNAParams, axis_window, axis_windows, make_params

__all__ = ["MaskSpec", "mask_spec", "mask_mod", "MASK_IMPLS", "DEFAULT_MASK_IMPL"]

MASK_IMPLS = ("tables", "arith")
# Read at call time wherever ``mask_impl=None``; a benchmark or test may switch it for a whole run.
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
    width = last + 1
    has_extra = spec.extra_tokens > 0
    # The mask_mod reads the tables flat, row r of a table at offset r * width:
    # every load is indexed by an expression of q_idx / kv_idx, never by a
    # constant row select (torch's CuTe-DSL lowering for BACKEND="FLASH"
    # cannot index with a bare constant).
    q_flat, k_flat = q_table.reshape(-1), k_table.reshape(-1)

    def gna_table_mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        # Loads run per query row ([M, 1] in flex's kernel) or per key column
        # ([1, N]); only the compares run per (query, key) element. Indices
        # past the end (any q_len / kv_len) go to the sentinel, so every load
        # stays inside the tables (indices are never negative). A select, not
        # a clamp: the CuTe-DSL lowering has no min/max.
        qi = torch.where(q_idx < last, q_idx, last)
        ki = torch.where(kv_idx < last, kv_idx, last)
        near = None
        for a in range(n):
            key = k_flat[ki + a * width] if a else k_flat[ki]
            lo = q_flat[qi + 2 * a * width] if a else q_flat[qi]
            m = (lo <= key) & (key < q_flat[qi + (2 * a + 1) * width])
            near = m if near is None else near & m
        if not has_extra:
            return near
        return near | ((q_flat[qi + 2 * n * width] != 0) & (k_flat[ki + n * width] != 0))

    marker = (spec.params, spec.tile, spec.extra_tokens)
    for obj in (gna_table_mask_mod, q_flat, k_flat):
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
