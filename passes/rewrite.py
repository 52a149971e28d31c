"""Rewrite matched attention calls to GNA in the FX graph.

A matched call is replaced by the custom op ``gna_flex::rewritten_attention``
(its fake implementation lets AOT autograd and Inductor trace around it; its
autograd differentiates the chosen path). At run time it calls
:func:`gna_flex.functional.na` on *views* of the caller's tensors: SDPA's
``[B, heads, S, D]`` becomes NATTEN's ``[B, *grid, heads, D]`` by slicing the
grid tokens off the sequence axis, splitting that axis into the grid and
moving the heads axis; no data is copied for the permutation (the kernel
reads strided inputs; the flex path permutes to tile-major order itself).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from gna_flex import functional

from .decide import Decision
from .match import AttentionCall, output_users

__all__ = ["gna_attention", "rewritten_attention", "rewrite_sdpa", "rewrite_flex", "flex_rewrite_blocker"]


def _grid_view(t: Tensor, tokens: slice, grid: tuple[int, ...]) -> Tensor:
    """``[B, heads, S, D]`` -> grid tokens as ``[B, *grid, heads, D]`` (a view)."""
    return t[:, :, tokens].unflatten(2, grid).movedim(1, -2)


def _heads_last(t: Tensor, tokens: slice) -> Tensor:
    """``[B, heads, S, D]`` -> ``tokens`` as ``[B, E, heads, D]`` (a view)."""
    return t[:, :, tokens].transpose(1, 2)


def _tokens_major(out: Tensor) -> Tensor:
    """``[B, *grid, heads, Dv]`` (contiguous) -> ``[B, N, heads, Dv]`` (a view)."""
    return out.flatten(1, -3)


def gna_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    grid: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    is_causal: Sequence[bool],
    extra_tokens: int,
    extra_first: bool,
    scale: Optional[float],
    enable_gqa: bool,
    backend: Optional[str],
) -> Tensor:
    """What a rewritten attention call computes, on views of its inputs (eager; the custom op runs this).

    Args:
        query: ``[B, heads, Sq, D]``; key / value ``[B, heads_kv, Sk, D]`` /
            ``[..., Dv]``. The sequence axis holds the ``N = prod(grid)`` grid
            tokens in raster order and the ``E = extra_tokens`` extra tokens,
            after the grid (``extra_first=False``) or before it. ``Sk >= N + E``
            (keys past ``N + E`` are ignored, as a flex block mask marks them
            invalid); ``Sq`` is ``N + E``, or ``N`` (grid queries only, extra
            tokens last).

    Returns:
        ``[B, heads, Sq, Dv]``, stored tokens-major (``[B, Sq, heads, Dv]``
        contiguous, transposed): the op's native output needs no copy, and
        the usual ``out.transpose(1, 2).reshape(B, Sq, heads * Dv)`` that
        follows attention is a view. Grid queries attend to their GNA window
        plus every extra key (one softmax); extra queries attend to every key
        (dense SDPA, exactly what they had before).
    """
    grid = tuple(grid)
    n, e = math.prod(grid), extra_tokens
    grid_tokens, extra = (slice(e, e + n), slice(0, e)) if extra_first else (slice(0, n), slice(n, n + e))
    out = functional.na(
        _grid_view(query, grid_tokens, grid),
        _grid_view(key, grid_tokens, grid),
        _grid_view(value, grid_tokens, grid),
        tuple(kernel_size),
        tuple(stride),
        tuple(dilation),
        tuple(bool(c) for c in is_causal),
        scale=scale,
        additional_keys=_heads_last(key, extra) if e else None,
        additional_values=_heads_last(value, extra) if e else None,
        backend=backend,
    )
    out = _tokens_major(out.contiguous())
    if query.shape[2] == n:
        return out.transpose(1, 2)
    extra_out = F.scaled_dot_product_attention(
        query[:, :, extra], key[:, :, : n + e], value[:, :, : n + e], scale=scale, enable_gqa=enable_gqa
    ).transpose(1, 2)
    return torch.cat((extra_out, out) if extra_first else (out, extra_out), dim=1).transpose(1, 2)


def _autocast_keys():
    c = torch._C
    keys = c.DispatchKeySet(c.DispatchKey.AutocastCPU)
    for name in dir(c.DispatchKey):
        if name.startswith("Autocast"):
            keys = keys | c.DispatchKeySet(getattr(c.DispatchKey, name))
    return keys


@contextlib.contextmanager
def _eager_dispatch():
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


# The rewrite inserts a custom op rather than the Python above: AOT autograd
# and Inductor then treat GNA as one opaque call with a fake implementation,
# so every gna_flex path (the kernel's custom op, flex with its prebuilt block
# masks, the reference) runs eagerly on the real tensors, and the head/grid
# views are taken at run time on the caller's buffers (no copies).
@torch.library.custom_op("gna_flex::rewritten_attention", mutates_args=())
def rewritten_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    grid: list[int],
    kernel_size: list[int],
    stride: list[int],
    dilation: list[int],
    is_causal: list[bool],
    extra_tokens: int,
    extra_first: bool,
    scale: Optional[float],
    enable_gqa: bool,
    backend: Optional[str],
) -> Tensor:
    with _eager_dispatch(), torch.no_grad():
        return gna_attention(query, key, value, grid, kernel_size, stride, dilation, is_causal, extra_tokens,
                             extra_first, scale, enable_gqa, backend)


@rewritten_attention.register_fake
def _rewritten_attention_fake(query, key, value, grid, kernel_size, stride, dilation, is_causal, extra_tokens,
                              extra_first, scale, enable_gqa, backend):
    b, h, s, _ = query.shape
    return query.new_empty((b, s, h, value.shape[-1])).transpose(1, 2)


@torch.library.custom_op("gna_flex::rewritten_attention_backward", mutates_args=())
def rewritten_attention_backward(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    grid: list[int],
    kernel_size: list[int],
    stride: list[int],
    dilation: list[int],
    is_causal: list[bool],
    extra_tokens: int,
    extra_first: bool,
    scale: Optional[float],
    enable_gqa: bool,
    backend: Optional[str],
) -> list[Tensor]:
    # Recompute the forward under autograd and differentiate it: gradients come
    # from the chosen path's own autograd (the kernel op's registered backward,
    # flex's backward, or plain ops for the reference).
    inputs = [t.detach().requires_grad_() for t in (query, key, value)]
    with _eager_dispatch(), torch.enable_grad():
        out = gna_attention(*inputs, grid, kernel_size, stride, dilation, is_causal, extra_tokens, extra_first,
                            scale, enable_gqa, backend)
        return list(torch.autograd.grad(out, inputs, grad_out.to(out.dtype)))


@rewritten_attention_backward.register_fake
def _rewritten_attention_backward_fake(grad_out, query, key, value, *rest):
    return [torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)]


def _setup_context(ctx, inputs, output):
    query, key, value, *rest = inputs
    ctx.save_for_backward(query, key, value)
    ctx.rest = rest


def _backward(ctx, grad_out):
    query, key, value = ctx.saved_tensors
    dq, dk, dv = rewritten_attention_backward(grad_out, query, key, value, *ctx.rest)
    return (dq, dk, dv) + (None,) * len(ctx.rest)


rewritten_attention.register_autograd(_backward, setup_context=_setup_context)


_OP = torch.ops.gna_flex.rewritten_attention.default


def _replace(graph: fx.Graph, old: fx.Node, target, args: tuple, kwargs: dict, meta_from: fx.Node) -> fx.Node:
    with graph.inserting_before(old):
        new = graph.call_function(target, args, kwargs)
    # Keep provenance (module stack, stack trace); the value itself has new
    # strides, so it is recomputed from the op's fake implementation.
    new.meta = {k: v for k, v in meta_from.meta.items() if k not in ("example_value", "val", "tensor_meta")}
    example = old.meta.get("example_value")
    fake_mode = getattr(example, "fake_mode", None) if isinstance(example, torch.Tensor) else None
    if fake_mode is not None:
        fake_args, fake_kwargs = fx.node.map_arg((args, kwargs), lambda n: n.meta.get("example_value"))
        with fake_mode:
            new.meta["example_value"] = target(*fake_args, **fake_kwargs)
    return new


def rewrite_sdpa(graph: fx.Graph, call: AttentionCall, decision: Decision) -> None:
    """Replace one SDPA node by ``gna_flex::rewritten_attention`` under the decision's rule."""
    rule = decision.rule
    p = rule.params
    a = call.args
    args = (a["query"], a["key"], a["value"], list(p.grid), list(p.kernel_size), list(p.stride), list(p.dilation),
            list(p.is_causal), rule.extra_tokens, rule.extra_position == "start", a["scale"], bool(a["enable_gqa"]),
            rule.backend)
    new = _replace(graph, call.node, _OP, args, {}, call.node)
    call.node.replace_all_uses_with(new)
    graph.erase_node(call.node)


def flex_rewrite_blocker(call: AttentionCall) -> Optional[str]:
    """Why a flex_attention call with a gna_flex block mask cannot be rewritten, or None."""
    params, tile, extra = call.gna_mask
    if tile is not None:
        return f"block mask is in tile-major order (tile {tile}); only raster-order masks are rewritten"
    if len(call.query_shape) != 4 or len(call.key_shape) != 4 or len(call.value_shape) != 4:
        return f"inputs are not 4-D [B, heads, S, D] ({call.shapes})"
    if any(d < 0 for d in (*call.query_shape, *call.key_shape, *call.value_shape)):
        return "dynamic (symbolic) shapes"
    n = params.num_tokens
    if call.query_shape[2] not in (n, n + extra):
        return f"query length {call.query_shape[2]} is neither the grid ({n}) nor grid + extra ({n + extra})"
    if call.key_shape[2] < n + extra:
        return f"key length {call.key_shape[2]} is shorter than grid + extra ({n + extra})"
    if call.query_shape[0] != call.key_shape[0]:
        return "query and key batch sizes differ"
    if not _is_identity_score_mod(call.args["score_mod"]):
        return "has a score_mod"
    score_buffers = call.args["rest"][0] if call.args["rest"] else ()
    if score_buffers:
        return "score_mod captures buffers"
    if not isinstance(call.args["scale"], (float, int, type(None))):
        return "scale is not a constant"
    users = output_users(call.node)
    if any(k != 0 for k in users):
        return "uses flex_attention outputs other than the attention output (e.g. the log-sum-exp)"
    return None


def _is_identity_score_mod(score_mod) -> bool:
    """The score_mod subgraph returns its first input (the score) unchanged."""
    gm = None
    if isinstance(score_mod, fx.Node) and score_mod.op == "get_attr":
        owner = score_mod.graph.owning_module
        gm = getattr(owner, str(score_mod.target), None) if owner is not None else None
    if not isinstance(gm, fx.GraphModule):
        return score_mod is None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    if not placeholders or len(outputs) != 1:
        return False
    result = outputs[0].args[0]
    if isinstance(result, (tuple, list)) and len(result) == 1:
        result = result[0]
    return result is placeholders[0]


def rewrite_flex(graph: fx.Graph, call: AttentionCall, backend: Optional[str] = None) -> None:
    """Replace one flex_attention node (and its ``[0]`` getitem) by ``gna_flex::rewritten_attention``."""
    params, _, extra = call.gna_mask
    a = call.args
    gqa = call.query_shape[1] != call.key_shape[1]
    args = (a["query"], a["key"], a["value"], list(params.grid), list(params.kernel_size), list(params.stride),
            list(params.dilation), list(params.is_causal), extra, False, a["scale"], gqa, backend)
    getters = output_users(call.node).get(0, [])
    meta_from = getters[0] if getters else call.node
    new = _replace(graph, call.node, _OP, args, {}, meta_from)
    for g in getters:
        g.replace_all_uses_with(new)
        graph.erase_node(g)
    graph.erase_node(call.node)
