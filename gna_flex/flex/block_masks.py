"""The analytic FlexAttention ``BlockMask`` of GNA, and the marker it carries.

:func:`block_mask` builds the ``BlockMask`` analytically. A contiguous block
of token positions is a union of a few boxes (products of per-axis
coordinate ranges) in both token orders (see :mod:`gna_flex.flex.masks`),
and the neighbour relation is a product over axes, so for a Q box and a KV
box "some pair is a neighbour" and "every pair is a neighbour" factor into
per-axis questions about coordinate ranges. Windows of consecutive queries
of one dilation group have monotone starts and ends, and consecutive windows
overlap or touch (``stride <= kernel_size``), so the union of the windows of
a query range is the interval ``[start(first), end(last))`` and their
intersection is ``[start(last), end(first))``. The per-axis answers are a
handful of comparisons per (Q block, KV block) pair; no token pair is ever
evaluated. The work is proportional to ``nQ * nK`` block pairs, the size of
the ``BlockMask`` index tensors torch itself uses.

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

import copy
import functools
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, noop_mask

from ..spec import GNAParams, axis_windows
from .masks import _MARKER, MaskSpec, _cached_mask_mod, _device_key, _mask_impl, mask_spec

__all__ = ["block_mask", "kernel_block_mask", "has_partial_blocks", "gna_params_of", "DEFAULT_BLOCK_SIZE"]

DEFAULT_BLOCK_SIZE = 128


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
    bm._gna_has_partial = bool(partial.any())
    marker = (spec.params, spec.tile, spec.extra_tokens)
    setattr(bm, _MARKER, marker)
    for value in vars(bm).values():
        if isinstance(value, Tensor):
            setattr(value, _MARKER, marker)
    return bm


def has_partial_blocks(bm: BlockMask) -> bool:
    """Whether a mask from :func:`block_mask` has a partial block (True for masks from elsewhere)."""
    return getattr(bm, "_gna_has_partial", True)


def kernel_block_mask(bm: BlockMask, kernel_options: Optional[dict] = None) -> BlockMask:
    """The mask a compiled flex kernel needs: ``bm`` itself, or a mask_mod-free twin.

    When :func:`block_mask` found no partial block, the Triton kernel never
    calls the mask_mod (every visited block is full), so the twin (the same
    block tensors and marker, ``noop_mask`` as its mask_mod) gives the same
    result with the partial-block path compiled down to nothing: fewer
    registers and less shared-memory scratch in the kernel. Only for compiled
    flex: eager flex ignores the block lists and evaluates the mask_mod
    everywhere. With ``kernel_options["BACKEND"] == "FLASH"`` the mask is
    returned unchanged: torch's FLASH backend drops the block lists of a
    mask whose mask_mod is a no-op and would run dense attention (the CuTe
    kernel skips the mask_mod on full blocks anyway).
    """
    if has_partial_blocks(bm) or (kernel_options or {}).get("BACKEND") == "FLASH":
        return bm
    twin = bm.__dict__.get("_gna_kernel_twin")
    if twin is None:
        twin = copy.copy(bm)
        twin.mask_mod = noop_mask
        bm._gna_kernel_twin = twin._gna_kernel_twin = twin
    return twin


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
            as in :func:`~gna_flex.flex.masks.mask_mod` (the token order and the mask).
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
            (see :func:`~gna_flex.flex.masks.mask_mod`); the block tensors do not depend on it.

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
    mask_mod from :func:`~gna_flex.flex.masks.mask_mod`, or a tensor such a mask_mod captures.
    """
    marker = getattr(mask, _MARKER, None)
    if marker is None and isinstance(mask, BlockMask):
        marker = getattr(mask.mask_mod, _MARKER, None)
    return marker
