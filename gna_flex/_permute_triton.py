"""Tile-major token permutation as one Triton copy kernel per tensor (CUDA).

:func:`gna_flex.layout.permute` / :func:`~gna_flex.layout.unpermute` in
NATTEN's heads-last layout move whole tokens: each token's payload
(``heads * D`` elements, contiguous) goes from its grid position to its
tile-major index. Expressed as a strided ``copy_`` of a 7- to 9-dimensional
permuted view, torch's copy kernel decodes every element's offset through all
those dims and runs at a fraction of the copy bandwidth; here one program
decodes the positions of ``BLOCK_T`` tokens once and moves their payloads as
``[BLOCK_T, BLOCK_P]`` tiles of contiguous loads and stores. Padding tokens
(grid not a tile multiple) and the ``extra`` tail are written as zeros in the
same pass, so no zero-fill pass precedes the copy.

Grids of 1 to 3 axes are handled as 3-D grids with leading axes of size 1.
Autograd: each direction's backward is the other direction.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; CPU-only installs lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only installs
    triton = None

__all__ = ["available", "permute_tokens", "unpermute_tokens"]

_BLOCK_T = 8
_BLOCK_P = 512
# Off: layout falls back to torch's strided copies (benchmarks compare the two).
ENABLED = True


def available(x: Tensor) -> bool:
    """Whether the Triton path can move ``x`` (CUDA tensor, Triton importable, :data:`ENABLED`)."""
    return ENABLED and triton is not None and x.is_cuda


if triton is not None:

    @triton.jit
    def _tile_major_copy(
        src, dst, n_dst_tokens, n_tokens, payload,
        src_b, src_s0, src_s1, src_s2, dst_b, dst_s0, dst_s1, dst_s2,
        g0, g1, g2, n1, n2, t0, t1, t2,
        TO_TILES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        # One token index j per row: its tile-major index (TO_TILES: j runs over
        # the destination) or raster index (else: j runs over the destination grid).
        j = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        b = tl.program_id(2).to(tl.int64)
        if TO_TILES:
            vol = t0 * t1 * t2
            tid = j // vol
            r = j % vol
            c2 = (tid % n2) * t2 + r % t2
            c1 = ((tid // n2) % n1) * t1 + (r // t2) % t1
            c0 = (tid // (n1 * n2)) * t0 + r // (t1 * t2)
            valid = (j < n_tokens) & (c0 < g0) & (c1 < g1) & (c2 < g2)
            src_tok = c0.to(tl.int64) * src_s0 + c1.to(tl.int64) * src_s1 + c2.to(tl.int64) * src_s2
            dst_tok = j.to(tl.int64) * dst_s2
        else:
            c2 = j % g2
            c1 = (j // g2) % g1
            c0 = j // (g1 * g2)
            tid = ((c0 // t0) * n1 + c1 // t1) * n2 + c2 // t2
            r = ((c0 % t0) * t1 + c1 % t1) * t2 + c2 % t2
            valid = j < n_dst_tokens
            src_tok = (tid * (t0 * t1 * t2) + r).to(tl.int64) * src_s2
            dst_tok = c0.to(tl.int64) * dst_s0 + c1.to(tl.int64) * dst_s1 + c2.to(tl.int64) * dst_s2
        in_row = p < payload
        x = tl.load(src + b * src_b + src_tok[:, None] + p[None, :], mask=valid[:, None] & in_row[None, :], other=0)
        tl.store(dst + b * dst_b + dst_tok[:, None] + p[None, :], x, mask=(j < n_dst_tokens)[:, None] & in_row[None, :])


def _grid3(values, fill: int) -> list[int]:
    values = list(values)
    return [fill] * (3 - len(values)) + values


def _launch(src: Tensor, dst: Tensor, n_dst_tokens: int, n_tokens: int, payload: int, src_strides, dst_strides,
            grid, tiles, tile, to_tiles: bool) -> None:
    g0, g1, g2 = _grid3(grid, 1)
    _, n1, n2 = _grid3(tiles, 1)
    t0, t1, t2 = _grid3(tile, 1)
    launch = (triton.cdiv(n_dst_tokens, _BLOCK_T), triton.cdiv(payload, _BLOCK_P), src.shape[0])
    _tile_major_copy[launch](
        src, dst, n_dst_tokens, n_tokens, payload, *src_strides, *dst_strides,
        g0, g1, g2, n1, n2, t0, t1, t2, TO_TILES=to_tiles, BLOCK_T=_BLOCK_T, BLOCK_P=_BLOCK_P,
    )


def _token_strides(x: Tensor, ndim: int) -> Optional[list[int]]:
    """``[batch, s0, s1, s2]`` element strides of ``x [B, *grid, *rest]``, or None if a token's payload is not contiguous."""
    rest = x.shape[1 + ndim :]
    expected = 1
    for size, stride in zip(reversed(rest), reversed(x.stride()[1 + ndim :])):
        if size != 1 and stride != expected:
            return None
        expected *= size
    return [x.stride(0)] + _grid3(x.stride()[1 : 1 + ndim], 0)


def _to_tiles(x: Tensor, layout, extra: int) -> Tensor:
    n = layout.ndim
    rest = tuple(x.shape[1 + n :])
    payload = math.prod(rest)
    y = x.new_empty((x.shape[0], layout.num_tokens + extra) + rest)
    if y.numel():
        strides = _token_strides(x, n)
        _launch(x, y, layout.num_tokens + extra, layout.num_tokens, payload, strides,
                [y.stride(0), 0, 0, payload], layout.grid, layout.tiles, layout.tile, True)
    return y


def _from_tiles(y: Tensor, layout) -> Tensor:
    n = layout.ndim
    rest = tuple(y.shape[2:])
    payload = math.prod(rest)
    y = y if _token_strides(y, 1) is not None else y.contiguous()
    x = y.new_empty((y.shape[0],) + layout.grid + rest)
    if x.numel():
        strides = [x.stride(0)] + _grid3(x.stride()[1 : 1 + n], 0)
        _launch(y, x, layout.num_valid, layout.num_tokens, payload, [y.stride(0), 0, 0, y.stride(1)], strides,
                layout.grid, layout.tiles, layout.tile, False)
    return x


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout, extra):
        ctx.layout = layout
        return _to_tiles(x, layout, extra)

    @staticmethod
    def backward(ctx, grad):
        return _from_tiles(grad[:, : ctx.layout.num_tokens], ctx.layout), None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, layout):
        ctx.layout, ctx.length = layout, y.shape[1]
        return _from_tiles(y, layout)

    @staticmethod
    def backward(ctx, grad):
        return _to_tiles(grad, ctx.layout, ctx.length - ctx.layout.num_tokens), None


# CUDA's grid limit on the launch's third dimension (one program row per batch element).
_MAX_BATCH = 65535


def permute_tokens(x: Tensor, layout, extra: int) -> Optional[Tensor]:
    """``x [B, *grid, *rest]`` -> ``[B, S_pad + extra, *rest]`` tile-major, or None when the path does not apply."""
    if not available(x) or layout.ndim > 3 or x.shape[0] > _MAX_BATCH or _token_strides(x, layout.ndim) is None:
        return None
    return _Permute.apply(x, layout, extra)


def unpermute_tokens(y: Tensor, layout) -> Optional[Tensor]:
    """``y [B, S_pad, *rest]`` tile-major -> ``[B, *grid, *rest]`` (padding dropped), or None when the path does not apply."""
    if not available(y) or layout.ndim > 3 or y.shape[0] > _MAX_BATCH:
        return None
    return _Unpermute.apply(y, layout)
