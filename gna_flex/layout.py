"""Token layouts: tile-major order with padding, and dilation folded into batch.

Tile-major order
----------------
A token grid ``(L_0, ..., L_{n-1})`` is cut into tiles of ``tile = (T_0, ...,
T_{n-1})`` tokens. The grid is zero-padded at the end of every axis to a
multiple of the tile (``P_a = ceil(L_a / T_a) * T_a``), giving a tile grid of
``tiles = (P_a / T_a)``. Tokens are then ordered tile by tile, tiles in raster
(row-major) order of the tile grid, tokens inside a tile in raster order of the
tile. Position ``p`` holds the token with coordinates

    tile_index, r = p // prod(T), p % prod(T)
    coord_a = unravel(tile_index, tiles)[a] * T_a + unravel(r, tile)[a]

and is a padding token when any ``coord_a >= L_a``. Raster order is the
special case ``tile = (1, ..., 1, L_{n-1})`` (one tile per row), which is how
the block-mask builder treats it.

Tensors come in two layouts, chosen by ``heads_last``:

* ``heads_last=True``:  ``[B, *grid, *rest]`` <-> ``[B, S_pad, *rest]``
  (NATTEN's ``[B, *grid, heads, D]``; ``rest`` may also be just ``(heads,)``,
  e.g. a logsumexp).
* ``heads_last=False``: ``[B, heads, *grid, *rest]`` <-> ``[B, heads, S_pad, *rest]``
  (FlexAttention's ``[B, heads, S, D]``).

The grid part of the input may also be given flattened in raster order
(``[B, S, ...]`` / ``[B, heads, S, ...]`` with ``S = prod(grid)``); pass
``flat=True`` to :func:`unpermute` to get that form back.

Both directions make one pass over memory (a strided copy per combination of
full / partial tiles per axis, at most ``2**ndim`` copies) and are
differentiable.

Dilation folding
----------------
With dilation ``d_a``, coordinate ``i`` belongs to group ``i % d_a`` at index
``i // d_a`` inside the group. :func:`fold_dilation` moves the groups into the
batch: ``[B, *grid, *rest]`` -> ``[B * prod(d), *ceil(L/d), *rest]``, batch
index ``((b * d_0 + g_0) * d_1 + g_1) * d_2 + g_2``. Groups have unequal
lengths when ``d_a`` does not divide ``L_a``: group ``g`` has
``L_a // d_a + (1 if g < L_a % d_a else 0)`` tokens. Every group is padded with
zeros at its end to ``ceil(L_a / d_a)``; :class:`DilationLayout` remembers the
original grid and reports each group's true length
(:meth:`DilationLayout.group_lengths`), which a consumer must use as the axis
length of that group (the window rule is applied per group with its own
length, and the trailing padding token of a short group is nobody's
neighbour). :func:`unfold_dilation` drops that padding, so the round trip is exact.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

from . import _permute_triton
from .spec import normalize_axes, unravel

__all__ = [
    "TileLayout",
    "DilationLayout",
    "make_tile_layout",
    "permute",
    "unpermute",
    "fold_dilation",
    "unfold_dilation",
    "tile_major_coords",
    "tile_major_index",
    "coords_valid",
    "unravel_open",
    "default_tile",
]

IntLike = Union[int, Tensor]


def _grid_tuple(grid: Union[int, Sequence[int]]) -> tuple[int, ...]:
    g = (int(grid),) if isinstance(grid, int) else tuple(int(n) for n in grid)
    if not 1 <= len(g) <= 3:
        raise ValueError(f"grid must have 1, 2 or 3 axes, got {len(g)}: {g}")
    for axis, n in enumerate(g):
        if n < 1:
            raise ValueError(f"grid[{axis}] (axis {axis}) must be >= 1, got {n}")
    return g


@dataclass(frozen=True)
class TileLayout:
    """A grid in tile-major order: what :func:`permute` did, so :func:`unpermute` can undo it.

    Attributes:
        grid: the original token grid, outermost axis first.
        tile: tile size per axis.
        tiles: number of tiles per axis (``ceil(grid / tile)``).
    """

    grid: tuple[int, ...]
    tile: tuple[int, ...]
    tiles: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.grid)

    @property
    def padded_grid(self) -> tuple[int, ...]:
        return tuple(n * t for n, t in zip(self.tiles, self.tile))

    @property
    def tile_volume(self) -> int:
        return math.prod(self.tile)

    @property
    def num_tokens(self) -> int:
        """Tokens of the padded grid (the tile-major sequence length)."""
        return math.prod(self.padded_grid)

    @property
    def num_valid(self) -> int:
        return math.prod(self.grid)

    @property
    def is_padded(self) -> bool:
        return self.padded_grid != self.grid


def make_tile_layout(grid: Union[int, Sequence[int]], tile: Union[int, Sequence[int]]) -> TileLayout:
    """Validate ``tile`` against ``grid`` and return the :class:`TileLayout`.

    A tile may be larger than its axis (the axis is then padded to one tile).
    """
    g = _grid_tuple(grid)
    t = normalize_axes(tile, len(g), "tile")
    for axis, n in enumerate(t):
        if n < 1:
            raise ValueError(f"tile[{axis}] (axis {axis}) must be >= 1, got {n}")
    return TileLayout(g, t, tuple(-(-n // s) for n, s in zip(g, t)))


def default_tile(grid: Sequence[int], block_size: int = 128) -> tuple[int, ...]:
    """A tile of ``block_size`` tokens shaped for the rank of ``grid``.

    1-D: ``(block_size,)``; 2-D: ``(block_size // 8, 8)`` (16x8 for 128);
    3-D: ``(block_size // 64, 8, 8)`` (2x8x8 for 128). Square-ish tiles in the
    inner axes keep the union of windows of a tile small on every axis, so a
    tile visits few KV tiles; 8 along the innermost axes divides the strides
    of the usual video / image configs (multiples of 8), which keeps them
    perfectly block-sparse. Axes shorter than the proposed size are not
    shrunk: the tile volume must stay equal to the block size so that one
    tile is one flex block.
    """
    n = len(grid)
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if n == 1:
        return (block_size,)
    if n == 2:
        inner = min(8, block_size)
        return (block_size // inner, inner)
    inner = min(8, int(math.isqrt(block_size)))
    return (block_size // (inner * inner), inner, inner)


# ---------------------------------------------------------------------------
# Index helpers (tensor ops only: usable inside mask_mods and under vmap).


def tile_major_coords(index: Tensor, tile: Sequence[IntLike], tiles: Sequence[IntLike]) -> list[Tensor]:
    """Tile-major position -> one grid coordinate tensor per axis.

    ``tile`` and ``tiles`` may be ints or 0-d integer tensors (e.g. captured by
    a mask_mod, so the compiled mask does not specialise on them). Positions
    of padding tokens, and positions past the padded grid, give coordinates
    ``>= grid`` on some axis; check with :func:`coords_valid`.
    """
    volume = tile[0]
    for t in tile[1:]:
        volume = volume * t
    tile_index = index // volume
    inner = index % volume
    t_coords = unravel_open(tile_index, tiles)
    r_coords = unravel(inner, tile)
    return [tc * t + rc for tc, t, rc in zip(t_coords, tile, r_coords)]


def unravel_open(index: Tensor, grid: Sequence[IntLike]) -> list[Tensor]:
    """Raster index -> coordinates, without wrapping the outermost axis.

    Like :func:`gna_flex.spec.unravel`, except that an index past the end of
    the grid maps to a coordinate ``>= grid[0]`` on axis 0 (so it is invalid
    under :func:`coords_valid`) instead of wrapping around.
    """
    coords = []
    rest = index
    for n in reversed(grid[1:]):
        coords.append(rest % n)
        rest = rest // n
    coords.append(rest)
    return coords[::-1]


def tile_major_index(coords: Sequence[Tensor], tile: Sequence[IntLike], tiles: Sequence[IntLike]) -> Tensor:
    """Grid coordinates -> tile-major position (inverse of :func:`tile_major_coords`)."""
    tile_index = None
    inner = None
    for c, t, nt in zip(coords, tile, tiles):
        tile_index = c // t if tile_index is None else tile_index * nt + c // t
        inner = c % t if inner is None else inner * t + c % t
    volume = tile[0]
    for t in tile[1:]:
        volume = volume * t
    return tile_index * volume + inner


def coords_valid(coords: Sequence[Tensor], grid: Sequence[IntLike]) -> Tensor:
    """Bool tensor: the coordinates lie inside ``grid`` (not a padding token)."""
    out = None
    for c, n in zip(coords, grid):
        v = c < n
        out = v if out is None else out & v
    return out


# ---------------------------------------------------------------------------
# Permutation.


def _split_dims(x: Tensor, ndim: int, heads_last: bool, flat: bool, grid: tuple[int, ...], name: str) -> int:
    """Number of leading (batch-like) dims before the grid; validates the grid part of ``x``."""
    lead = 1 if heads_last else 2
    if flat:
        if x.dim() < lead + 1 or x.shape[lead] != math.prod(grid):
            raise ValueError(
                f"{name} of shape {tuple(x.shape)}: dim {lead} must hold the {math.prod(grid)} tokens of grid {grid}"
            )
        return lead
    if x.dim() < lead + ndim or tuple(x.shape[lead : lead + ndim]) != grid:
        raise ValueError(
            f"{name} of shape {tuple(x.shape)}: dims {lead}..{lead + ndim - 1} must be the grid {grid} "
            f"({'[B, *grid, heads, D]' if heads_last else '[B, heads, *grid, D]'})"
        )
    return lead


def _regions(layout: TileLayout):
    """Per axis, the full-tile region and the partial last tile: (tile range, inner range) pairs."""
    per_axis = []
    for n, t in zip(layout.grid, layout.tile):
        full, rem = divmod(n, t)
        regions = []
        if full:
            regions.append(((0, full), (0, t)))
        if rem:
            regions.append(((full, full + 1), (0, rem)))
        per_axis.append(regions)
    return itertools.product(*per_axis)


def _is_raster(layout: TileLayout, extra: int) -> bool:
    """Whether tile-major order is raster order (no padding, no extra, tiles span every axis but the first)."""
    return not layout.is_padded and not extra and layout.tile[1:] == layout.grid[1:]


def permute(
    x: Tensor,
    grid: Union[int, Sequence[int]],
    tile: Union[int, Sequence[int]],
    *,
    heads_last: bool = True,
    flat: bool | None = None,
    extra: int = 0,
) -> tuple[Tensor, TileLayout]:
    """Reorder a grid of tokens into tile-major order, zero-padding to whole tiles.

    Args:
        x: ``[B, *grid, *rest]`` (``heads_last=True``, NATTEN's layout) or
            ``[B, heads, *grid, *rest]`` (``heads_last=False``); the grid part
            may be flattened to raster order (``[B, S, *rest]`` /
            ``[B, heads, S, *rest]``).
        grid: the token grid.
        tile: tile size per axis (int or tuple).
        flat: whether the grid part of ``x`` is flattened; ``None`` infers it
            (flattened when ``x`` has one grid dim for a multi-axis grid).
        extra: zero tokens appended after the grid tokens (room for the
            caller's extra / global tokens, or padding to a block multiple),
            so that no second copy is needed.

    Returns:
        ``(y, layout)`` with ``y`` of shape ``[B, S_pad + extra, *rest]`` or
        ``[B, heads, S_pad + extra, *rest]`` and the :class:`TileLayout` that
        :func:`unpermute` needs. When the order does not change (e.g. 1-D
        without padding and ``extra == 0``) ``y`` may be a view of ``x``
        rather than a copy: clone it before writing into it.

    CUDA tensors in the heads-last layout whose per-token payload
    (``*rest``) is contiguous move through one Triton copy kernel
    (:mod:`gna_flex._permute_triton`, padding and ``extra`` zeroed in the
    same pass); everything else through strided torch copies. Both give the
    same values; both are differentiable.
    """
    layout = make_tile_layout(grid, tile)
    g = layout.grid
    n = layout.ndim
    lead = 1 if heads_last else 2
    if flat is None:
        flat = tuple(x.shape[lead : lead + n]) != g and x.dim() > lead and x.shape[lead] == math.prod(g)
    lead = _split_dims(x, n, heads_last, flat, g, "x")
    if flat:
        x = x.unflatten(lead, g)
    lead_shape = tuple(x.shape[:lead])
    rest = tuple(x.shape[lead + n :])
    if extra < 0:
        raise ValueError(f"extra must be >= 0, got {extra}")
    if lead == 1 and not _is_raster(layout, extra):
        y = _permute_triton.permute_tokens(x, layout, extra)
        if y is not None:
            return y, layout
    if not layout.is_padded and not extra:
        shape = lead_shape + sum(((nt, t) for nt, t in zip(layout.tiles, layout.tile)), ()) + rest
        y = x.reshape(shape)
        order = list(range(lead)) + [lead + 2 * a for a in range(n)] + [lead + 2 * a + 1 for a in range(n)]
        order += list(range(lead + 2 * n, y.dim()))
        y = y.permute(order).reshape(lead_shape + (layout.num_tokens,) + rest)
        return y, layout
    out = x.new_zeros(lead_shape + (layout.num_tokens + extra,) + rest)
    y = out.narrow(lead, 0, layout.num_tokens).unflatten(lead, layout.tiles + layout.tile)
    for region in _regions(layout):
        src = x
        dst = y
        for a, ((t0, t1), (r0, r1)) in enumerate(region):
            lo = t0 * layout.tile[a] + r0
            hi = (t1 - 1) * layout.tile[a] + r1
            src = src.narrow(lead + a, lo, hi - lo)
            dst = dst.narrow(lead + a, t0, t1 - t0).narrow(lead + n + a, r0, r1 - r0)
        src = src.unflatten(lead, (region[0][0][1] - region[0][0][0], -1))
        for a in range(1, n):
            t0, t1 = region[a][0]
            src = src.unflatten(lead + 2 * a, (t1 - t0, -1))
        order = list(range(lead)) + [lead + 2 * a for a in range(n)] + [lead + 2 * a + 1 for a in range(n)]
        order += list(range(lead + 2 * n, src.dim()))
        dst.copy_(src.permute(order))
    return out, layout


def unpermute(y: Tensor, layout: TileLayout, *, heads_last: bool = True, flat: bool = False) -> Tensor:
    """Inverse of :func:`permute`: tile-major ``[B, S_pad, *rest]`` -> ``[B, *grid, *rest]``.

    With ``heads_last=False`` the shapes are ``[B, heads, S_pad, *rest]`` ->
    ``[B, heads, *grid, *rest]``. Padding tokens are dropped. ``flat=True``
    returns the grid flattened in raster order (``[B, S, *rest]``).
    """
    lead = 1 if heads_last else 2
    n = layout.ndim
    if y.dim() < lead + 1 or y.shape[lead] != layout.num_tokens:
        raise ValueError(
            f"y of shape {tuple(y.shape)}: dim {lead} must hold the {layout.num_tokens} tile-major tokens of {layout}"
        )
    lead_shape = tuple(y.shape[:lead])
    rest = tuple(y.shape[lead + 1 :])
    if lead == 1 and not _is_raster(layout, 0):
        x = _permute_triton.unpermute_tokens(y, layout)
        if x is not None:
            return x.flatten(1, n) if flat else x
    y = y.reshape(lead_shape + layout.tiles + layout.tile + rest)
    # [*lead, nt_0.., T_0.., *rest] -> [*lead, nt_0, T_0, nt_1, T_1, ..., *rest]
    order = list(range(lead)) + [lead + k for a in range(n) for k in (a, n + a)]
    order += list(range(lead + 2 * n, y.dim()))
    if not layout.is_padded:
        x = y.permute(order).reshape(lead_shape + layout.grid + rest)
    else:
        x = y.new_empty(lead_shape + layout.grid + rest)
        for region in _regions(layout):
            src = y
            dst = x
            for a, ((t0, t1), (r0, r1)) in enumerate(region):
                lo = t0 * layout.tile[a] + r0
                hi = (t1 - 1) * layout.tile[a] + r1
                src = src.narrow(lead + a, t0, t1 - t0).narrow(lead + n + a, r0, r1 - r0)
                dst = dst.narrow(lead + a, lo, hi - lo)
            for a in reversed(range(n)):
                dst = dst.unflatten(lead + a, (region[a][0][1] - region[a][0][0], -1))
            dst.copy_(src.permute(order))
    if flat:
        x = x.flatten(lead, lead + n - 1)
    return x


# ---------------------------------------------------------------------------
# Dilation folding.


@dataclass(frozen=True)
class DilationLayout:
    """What :func:`fold_dilation` did: original grid, dilation, folded grid."""

    grid: tuple[int, ...]
    dilation: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.grid)

    @property
    def folded_grid(self) -> tuple[int, ...]:
        """Per-axis group length after padding: ``ceil(L / d)``."""
        return tuple(-(-n // d) for n, d in zip(self.grid, self.dilation))

    @property
    def groups(self) -> int:
        return math.prod(self.dilation)

    def group_lengths(self, axis: int) -> tuple[int, ...]:
        """True length of every dilation group ``0..d-1`` on ``axis`` (before padding)."""
        n, d = self.grid[axis], self.dilation[axis]
        return tuple(n // d + (1 if g < n % d else 0) for g in range(d))


def fold_dilation(
    x: Tensor, grid: Union[int, Sequence[int]], dilation: Union[int, Sequence[int]], *, heads_last: bool = True
) -> tuple[Tensor, DilationLayout]:
    """Move dilation groups into the batch dim.

    ``[B, *grid, *rest]`` -> ``[B * prod(d), *ceil(grid / d), *rest]`` (or, with
    ``heads_last=False``, ``[B, heads, *grid, *rest]`` -> ``[B * prod(d), heads,
    *ceil(grid / d), *rest]``). Short groups are zero-padded at their end; see
    the module docstring.
    """
    g = _grid_tuple(grid)
    d = normalize_axes(dilation, len(g), "dilation")
    for axis, v in enumerate(d):
        if v < 1:
            raise ValueError(f"dilation[{axis}] (axis {axis}) must be >= 1, got {v}")
    lay = DilationLayout(g, d)
    n = len(g)
    _split_dims(x, n, True, False, g, "x") if heads_last else _split_dims(x, n, False, False, g, "x")
    # grid dims start at 1 for heads_last, 2 otherwise; heads (if first) ride along as a batch-like dim
    lead = 1 if heads_last else 2
    pads = []
    for a in reversed(range(n)):
        pads += [0, lay.folded_grid[a] * d[a] - g[a]]
    rest_n = x.dim() - lead - n
    if any(pads):
        x = torch.nn.functional.pad(x, [0, 0] * rest_n + pads)
    shape = tuple(x.shape[:lead]) + sum(((m, dd) for m, dd in zip(lay.folded_grid, d)), ()) + tuple(x.shape[lead + n :])
    x = x.reshape(shape)
    # [B, (heads,) m_0, d_0, m_1, d_1, ..., rest] -> [B, d_0, d_1, .., (heads,) m_0, m_1, .., rest]
    order = [0] + [lead + 2 * a + 1 for a in range(n)] + list(range(1, lead)) + [lead + 2 * a for a in range(n)]
    order += list(range(lead + 2 * n, x.dim()))
    x = x.permute(order)
    out_shape = (x.shape[0] * lay.groups,) + tuple(x.shape[1 + n :])
    return x.reshape(out_shape), lay


def unfold_dilation(y: Tensor, layout: DilationLayout, *, heads_last: bool = True) -> Tensor:
    """Inverse of :func:`fold_dilation` (drops the padding of short groups)."""
    n = layout.ndim
    d = layout.dilation
    lead = 1 if heads_last else 2
    if y.shape[0] % layout.groups:
        raise ValueError(f"y has batch {y.shape[0]}, not a multiple of the {layout.groups} dilation groups")
    if tuple(y.shape[lead : lead + n]) != layout.folded_grid:
        raise ValueError(f"y of shape {tuple(y.shape)}: grid dims must be the folded grid {layout.folded_grid}")
    b = y.shape[0] // layout.groups
    y = y.reshape((b,) + d + tuple(y.shape[1:]))
    # [B, d_0.., (heads,) m_0.., rest] -> [B, (heads,) m_0, d_0, m_1, d_1, .., rest]
    order = [0] + list(range(1 + n, lead + n))
    for a in range(n):
        order += [lead + n + a, 1 + a]
    order += list(range(lead + 2 * n, y.dim()))
    y = y.permute(order)
    shape = tuple(y.shape[:lead]) + tuple(m * dd for m, dd in zip(layout.folded_grid, d)) + tuple(y.shape[lead + 2 * n :])
    y = y.reshape(shape)
    for a in range(n):
        y = y.narrow(lead + a, 0, layout.grid[a])
    return y.contiguous()
