"""FlexAttention score_mods for GNA: relative positional bias (RPB).

Indexing
--------
For a grid query ``q`` and a grid key ``k`` that are neighbours, on every axis
``a`` both lie in the same dilation group and the key's offset from the query
in group units is ``o_a = k_a // d_a - q_a // d_a``. Every query lies inside
its own window (the rule guarantees it), so ``-(w_a - 1) <= o_a <= w_a - 1``
and the bias is

    table[h, o_0 + w_0 - 1, o_1 + w_1 - 1, ...]

This is NATTEN's convention: its "bias start" (``w - 1 - (query - window
start)``) plus the key's index in the window equals ``o + w - 1``. With
causal axes only ``o_a <= 0`` occurs, so half of that axis of the table is
unused. Pairs that are not both grid tokens (extra or padding tokens) get no
bias; pairs outside the window are masked by the mask_mod anyway (their
index is clamped into the table so the lookup stays in bounds).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .flex import mask_spec
from .layout import coords_valid, tile_major_coords
from .spec import unravel

__all__ = ["relative_position_bias", "rpb_index"]


def rpb_index(q_coords, k_coords, kernel_size, dilation) -> list[Tensor]:
    """Per-axis table index ``k // d - q // d + w - 1`` (clamped to ``[0, 2w - 2]``).

    ``kernel_size`` holds Python ints (the table's shape fixes them anyway);
    ``dilation`` may hold ints or 0-d tensors.
    """
    out = []
    for q, k, w, d in zip(q_coords, k_coords, kernel_size, dilation):
        out.append(torch.clamp(k // d - q // d + (w - 1), 0, 2 * w - 2))
    return out


def relative_position_bias(
    table: Tensor,
    grid,
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    tile=None,
    extra_tokens: int = 0,
) -> Callable:
    """A score_mod adding NATTEN-style relative positional bias.

    Args:
        table: ``[heads, *(2 * kernel_size - 1)]`` learnable bias (one entry
            per axis of the grid); gradients flow to it through flex's
            backward (and through eager flex on CPU).
        grid, kernel_size, stride, dilation, is_causal: the GNA parameters
            (validated as in :func:`gna_flex.spec.make_params`; stride and
            causal do not change the indexing, only which pairs the mask allows).
        tile: token order, ``None`` for raster order, else the tile-major tile
            (must match the mask's order).
        extra_tokens: extra tokens after the grid tokens (they get no bias).

    Returns:
        ``score_mod(score, b, h, q_idx, kv_idx)``; use it with the matching
        :func:`gna_flex.flex.block_mask`.
    """
    spec = mask_spec(grid, kernel_size, stride, dilation, is_causal, tile, extra_tokens)
    params = spec.params
    n = params.ndim
    want = tuple(2 * w - 1 for w in params.kernel_size)
    if not isinstance(table, Tensor) or table.dim() != n + 1 or tuple(table.shape[1:]) != want:
        shape = tuple(table.shape) if isinstance(table, Tensor) else type(table).__name__
        raise ValueError(f"table must have shape [heads, {', '.join(map(str, want))}] for kernel_size "
                         f"{params.kernel_size}, got {shape}")
    device = table.device
    p = torch.tensor(
        [params.grid, params.kernel_size, params.dilation, spec.order_tile, spec.order_tiles],
        dtype=torch.int32,  # like flex's indices: keeps the per-element math 32-bit
        device=device,
    )
    grid_tokens = torch.tensor(spec.grid_tokens, dtype=torch.int32, device=device)
    raster = spec.tile is None

    def coords(idx: Tensor):
        grid_t = [p[0, a] for a in range(n)]
        if raster:
            c = unravel(idx, grid_t)
            return c, idx < grid_tokens
        c = tile_major_coords(idx, [p[3, a] for a in range(n)], [p[4, a] for a in range(n)])
        return c, coords_valid(c, grid_t) & (idx < grid_tokens)

    def rpb_score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        qc, q_ok = coords(q_idx)
        kc, k_ok = coords(kv_idx)
        idx = rpb_index(qc, kc, params.kernel_size, [p[2, a] for a in range(n)])
        bias = table[(h, *idx)]
        return torch.where(q_ok & k_ok, score + bias, score)

    return rpb_score_mod
