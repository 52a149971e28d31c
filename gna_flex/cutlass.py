"""The fused sm90 GNA forward kernel from Python: availability, support checks, launch.

The kernel lives in the extension ``gna_flex._C`` (csrc/binding.cpp), which
takes raw device pointers, element strides and a stream, so it is independent
of the torch ABI. This module turns tensors into those arguments. Tensors stay
in their native layout ``[B, *grid, heads, D]`` (any strides with a contiguous
last dimension): nothing is permuted, padded or copied before the kernel runs.

:mod:`gna_flex.ops` wraps :func:`forward` as a ``torch.library`` custom op and
uses :func:`unsupported_reason` to pick a backend.

Build the extension on a machine with nvcc (see setup.py)::

    pip install nvidia-cutlass==4.2.0.0 pybind11
    GNA_FLEX_CUDA_ARCH=90a pip install --no-build-isolation -e .
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Optional, Sequence

import torch
from torch import Tensor

from .checks import check_inputs_for
from .spec import GNAParams

__all__ = ["is_available", "unavailable_reason", "unsupported_reason", "forward", "BUILD_COMMAND"]

BUILD_COMMAND = "GNA_FLEX_CUDA_ARCH=90a pip install --no-build-isolation -e . (needs nvcc, nvidia-cutlass, pybind11)"

_CAPABILITY = (9, 0)
_DTYPE_CODES = {torch.float16: "DTYPE_FLOAT16", torch.bfloat16: "DTYPE_BFLOAT16"}
# Stand-in address for tensors without storage (FakeTensor): allocations are at
# least 256-byte aligned, so alignment then depends on the storage offset only.
_ALIGNED_BASE = 1 << 20


@functools.cache
def _load() -> tuple[Optional[ModuleType], Optional[str]]:
    """``(gna_flex._C, None)``, or ``(None, why it could not be imported)``."""
    try:
        return importlib.import_module("gna_flex._C"), None
    except ImportError as error:
        return None, f"{type(error).__name__}: {error}"


def _extension_reason() -> Optional[str]:
    ext, error = _load()
    if ext is None:
        return f"the gna_flex CUDA extension is not built ({error}); build it with {BUILD_COMMAND}"
    if not ext.HAS_SM90:
        return (f"the gna_flex CUDA extension was built without the sm90 kernel (archs: "
                f"{ext.CUDA_ARCHS or 'none'}); rebuild with {BUILD_COMMAND}")
    return None


def _device_reason(device: torch.device) -> Optional[str]:
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) != _CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (f"{device} is {name} (sm_{capability[0]}{capability[1]}); the kernel needs compute "
                f"capability 9.0 (H100/H200)")
    return None


def unavailable_reason() -> Optional[str]:
    """None when the kernel is usable here (extension built with sm90, current GPU sm_90), else why not."""
    reason = _extension_reason()
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return _device_reason(torch.device("cuda", torch.cuda.current_device()))


def is_available() -> bool:
    """True when ``gna_flex._C`` with the sm90 kernel imports and the current CUDA device is sm_90."""
    return unavailable_reason() is None


def _tensors(query, key, value, additional_keys, additional_values) -> dict[str, Tensor]:
    named = {"query": query, "key": key, "value": value}
    if additional_keys is not None:
        named.update(additional_keys=additional_keys, additional_values=additional_values)
    return named


def _tensor_reason(named: dict[str, Tensor]) -> Optional[str]:
    """What the kernel cannot take in these (shape-valid) tensors' dtype and layout."""
    for name, t in named.items():
        if t.dtype not in _DTYPE_CODES:
            return f"{name} has dtype {t.dtype}; the kernel supports torch.float16 and torch.bfloat16"
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            return (f"{name} has stride {t.stride(-1)} on its last (head_dim) dimension; the kernel needs "
                    f"it contiguous (stride 1)")
    query, value = named["query"], named["value"]
    if value.shape[-1] != query.shape[-1]:
        return (f"value head dim {value.shape[-1]} differs from query head dim {query.shape[-1]}; the "
                f"kernel needs them equal")
    return None


def _placement_reason(named: dict[str, Tensor]) -> Optional[str]:
    for name, t in named.items():
        if t.device.type != "cuda":
            return f"{name} is on {t.device}; the kernel needs CUDA tensors"
    return None


def _reason(named: dict[str, Tensor]) -> Optional[str]:
    """The first reason, cheapest checks first, why the kernel cannot run; None if none (yet)."""
    return (_tensor_reason(named) or _placement_reason(named) or _extension_reason()
            or _device_reason(named["query"].device))


def _launch(ext: ModuleType, kernel_params, device: torch.device) -> None:
    with torch.cuda.device(device):
        ext.forward(kernel_params, torch.cuda.current_stream(device).cuda_stream)


def _strides(t: Tensor) -> list[int]:
    """Element strides of every dimension but the last (which is contiguous).

    A size-1 dimension's stride is never multiplied by a non-zero index, and
    torch may give it any value (1, 0, ...). When that value is not a positive
    multiple of 16 bytes it is replaced by the extent of the dimensions inside
    it, rounded up to 16 bytes, so the kernel's TMA descriptors accept it.
    """
    align = max(1, 16 // t.element_size())
    strides = list(t.stride()[:-1])
    extent = t.shape[-1]
    for dim in reversed(range(len(strides))):
        if t.shape[dim] == 1 and (strides[dim] <= 0 or strides[dim] % align):
            strides[dim] = -(-extent // align) * align
        extent = max(extent, strides[dim] * t.shape[dim])
    return strides


def _address(t: Tensor) -> int:
    try:
        return t.data_ptr()
    except (RuntimeError, NotImplementedError):  # no storage (FakeTensor): see _ALIGNED_BASE
        return _ALIGNED_BASE + t.storage_offset() * t.element_size()


def _kernel_params(
    ext: ModuleType,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    params: GNAParams,
    scale: float,
    additional_keys: Optional[Tensor],
    additional_values: Optional[Tensor],
    out_address: int,
    out_strides: list[int],
    lse_address: int,
    q_tile: Optional[Sequence[int]],
    kv_tile: Optional[Sequence[int]],
):
    """The extension's FwdParams for these tensors (pointers as ints, strides in elements)."""
    extra = {}
    if additional_keys is not None:
        extra = dict(
            extra_k=_address(additional_keys),
            extra_v=_address(additional_values),
            extra_k_stride=_strides(additional_keys),
            extra_v_stride=_strides(additional_values),
            num_extra=int(additional_keys.shape[1]),
        )
    return ext.FwdParams(
        q=_address(query),
        k=_address(key),
        v=_address(value),
        o=out_address,
        q_stride=_strides(query),
        k_stride=_strides(key),
        v_stride=_strides(value),
        o_stride=out_strides,
        lse=lse_address,
        batch=int(query.shape[0]),
        heads=int(query.shape[-2]),
        heads_kv=int(key.shape[-2]),
        head_dim=int(query.shape[-1]),
        grid=list(params.grid),
        kernel_size=list(params.kernel_size),
        stride=list(params.stride),
        dilation=list(params.dilation),
        causal=list(params.is_causal),
        scale=float(scale),
        dtype=getattr(ext, _DTYPE_CODES[query.dtype]),
        q_tile=list(q_tile or []),
        kv_tile=list(kv_tile or []),
        **extra,
    )


def _contiguous_strides(shape: Sequence[int]) -> list[int]:
    strides, extent = [], 1
    for n in reversed(shape):
        strides.append(extent)
        extent *= n
    return strides[::-1][:-1]


class _TensorMeta:
    """What the support checks read of a tensor, without its storage.

    Lets the decision run on plain Python values, so that a caller traced by
    Dynamo gets it as a constant instead of a graph break (see
    :func:`_static_reason`). ``data_ptr`` raises, which makes :func:`_address`
    fall back to the storage offset on an aligned base.
    """

    def __init__(self, shape, strides, dtype, device, offset, itemsize):
        self.shape, self._strides, self.dtype, self.device = torch.Size(shape), tuple(strides), dtype, device
        self._offset, self._itemsize = offset, itemsize

    def stride(self, dim: Optional[int] = None):
        return self._strides if dim is None else self._strides[dim]

    def element_size(self) -> int:
        return self._itemsize

    def storage_offset(self) -> int:
        return self._offset

    def data_ptr(self) -> int:
        raise RuntimeError("no storage")


def _describe(t: Optional[Tensor]) -> Optional[tuple]:
    if t is None:
        return None
    # Dynamo cannot read storage offsets; while tracing, alignment is left to forward's check
    # of the real pointers, which raises (never computes a wrong answer) on a misaligned view.
    offset = 0 if torch.compiler.is_compiling() else t.storage_offset()
    return (tuple(t.shape), tuple(t.stride()), t.dtype, t.device, offset, t.dtype.itemsize)


@torch._dynamo.assume_constant_result
def _static_reason(described: tuple, params_values: tuple, scale: float, q_tile, kv_tile) -> Optional[str]:
    """The kernel's verdict from tensor metadata alone (a constant under Dynamo)."""
    query, key, value, extra_k, extra_v = (None if d is None else _TensorMeta(*d) for d in described)
    reason = _reason(_tensors(query, key, value, extra_k, extra_v))
    if reason is not None:
        return reason
    params = GNAParams(*params_values)
    ext = _load()[0]
    kernel_params = _kernel_params(
        ext, query, key, value, params, scale, extra_k, extra_v,
        out_address=_ALIGNED_BASE, out_strides=_contiguous_strides(query.shape), lse_address=_ALIGNED_BASE,
        q_tile=q_tile, kv_tile=kv_tile,
    )
    return ext.supports(kernel_params) or None


def unsupported_reason(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    params: GNAParams,
    additional_keys: Optional[Tensor] = None,
    additional_values: Optional[Tensor] = None,
    *,
    scale: Optional[float] = None,
    q_tile: Optional[Sequence[int]] = None,
    kv_tile: Optional[Sequence[int]] = None,
) -> Optional[str]:
    """None when :func:`forward` can run these inputs, else one sentence saying why not.

    Layouts as in :func:`forward`. Reasons: tensors not on CUDA, dtype other
    than float16/bfloat16, non-contiguous head_dim, head dims that differ,
    extension not built, GPU not sm_90, and whatever the kernel's own check
    (``gna_fwd_sm90_supports``: head_dim, 16-byte TMA alignment of pointers and
    strides, tile shapes, ...) reports. Pointer alignment is judged from the
    storage offset (allocations are 256-byte aligned); :func:`forward` checks
    the real pointers again. The output is assumed to be allocated by
    :func:`forward` (contiguous). Reads only metadata, so it traces under
    ``torch.compile`` without a graph break.

    Raises:
        TypeError / ValueError: the inputs are invalid for any backend (shapes,
            dtypes that differ, params that do not match the query grid).
    """
    check_inputs_for(query, key, value, params, additional_keys, additional_values)
    if scale is None:
        scale = query.shape[-1] ** -0.5
    described = tuple(_describe(t) for t in (query, key, value, additional_keys, additional_values))
    params_values = (params.grid, params.kernel_size, params.stride, params.dilation, params.is_causal)
    return _static_reason(described, params_values, float(scale),
                          None if q_tile is None else tuple(q_tile), None if kv_tile is None else tuple(kv_tile))


def _check_out(out: Tensor, query: Tensor) -> None:
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != query.shape or out.dtype != query.dtype or out.device != query.device:
        raise ValueError(
            f"out must match query ({tuple(query.shape)}, {query.dtype}, {query.device}), got "
            f"({tuple(out.shape)}, {out.dtype}, {out.device})"
        )
    if out.stride(-1) != 1:
        raise ValueError(f"out must have a contiguous last dimension, got stride {out.stride(-1)}")


def _check_lse(lse: Tensor, query: Tensor) -> None:
    shape = tuple(query.shape[:-1])
    if not isinstance(lse, Tensor):
        raise TypeError(f"lse_out must be a torch.Tensor, got {type(lse).__name__}")
    if tuple(lse.shape) != shape or lse.dtype != torch.float32 or lse.device != query.device:
        raise ValueError(
            f"lse_out must be float32 of shape {shape} on {query.device}, got {lse.dtype} of shape "
            f"{tuple(lse.shape)} on {lse.device}"
        )
    if not lse.is_contiguous():
        raise ValueError("lse_out must be contiguous")


def forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    params: GNAParams,
    *,
    scale: Optional[float],
    additional_keys: Optional[Tensor] = None,
    additional_values: Optional[Tensor] = None,
    return_lse: bool = False,
    out: Optional[Tensor] = None,
    lse_out: Optional[Tensor] = None,
    q_tile: Optional[Sequence[int]] = None,
    kv_tile: Optional[Sequence[int]] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """GNA forward with the fused sm90 kernel, on the current CUDA stream.

    Args:
        query: ``[B, *grid, heads, D]``, float16 or bfloat16, on an sm_90 GPU;
            any strides with a contiguous last dimension (e.g. sliced out of a
            packed qkv tensor), 16-byte aligned for TMA.
        key, value: ``[B, *grid, heads_kv, D]``; ``heads_kv`` divides ``heads``.
        params: the GNA parameters; ``params.grid`` must equal the query grid.
        scale: softmax scale; None means ``D ** -0.5``.
        additional_keys, additional_values: optional ``[B, E, heads_kv, D]``
            extra tokens every query attends to, in the same softmax.
        return_lse: also compute the fp32 log-sum-exp (natural log).
        out: optional preallocated output like ``query`` (any strides with a
            contiguous last dimension); default: a new contiguous tensor.
        lse_out: optional preallocated contiguous fp32 ``[B, *grid, heads]``;
            giving it implies ``return_lse``.
        q_tile, kv_tile: tile shapes in tokens per axis; None is the kernel's default.

    Returns:
        ``(out, lse)``: ``out`` ``[B, *grid, heads, D]`` in the query's dtype
        (contiguous unless ``out`` was given), ``lse`` fp32 ``[B, *grid, heads]``
        or None.

    Raises:
        TypeError / ValueError: invalid inputs (see :func:`unsupported_reason`).
        RuntimeError: inputs the kernel cannot run, or a launch error; the
            message says what.
    """
    check_inputs_for(query, key, value, params, additional_keys, additional_values)
    reason = _reason(_tensors(query, key, value, additional_keys, additional_values))
    if reason is not None:
        raise RuntimeError(f"gna_flex sm90 kernel cannot run these inputs: {reason}")
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    else:
        _check_out(out, query)
    if lse_out is not None:
        _check_lse(lse_out, query)
    elif return_lse:
        lse_out = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
    if scale is None:
        scale = query.shape[-1] ** -0.5
    ext = _load()[0]
    kernel_params = _kernel_params(
        ext, query, key, value, params, scale, additional_keys, additional_values,
        out_address=out.data_ptr(), out_strides=_strides(out),
        lse_address=lse_out.data_ptr() if lse_out is not None else 0,
        q_tile=q_tile, kv_tile=kv_tile,
    )
    _launch(ext, kernel_params, query.device)
    return out, lse_out
