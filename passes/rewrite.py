"""Rewrite matched attention calls to GNA in the FX graph.

A matched call is replaced by the custom op ``gna_flex::rewritten_attention``
(its fake implementation lets AOT autograd and Inductor trace around it; its
autograd differentiates the chosen path). At run time it calls
:func:`gna_flex.functional.na` on *views* of the caller's tensors: SDPA's
``[B, heads, S, D]`` becomes NATTEN's ``[B, *grid, heads, D]`` by slicing the
grid tokens off the sequence axis, splitting that axis into the grid and
moving the heads axis; no data is copied for the permutation (the kernel
reads strided inputs; the flex path permutes to tile-major order itself).
The output is written tokens-major (``[B, S, heads, Dv]`` memory), so the
``transpose(1, 2).reshape(B, S, heads * Dv)`` that models apply next is free.

Sequences in the tile-major order of a tile-major ``gna_flex.block_mask`` are
reordered to the native layout and back inside the op (copies), unless the
caller's own permutation chains are folded first (:mod:`.fold`): the op is
then called in raster order on views of the caller's native tensors.

Calls with a key-padding ``attn_mask`` over the extra tokens (rules with
``extra_key_mask=True``) pass the mask to the op, which reads it at run time
(:mod:`.key_padding`): grid queries get their batch element's valid extra
keys, extra queries run dense SDPA under the original mask rows.

Backward recomputes the forward under autograd inside
``gna_flex::rewritten_attention_backward`` (one extra forward per step).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from gna_flex import functional
from gna_flex.ops import eager_dispatch
from gna_flex.layout import make_tile_layout, permute, unpermute

from .decide import Decision
from .key_padding import mask_rows, per_batch_extra_keys, valid_extra_keys
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
    tile: Optional[Sequence[int]] = None,
    attn_mask: Optional[Tensor] = None,
) -> Tensor:
    """What a rewritten attention call computes (eager; the custom op runs this).

    Args:
        query: ``[B, heads, Sq, D]``; key / value ``[B, heads_kv, Sk, D]`` /
            ``[..., Dv]``. The sequence axis holds ``P`` grid positions and the
            ``E = extra_tokens`` extra tokens, after the grid
            (``extra_first=False``) or before it. With ``tile=None`` the grid
            positions are the ``P = N = prod(grid)`` tokens in raster order
            (read through views, no copy); with a tile they are in
            :mod:`gna_flex.layout`'s tile-major order with padding
            (``P = prod(ceil(L / T) * T)``; reordered by a copy each way).
            ``Sk >= P + E`` (keys past ``P + E`` are ignored, as a flex block
            mask marks them invalid); ``Sq`` is ``P + E``, or ``P`` (grid
            queries only, extra tokens last).
        attn_mask: None, or (raster order, ``Sq == Sk == N + E`` only) SDPA's
            mask of the original call, a key-padding mask over the extra
            tokens (see :func:`.key_padding.valid_extra_keys`, which raises
            RuntimeError for any other mask).

    Returns:
        ``[B, heads, Sq, Dv]``, stored tokens-major (``[B, Sq, heads, Dv]``
        contiguous, transposed): the op's native output needs no copy, and
        the usual ``out.transpose(1, 2).reshape(B, Sq, heads * Dv)`` that
        follows attention is a view. Grid queries attend to their GNA window
        plus every extra key (one softmax; with ``attn_mask``, every valid
        extra key of their batch element); extra queries attend to every
        grid and extra key (dense SDPA under ``attn_mask``'s rows for them,
        exactly what they had before);
        padding positions of a tile-major order output zeros (they see
        nothing, as under the flex mask).
    """
    grid = tuple(grid)
    n, e = math.prod(grid), extra_tokens
    tiles = make_tile_layout(grid, tuple(tile)) if tile is not None else None
    p = tiles.num_tokens if tiles is not None else n
    grid_tokens, extra = (slice(e, e + p), slice(0, e)) if extra_first else (slice(0, p), slice(p, p + e))
    valid = None
    if attn_mask is not None:
        b, heads, sq, _ = query.shape
        if tiles is not None or sq != n + e or key.shape[2] != n + e:
            raise RuntimeError(
                "gna_flex rewritten attention: an attn_mask needs raster order and query/key length grid + extra "
                f"({n + e}), got query {sq}, key {key.shape[2]}" + (f", tile {tuple(tile)}" if tile else "")
            )
        valid = valid_extra_keys(attn_mask, b, heads, sq, key.shape[2], grid_tokens, extra)

    def grid_part(t: Tensor) -> Tensor:
        if tiles is None:
            return _grid_view(t, grid_tokens, grid)
        return unpermute(t[:, :, grid_tokens], tiles, heads_last=False).movedim(1, -2)

    k_grid, v_grid = grid_part(key), grid_part(value)
    window = (tuple(kernel_size), tuple(stride), tuple(dilation), tuple(bool(c) for c in is_causal))

    def attend(q: Tensor, k: Tensor, v: Tensor, ak: Optional[Tensor], av: Optional[Tensor]) -> Tensor:
        return functional.na(q, k, v, *window, scale=scale, additional_keys=ak, additional_values=av,
                             backend=backend)

    out = per_batch_extra_keys(attend, grid_part(query), k_grid, v_grid, _heads_last(key, extra),
                               _heads_last(value, extra), valid)
    if tiles is None:
        out = _tokens_major(out.contiguous())
    else:
        out, _ = permute(out, grid, tiles.tile, heads_last=True)
    if query.shape[2] == p:
        return out.transpose(1, 2)
    if tiles is None:
        keys, values = key[:, :, : n + e], value[:, :, : n + e]
    else:
        # Padding positions are no one's keys: gather the valid ones.
        keys = torch.cat([_tokens_major(k_grid).transpose(1, 2), key[:, :, extra]], dim=2)
        values = torch.cat([_tokens_major(v_grid).transpose(1, 2), value[:, :, extra]], dim=2)
    rows = mask_rows(attn_mask, extra, query.shape[2]) if attn_mask is not None else None
    extra_out = F.scaled_dot_product_attention(
        query[:, :, extra], keys, values, attn_mask=rows, scale=scale, enable_gqa=enable_gqa
    ).transpose(1, 2)
    return torch.cat((extra_out, out) if extra_first else (out, extra_out), dim=1).transpose(1, 2)


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
    tile: Optional[list[int]] = None,
    attn_mask: Optional[Tensor] = None,
) -> Tensor:
    with eager_dispatch(), torch.no_grad():
        return gna_attention(query, key, value, grid, kernel_size, stride, dilation, is_causal, extra_tokens,
                             extra_first, scale, enable_gqa, backend, tile, attn_mask)


@rewritten_attention.register_fake
def _rewritten_attention_fake(query, key, value, grid, kernel_size, stride, dilation, is_causal, extra_tokens,
                              extra_first, scale, enable_gqa, backend, tile=None, attn_mask=None):
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
    tile: Optional[list[int]] = None,
    attn_mask: Optional[Tensor] = None,
) -> list[Tensor]:
    # Recompute the forward under autograd and differentiate it: gradients come
    # from the chosen path's own autograd (the kernel op's registered backward,
    # flex's backward, or plain ops for the reference).
    inputs = [t.detach().requires_grad_() for t in (query, key, value)]
    with eager_dispatch(), torch.enable_grad():
        out = gna_attention(*inputs, grid, kernel_size, stride, dilation, is_causal, extra_tokens, extra_first,
                            scale, enable_gqa, backend, tile, attn_mask)
        grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    # The fake promises empty_like(input) layouts (what Inductor asserts on); the
    # chosen path's autograd may return another stride order.
    return [g if g.stride() == t.stride() else torch.empty_like(t).copy_(g) for g, t in zip(grads, inputs)]


@rewritten_attention_backward.register_fake
def _rewritten_attention_backward_fake(grad_out, query, key, value, *rest):
    return [torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)]


def _setup_context(ctx, inputs, output):
    query, key, value, *rest = inputs
    # the mask (last input, or absent when the caller left the default) is saved as a tensor, the rest
    # are plain values
    mask = rest[-1] if len(rest) == 12 else None
    ctx.save_for_backward(query, key, value, mask)
    ctx.rest = (list(rest[:11]) + [None])[:11]  # tile defaults to None
    ctx.num_inputs = len(inputs)


def _backward(ctx, grad_out):
    query, key, value, mask = ctx.saved_tensors
    dq, dk, dv = rewritten_attention_backward(grad_out, query, key, value, *ctx.rest, mask)
    return (dq, dk, dv) + (None,) * (ctx.num_inputs - 3)


rewritten_attention.register_autograd(_backward, setup_context=_setup_context)


_OP = torch.ops.gna_flex.rewritten_attention.default


def _replace(graph: fx.Graph, old: fx.Node, target, args: tuple, kwargs: dict, meta_from: fx.Node) -> fx.Node:
    with graph.inserting_before(old):
        new = graph.call_function(target, args, kwargs)
    # Keep provenance (module stack, stack trace); the value itself has new
    # strides, so it is recomputed from the op's fake implementation.
    new.meta = {k: v for k, v in meta_from.meta.items() if k not in ("example_value", "val", "tensor_meta")}
    fake_args, fake_kwargs = fx.node.map_arg((args, kwargs), lambda n: n.meta.get("example_value"))
    fake_mode = getattr(fake_args[0], "fake_mode", None)
    if fake_mode is not None:
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
    if a["attn_mask"] is not None:
        args += (None, a["attn_mask"])
    new = _replace(graph, call.node, _OP, args, {}, call.node)
    call.node.replace_all_uses_with(new)
    graph.erase_node(call.node)


def flex_rewrite_blocker(call: AttentionCall) -> Optional[str]:
    """Why a flex_attention call with a gna_flex block mask cannot be rewritten, or None."""
    params, tile, extra = call.gna_mask
    if len(call.query_shape) != 4 or len(call.key_shape) != 4 or len(call.value_shape) != 4:
        return f"inputs are not 4-D [B, heads, S, D] ({call.shapes})"
    if any(d < 0 for d in (*call.query_shape, *call.key_shape, *call.value_shape)):
        return "dynamic (symbolic) shapes"
    n = make_tile_layout(params.grid, tile).num_tokens if tile is not None else params.num_tokens
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
    params, tile, extra = call.gna_mask
    a = call.args
    gqa = call.query_shape[1] != call.key_shape[1]
    args = (a["query"], a["key"], a["value"], list(params.grid), list(params.kernel_size), list(params.stride),
            list(params.dilation), list(params.is_causal), extra, False, a["scale"], gqa, backend,
            list(tile) if tile is not None else None)
    getters = output_users(call.node).get(0, [])
    meta_from = getters[0] if getters else call.node
    new = _replace(graph, call.node, _OP, args, {}, meta_from)
    for g in getters:
        g.replace_all_uses_with(new)
        graph.erase_node(g)
    graph.erase_node(call.node)
