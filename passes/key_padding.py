"""Key-padding masks over the extra (text) tokens of a GNA call.

Models with padded text (HunyuanVideo) pass attention an ``attn_mask`` that
only hides padded text keys: every query sees every grid key and the same
valid text keys. Such a mask is compatible with GNA: grid queries attend to
their window plus *their batch element's* valid text keys, and text queries
keep dense attention under the model's own mask. Any other mask (one that
hides grid keys, or differs between query rows or heads) would change what
GNA computes, so it is refused with a :class:`RuntimeError`, never
approximated.

Shared by the ``gna`` pass's op (:mod:`.rewrite`) and the diffusers
processors (:mod:`gna_flex.integrations.diffusers.processors`); it imports
only torch, so both can use it.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["mask_rows", "valid_extra_keys", "per_batch_extra_keys"]


def _as_4d(attn_mask: Tensor) -> Tensor:
    if not 1 <= attn_mask.dim() <= 4:
        raise RuntimeError(
            f"GNA extra-key mask: attn_mask must have 1 to 4 dims (SDPA broadcasting), got shape "
            f"{tuple(attn_mask.shape)}"
        )
    return attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))


def _check_broadcast(m: Tensor, target: tuple[int, int, int, int], original: tuple[int, ...]) -> None:
    names = ("batch", "heads", "query", "key")
    for axis, (have, want) in enumerate(zip(m.shape, target)):
        if have not in (1, want):
            raise RuntimeError(
                f"GNA extra-key mask: attn_mask of shape {original} does not broadcast to [B, heads, Sq, Sk] = "
                f"{list(target)}: its {names[axis]} axis has {have}, allowed 1 or {want}"
            )


def valid_extra_keys(
    attn_mask: Tensor,
    batch: int,
    heads: int,
    seq_q: int,
    seq_k: int,
    grid_keys: slice,
    extra_keys: slice,
) -> Optional[Tensor]:
    """Read a key-padding mask over the extra keys; refuse anything else.

    Args:
        attn_mask: SDPA's ``attn_mask`` (SDPA broadcasting rules: trailing
            axes ``[..., Sq, Sk]``, leading ones ``[B, heads]``, each of size
            1 or full), boolean (True = attend) or additive float (0 = attend,
            ``-inf`` or the dtype's lowest value = masked). Diffusers' ``[B, S]``
            processor-level masks must be reshaped to ``[B, 1, 1, S]`` first.
        batch, heads, seq_q, seq_k: the query's ``[B, heads, Sq, ...]`` and
            the key length.
        grid_keys, extra_keys: the grid and extra segments of the key axis.

    Returns:
        ``[B, E]`` boolean tensor on the host (True = a valid extra key), or
        None when every key is valid. One device-to-host read.

    Raises:
        RuntimeError: the mask hides a grid key, differs between query rows or
            heads, has additive values other than 0 and -inf, or does not
            broadcast to ``[B, heads, Sq, Sk]``.
    """
    shape = tuple(attn_mask.shape)
    m = _as_4d(attn_mask)
    _check_broadcast(m, (batch, heads, seq_q, seq_k), shape)
    if m.dtype == torch.bool:
        allowed = m
        values_ok = torch.ones((), dtype=torch.bool, device=m.device)
    elif m.dtype.is_floating_point:
        allowed = m == 0
        masked = (m == -math.inf) | (m <= torch.finfo(m.dtype).min)
        values_ok = (allowed | masked).all()
    else:
        raise RuntimeError(
            f"GNA extra-key mask: attn_mask must be boolean or an additive float mask, got dtype {m.dtype}"
        )
    rows_ok = (allowed == allowed[:, :, :1]).all()
    heads_ok = (allowed == allowed[:, :1]).all()
    keys = allowed[:, 0, 0, :].expand(batch, seq_k)
    grid_ok = keys[:, grid_keys].all(dim=1)
    checks = torch.stack([values_ok, rows_ok, heads_ok])
    host = torch.cat([checks, grid_ok, keys[:, extra_keys].flatten()]).cpu()  # the one host read
    values_ok, rows_ok, heads_ok = (bool(x) for x in host[:3])
    if not values_ok:
        raise RuntimeError(
            "GNA extra-key mask: additive attn_mask values must be 0 (attend) or -inf / the dtype's lowest value "
            "(masked); other values reweight keys, which GNA does not do"
        )
    if not rows_ok:
        raise RuntimeError(
            f"GNA extra-key mask: attn_mask of shape {shape} differs between query rows; only a key-padding mask "
            "(the same valid keys for every query) can be combined with GNA"
        )
    if not heads_ok:
        raise RuntimeError(
            f"GNA extra-key mask: attn_mask of shape {shape} differs between heads; only a key-padding mask "
            "(the same valid keys for every head) can be combined with GNA"
        )
    grid_flags = host[3 : 3 + batch]
    if not bool(grid_flags.all()):
        bad = [i for i, ok in enumerate(grid_flags.tolist()) if not ok]
        raise RuntimeError(
            f"GNA extra-key mask: attn_mask masks grid (visual) keys of batch element(s) {bad}; GNA can only "
            "drop extra (text) keys, the grid keys are chosen by the window"
        )
    extra = host[3 + batch :].reshape(batch, -1)
    return None if bool(extra.all()) else extra


def mask_rows(attn_mask: Tensor, rows: slice, seq_q: int) -> Tensor:
    """The mask for the query rows ``rows`` of a ``seq_q``-query call (a view).

    A mask with a full query axis (``[..., Sq, Sk]``, ``Sq > 1``) is sliced
    along it; a mask broadcast over queries is returned unchanged.
    """
    if attn_mask.dim() >= 2 and seq_q > 1 and attn_mask.shape[-2] == seq_q:
        return attn_mask[..., rows, :]
    return attn_mask


def per_batch_extra_keys(
    attend: Callable[[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]], Tensor],
    query: Tensor,
    key: Tensor,
    value: Tensor,
    extra_key: Tensor,
    extra_value: Tensor,
    valid: Optional[Tensor],
) -> Tensor:
    """Run ``attend`` with each batch element's valid extra keys.

    Args:
        attend: ``(q, k, v, extra_k, extra_v) -> out`` over batch-first
            tensors (e.g. :func:`gna_flex.functional.na` with
            ``additional_keys``); ``extra_k`` is None when there are none.
        query, key, value: batch-first, ``[B, ...]``.
        extra_key, extra_value: ``[B, E, ...]``: the extra tokens.
        valid: ``[B, E]`` boolean on the host (from :func:`valid_extra_keys`),
            or None for all valid.

    Returns:
        ``attend``'s output for the whole batch. Batch elements with the same
        valid keys share one call; elements are reassembled in order with
        differentiable ops (``cat`` and an index), so autograd flows through.
    """

    def run(q: Tensor, k: Tensor, v: Tensor, ek: Tensor, ev: Tensor) -> Tensor:
        if ek.shape[1] == 0:
            return attend(q, k, v, None, None)
        return attend(q, k, v, ek, ev)

    if valid is None:
        return run(query, key, value, extra_key, extra_value)
    groups: dict[tuple[bool, ...], list[int]] = {}
    for i, row in enumerate(valid.tolist()):
        groups.setdefault(tuple(row), []).append(i)
    device = query.device
    outs, order = [], []
    for row, members in groups.items():
        cols = torch.tensor([j for j, keep in enumerate(row) if keep], device=device, dtype=torch.long)
        if len(groups) == 1:
            outs.append(run(query, key, value, extra_key.index_select(1, cols), extra_value.index_select(1, cols)))
            return outs[0]
        idx = torch.tensor(members, device=device, dtype=torch.long)
        ek = extra_key.index_select(0, idx).index_select(1, cols)
        ev = extra_value.index_select(0, idx).index_select(1, cols)
        outs.append(run(query.index_select(0, idx), key.index_select(0, idx), value.index_select(0, idx), ek, ev))
        order.extend(members)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(outs, dim=0).index_select(0, inverse.to(device))
