"""Dense masked attention from the one rule: the oracle for every other path.

Memory is O(S * (S + E)) per head, so use it for small problems and tests.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .checks import check_inputs
from .spec import BoolOrTuple, GNAParams, IntOrTuple, neighbors, unravel

__all__ = ["na", "dense_mask"]


def dense_mask(params: GNAParams, extra_tokens: int = 0, device: Union[str, torch.device, None] = None) -> Tensor:
    """The GNA mask in raster order, ``[S + E, S + E]`` bool (True = attend).

    Rows are queries, columns keys; the ``S`` grid tokens come first in raster
    (row-major) order, then the ``E`` extra tokens. Grid queries see their
    window plus every extra key; extra queries see every key.
    """
    s = params.num_tokens
    idx = torch.arange(s, device=device)
    q = unravel(idx[:, None], params.grid)
    k = unravel(idx[None, :], params.grid)
    grid_mask = neighbors(params, q, k)
    if extra_tokens == 0:
        return grid_mask
    n = s + extra_tokens
    full = torch.ones(n, n, dtype=torch.bool, device=device)
    full[:s, :s] = grid_mask
    return full


def na(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    scale: Optional[float] = None,
    additional_keys: Optional[Tensor] = None,
    additional_values: Optional[Tensor] = None,
    return_lse: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Reference GNA: dense attention under the exact GNA mask.

    Args:
        query: ``[B, *grid, heads, D]`` with 1 to 3 grid axes.
        key, value: ``[B, *grid, heads_kv, D]`` / ``[B, *grid, heads_kv, Dv]``;
            ``heads_kv`` divides ``heads``.
        kernel_size, stride, dilation, is_causal: the GNA parameters (int/bool
            or one per axis), see :func:`gna_flex.spec.make_params`.
        scale: softmax scale, default ``D ** -0.5``.
        additional_keys, additional_values: ``[B, E, heads_kv, D]`` /
            ``[B, E, heads_kv, Dv]`` global tokens every query attends to, in
            the same softmax as its window.
        return_lse: also return the log-sum-exp of the scaled scores.
        compute_dtype: ``torch.float32`` (default) or ``torch.float64``.

    Returns:
        ``out`` of shape ``[B, *grid, heads, Dv]`` in ``compute_dtype``, and if
        ``return_lse``, ``lse`` of shape ``[B, *grid, heads]`` in ``compute_dtype``.
    """
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    params, shape = check_inputs(
        query, key, value, kernel_size, stride, dilation, is_causal, additional_keys, additional_values
    )
    b, heads, group = shape.batch, shape.heads, shape.heads // shape.heads_kv
    s = params.num_tokens
    if scale is None:
        scale = shape.head_dim ** -0.5

    def flat(t: Tensor, n: int) -> Tensor:  # [B, n, h, d] -> [B, heads, n, d]
        t = t.reshape(b, n, t.shape[-2], t.shape[-1]).to(compute_dtype).transpose(1, 2)
        return t.repeat_interleave(group, dim=1) if t.shape[1] != heads else t

    q = flat(query, s)
    k, v = flat(key, s), flat(value, s)
    if additional_keys is not None:
        e = shape.num_extra
        k = torch.cat([k, flat(additional_keys, e)], dim=2)
        v = torch.cat([v, flat(additional_values, e)], dim=2)
    mask = dense_mask(params, shape.num_extra, device=query.device)[:s]
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ v
    out = out.transpose(1, 2).reshape(b, *params.grid, heads, shape.head_dim_v)
    if return_lse:
        return out, lse.transpose(1, 2).reshape(b, *params.grid, heads)
    return out
