"""na1d / na2d / na3d: the NATTEN-compatible front door.

A NATTEN user switches by changing the import: the arguments below have
NATTEN's names, defaults and meaning, and tensors use NATTEN's heads-last
layout ``[B, *grid, heads, D]``.
"""

from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from . import ops
from .checks import check_inputs
from .spec import BoolOrTuple, IntOrTuple

__all__ = ["na", "na1d", "na2d", "na3d"]

Output = Union[Tensor, tuple[Tensor, Tensor]]


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
    backend: Optional[str] = None,
    *,
    _ndim: Optional[int] = None,
) -> Output:
    """Generalized neighborhood attention over a 1-D, 2-D or 3-D token grid.

    Args:
        query: ``[B, *grid, heads, D]``; the number of grid axes is
            ``query.dim() - 3``.
        key, value: ``[B, *grid, heads_kv, D]`` / ``[B, *grid, heads_kv, Dv]``;
            ``heads_kv`` divides ``heads`` (GQA/MQA, no copies).
        kernel_size: window size per axis (int or tuple), ``2 <= k`` and
            ``k * dilation <= grid size``.
        stride: queries per shared window per axis, ``1 <= s <= k``; 1 is
            neighborhood attention, ``kernel_size`` blocked attention.
        dilation: per axis, ``>= 1``.
        is_causal: per axis (bool or tuple of bools).
        scale: softmax scale, default ``D ** -0.5``.
        additional_keys, additional_values: ``[B, E, heads_kv, D]`` /
            ``[B, E, heads_kv, Dv]`` global tokens (e.g. text) that every query
            attends to in the same softmax as its window.
        return_lse: also return the fp32 log-sum-exp ``[B, *grid, heads]``.
        backend: None (fused kernel when it can run, else flex), ``"cutlass"``,
            ``"flex"`` or ``"reference"``.

    Returns:
        ``out`` ``[B, *grid, heads, Dv]`` in the query's dtype; with
        ``return_lse``, ``(out, lse)``.
    """
    params, shape = check_inputs(
        query, key, value, kernel_size, stride, dilation, is_causal, additional_keys, additional_values, _ndim
    )
    if scale is None:
        scale = shape.head_dim ** -0.5
    out, lse = ops.na(
        query, key, value, params, scale=float(scale), additional_keys=additional_keys,
        additional_values=additional_values, return_lse=return_lse, backend=backend,
    )
    return (out, lse) if return_lse else out


def _make(ndim: int):
    def fn(
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
        backend: Optional[str] = None,
    ) -> Output:
        return na(query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                  additional_values, return_lse, backend, _ndim=ndim)

    fn.__name__ = fn.__qualname__ = f"na{ndim}d"
    layout = {1: "[B, L, heads, D]", 2: "[B, H, W, heads, D]", 3: "[B, T, H, W, heads, D]"}[ndim]
    fn.__doc__ = (
        f"{ndim}-D generalized neighborhood attention; ``query`` is {layout}.\n\n"
        f"Arguments and returns as :func:`gna_flex.functional.na` with {ndim} grid "
        f"ax{'i' if ndim == 1 else 'e'}s; per-axis arguments take an int or a {ndim}-tuple."
    )
    return fn


na1d = _make(1)
na2d = _make(2)
na3d = _make(3)
