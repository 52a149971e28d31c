"""Validation of attention inputs in NATTEN's layout, shared by every backend.

Layout: ``query`` is ``[B, *grid, heads, D]``; ``key`` and ``value`` are
``[B, *grid, heads_kv, D]`` (``value`` may have its own head dim ``Dv``);
optional ``additional_keys`` / ``additional_values`` are
``[B, E, heads_kv, D]`` / ``[B, E, heads_kv, Dv]``. ``heads_kv`` divides
``heads`` (GQA/MQA: query head ``h`` uses kv head ``h // (heads // heads_kv)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from .spec import BoolOrTuple, GNAParams, IntOrTuple, make_params

__all__ = ["AttentionShape", "check_inputs", "check_inputs_for"]


@dataclass(frozen=True)
class AttentionShape:
    """Sizes read off validated inputs."""

    batch: int
    grid: tuple[int, ...]
    heads: int
    heads_kv: int
    head_dim: int
    head_dim_v: int
    num_extra: int


def _check_tensor(t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def _check_like_query(t: Tensor, name: str, query: Tensor) -> None:
    """``t`` shares the query's dtype, device and batch size (the checks every other input gets)."""
    if t.dtype != query.dtype:
        raise TypeError(f"{name} dtype {t.dtype} differs from query dtype {query.dtype}")
    if t.device != query.device:
        raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
    if t.shape[0] != query.shape[0]:
        raise ValueError(f"{name} batch {t.shape[0]} differs from query batch {query.shape[0]}")


def check_inputs(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    additional_keys: Optional[Tensor] = None,
    additional_values: Optional[Tensor] = None,
    ndim: Optional[int] = None,
) -> tuple[GNAParams, AttentionShape]:
    """Validate tensors and GNA arguments together; return params and sizes.

    Args:
        ndim: required number of grid axes (1, 2 or 3), or None to infer it
            from ``query.dim() - 3``.

    Raises:
        TypeError / ValueError naming the argument, the axis or dimension, and
        what was expected.
    """
    tensors = {"query": query, "key": key, "value": value}
    for name, t in tensors.items():
        _check_tensor(t, name)
    if ndim is None:
        ndim = query.dim() - 3
        if not 1 <= ndim <= 3:
            raise ValueError(
                f"query must have 4, 5 or 6 dims ([B, *grid, heads, D] with 1 to 3 grid axes), "
                f"got {query.dim()} dims of shape {tuple(query.shape)}"
            )
    rank = ndim + 3
    for name, t in tensors.items():
        if t.dim() != rank:
            raise ValueError(
                f"{name} must have {rank} dims ([B, *grid({ndim} axes), heads, D]), "
                f"got {t.dim()} dims of shape {tuple(t.shape)}"
            )
    for name in ("key", "value"):
        t = tensors[name]
        _check_like_query(t, name, query)
        for axis in range(ndim):
            if t.shape[1 + axis] != query.shape[1 + axis]:
                raise ValueError(
                    f"{name} grid axis {axis} has size {t.shape[1 + axis]} but query has "
                    f"{query.shape[1 + axis]}; query, key and value must share the token grid"
                )
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key head dim {key.shape[-1]} differs from query head dim {query.shape[-1]}")
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(f"value has {value.shape[-2]} heads but key has {key.shape[-2]}")
    heads, heads_kv = query.shape[-2], key.shape[-2]
    if heads_kv < 1 or heads % heads_kv != 0:
        raise ValueError(
            f"key/value heads ({heads_kv}) must divide query heads ({heads}) for GQA/MQA"
        )
    grid = tuple(int(n) for n in query.shape[1 : 1 + ndim])
    if any(n < 1 for n in grid) or query.shape[0] < 1:
        raise ValueError(f"query has an empty batch or grid axis: shape {tuple(query.shape)}")
    params = make_params(grid, kernel_size, stride, dilation, is_causal)

    num_extra = 0
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together")
    if additional_keys is not None:
        extras = {"additional_keys": additional_keys, "additional_values": additional_values}
        for name, t in extras.items():
            _check_tensor(t, name)
            if t.dim() != 4:
                raise ValueError(f"{name} must have 4 dims [B, E, heads_kv, D], got shape {tuple(t.shape)}")
            _check_like_query(t, name, query)
            if t.shape[2] != heads_kv:
                raise ValueError(f"{name} has {t.shape[2]} heads but key has {heads_kv}")
        if additional_keys.shape[1] != additional_values.shape[1]:
            raise ValueError(
                f"additional_keys has {additional_keys.shape[1]} tokens but additional_values has "
                f"{additional_values.shape[1]}"
            )
        if additional_keys.shape[-1] != query.shape[-1]:
            raise ValueError(
                f"additional_keys head dim {additional_keys.shape[-1]} differs from query head dim {query.shape[-1]}"
            )
        if additional_values.shape[-1] != value.shape[-1]:
            raise ValueError(
                f"additional_values head dim {additional_values.shape[-1]} differs from value head dim "
                f"{value.shape[-1]}"
            )
        num_extra = int(additional_keys.shape[1])
    shape = AttentionShape(
        batch=int(query.shape[0]),
        grid=grid,
        heads=int(heads),
        heads_kv=int(heads_kv),
        head_dim=int(query.shape[-1]),
        head_dim_v=int(value.shape[-1]),
        num_extra=num_extra,
    )
    return params, shape


def check_inputs_for(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    params: GNAParams,
    additional_keys: Optional[Tensor] = None,
    additional_values: Optional[Tensor] = None,
) -> AttentionShape:
    """:func:`check_inputs` for a backend handed validated :class:`GNAParams`.

    Raises as :func:`check_inputs`, and ``ValueError`` when the tensors' grid
    is not ``params.grid``.
    """
    if not isinstance(params, GNAParams):
        raise TypeError(f"params must be a gna_flex.spec.GNAParams (see make_params), got {type(params).__name__}")
    checked, shape = check_inputs(
        query, key, value, params.kernel_size, params.stride, params.dilation, params.is_causal,
        additional_keys, additional_values, ndim=params.ndim,
    )
    if checked.grid != params.grid:
        raise ValueError(f"query grid {checked.grid} differs from params.grid {params.grid}")
    return shape
