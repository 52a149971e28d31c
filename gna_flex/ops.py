"""Backend dispatch and the torch.library custom ops of gna_flex.

Three backends compute the same function:

* ``"cutlass"``: the fused sm90 kernel (:mod:`gna_flex.cutlass`), wrapped as
  the custom op ``gna_flex::na_cutlass`` with a fake implementation, so it
  traces under ``torch.compile`` without graph breaks. Its backward runs the
  flex path (custom op ``gna_flex::na_flex_backward``) until a backward
  kernel exists.
* ``"flex"``: FlexAttention with an analytic GNA block mask
  (:func:`gna_flex.flex.flex_na`), compiled on CUDA, eager on CPU.
* ``"reference"``: dense masked attention in fp32 (:func:`gna_flex.reference.na`).

``backend=None`` picks ``"cutlass"`` when the kernel is built, the GPU is
sm90 and the inputs fit it, else ``"flex"``. An explicit ``"cutlass"`` on
unsupported inputs raises, saying what is unsupported; nothing ever falls
back silently to a path that computes something else.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import cutlass, flex, reference
from .spec import GNAParams, make_params

__all__ = ["BACKENDS", "select_backend", "na", "eager_dispatch"]

BACKENDS = ("cutlass", "flex", "reference")


def _autocast_keys():
    c = torch._C
    keys = c.DispatchKeySet(c.DispatchKey.AutocastCPU)
    for name in dir(c.DispatchKey):
        if name.startswith("Autocast"):
            keys = keys | c.DispatchKeySet(getattr(c.DispatchKey, name))
    return keys


@contextlib.contextmanager
def eager_dispatch():
    """Run plain eager code (with autograd) inside a custom op's implementation.

    torch calls a custom op's implementation with every dispatch key above the
    backend excluded (autograd, functorch, ...). The paths called from here
    need them back: eager FlexAttention goes through its autograd function and
    ``vmap`` even for a forward, and the backward recomputes the forward under
    autograd. Autocast stays off, as it is for any op's implementation.
    """
    c = torch._C
    # Outside any op, torch excludes exactly the autocast keys (autocast adds
    # them to the include set when enabled); restore that state.
    with c._ForceDispatchKeyGuard(c._dispatch_tls_local_include_set(), _autocast_keys()):
        yield


def _params(grid, kernel_size, stride, dilation, is_causal) -> GNAParams:
    return make_params(tuple(grid), tuple(kernel_size), tuple(stride), tuple(dilation), tuple(is_causal))


def _param_lists(params: GNAParams) -> tuple[list[int], list[int], list[int], list[int], list[bool]]:
    return (list(params.grid), list(params.kernel_size), list(params.stride), list(params.dilation),
            list(params.is_causal))


@torch.library.custom_op("gna_flex::na_cutlass", mutates_args=())
def _na_cutlass(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    additional_keys: Optional[Tensor],
    additional_values: Optional[Tensor],
    grid: list[int],
    kernel_size: list[int],
    stride: list[int],
    dilation: list[int],
    is_causal: list[bool],
    scale: float,
) -> tuple[Tensor, Tensor]:
    params = _params(grid, kernel_size, stride, dilation, is_causal)
    out, lse = cutlass.forward(
        query, key, value, params, scale=scale, additional_keys=additional_keys,
        additional_values=additional_values, return_lse=True,
    )
    return out, lse


@_na_cutlass.register_fake
def _na_cutlass_fake(query, key, value, additional_keys, additional_values, grid, kernel_size, stride,
                     dilation, is_causal, scale):
    out = query.new_empty((*query.shape[:-1], value.shape[-1]))
    lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
    return out, lse


@torch.library.custom_op("gna_flex::na_flex_backward", mutates_args=())
def _na_flex_backward(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    additional_keys: Optional[Tensor],
    additional_values: Optional[Tensor],
    grid: list[int],
    kernel_size: list[int],
    stride: list[int],
    dilation: list[int],
    is_causal: list[bool],
    scale: float,
) -> list[Tensor]:
    params = _params(grid, kernel_size, stride, dilation, is_causal)
    inputs = [t.detach().requires_grad_() for t in (query, key, value, additional_keys, additional_values)
              if t is not None]
    with eager_dispatch(), torch.enable_grad():
        extra = inputs[3:] if len(inputs) == 5 else (None, None)
        out = flex.flex_na(inputs[0], inputs[1], inputs[2], params, scale=scale,
                           additional_keys=extra[0], additional_values=extra[1])
        return list(torch.autograd.grad(out, inputs, grad_out.to(out.dtype)))


@_na_flex_backward.register_fake
def _na_flex_backward_fake(grad_out, query, key, value, additional_keys, additional_values, grid, kernel_size,
                           stride, dilation, is_causal, scale):
    return [torch.empty_like(t) for t in (query, key, value, additional_keys, additional_values) if t is not None]


def _cutlass_setup_context(ctx, inputs, output):
    query, key, value, additional_keys, additional_values, *rest = inputs
    ctx.save_for_backward(query, key, value, additional_keys, additional_values)
    ctx.rest = rest


def _cutlass_backward(ctx, grad_out, grad_lse):
    query, key, value, additional_keys, additional_values = ctx.saved_tensors
    grads = _na_flex_backward(grad_out, query, key, value, additional_keys, additional_values, *ctx.rest)
    if additional_keys is None:
        grads = [*grads, None, None]
    return (*grads, None, None, None, None, None, None)


_na_cutlass.register_autograd(_cutlass_backward, setup_context=_cutlass_setup_context)


def select_backend(
    backend: Optional[str],
    query: Tensor,
    key: Tensor,
    value: Tensor,
    params: GNAParams,
    additional_keys: Optional[Tensor] = None,
    additional_values: Optional[Tensor] = None,
) -> str:
    """Resolve ``backend`` (None, ``"cutlass"``, ``"flex"`` or ``"reference"``) for these inputs.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: ``"cutlass"`` asked for inputs the kernel cannot run,
            with the kernel's reason.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    if backend in ("flex", "reference"):
        return backend
    reason = cutlass.unsupported_reason(query, key, value, params, additional_keys, additional_values)
    if backend == "cutlass":
        if reason is not None:
            raise RuntimeError(f"backend='cutlass' cannot run these inputs: {reason}")
        return "cutlass"
    return "cutlass" if reason is None else "flex"


def na(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    params: GNAParams,
    *,
    scale: float,
    additional_keys: Optional[Tensor] = None,
    additional_values: Optional[Tensor] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """GNA on validated inputs (see :func:`gna_flex.checks.check_inputs`).

    Returns ``(out, lse)``: ``out`` ``[B, *grid, heads, Dv]`` in the query's
    dtype, ``lse`` ``[B, *grid, heads]`` fp32 when ``return_lse`` else None.
    """
    chosen = select_backend(backend, query, key, value, params, additional_keys, additional_values)
    if chosen == "cutlass":
        out, lse = _na_cutlass(query, key, value, additional_keys, additional_values, *_param_lists(params),
                               float(scale))
        return out, (lse if return_lse else None)
    if chosen == "flex":
        result = flex.flex_na(query, key, value, params, scale=scale, additional_keys=additional_keys,
                              additional_values=additional_values, return_lse=return_lse)
        return result if return_lse else (result, None)
    result = reference.na(query, key, value, params.kernel_size, params.stride, params.dilation, params.is_causal,
                          scale=scale, additional_keys=additional_keys, additional_values=additional_values,
                          return_lse=return_lse)
    out, lse = result if return_lse else (result, None)
    return out.to(query.dtype), (lse.float() if lse is not None else None)
