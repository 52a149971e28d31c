"""Find attention calls in a Dynamo FX graph (before AOT autograd).

Two kinds of call are found:

* ``"sdpa"``: ``call_function`` nodes of ``torch._C._nn.scaled_dot_product_attention``
  or ``torch.nn.functional.scaled_dot_product_attention`` (Dynamo records the
  former; the latter appears in hand-built graphs). Arguments are normalised
  from any mix of positional and keyword form.
* ``"flex"``: ``torch.ops.higher_order.flex_attention`` nodes; whether their
  block mask came from :func:`gna_flex.flex.block_mask` is read off the block
  mask's tensors, which reach the backend as real graph inputs (see
  :func:`block_mask_marker`).

Shapes and dtypes come from ``node.meta["example_value"]`` (fake tensors that
Dynamo attaches to every node). The module path comes from the innermost
entry of ``node.meta["nn_module_stack"]``, normalised to the dotted form of
``model.named_modules()`` (``"blocks.0.attn"``; ``""`` for the root).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx

__all__ = ["AttentionCall", "SDPA_TARGETS", "find_attention", "module_path", "normalize_module_path"]

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _flex_target():
    return getattr(torch.ops.higher_order, "flex_attention", None)


@dataclass
class AttentionCall:
    """One attention call found in the graph.

    ``args`` holds the normalised SDPA arguments (names as in
    ``F.scaled_dot_product_attention``; tensors as FX nodes, the rest as
    Python values). Shapes are ``[B, heads, S, D]`` for 4-D inputs, as SDPA
    and flex_attention take them; a symbolic (dynamic) size reads as -1.
    """

    node: fx.Node
    kind: str
    module: str
    module_type: str
    query_shape: tuple[int, ...]
    key_shape: tuple[int, ...]
    value_shape: tuple[int, ...]
    dtype: Optional[torch.dtype]
    device: Optional[torch.device]
    args: dict[str, Any] = field(default_factory=dict)
    #: flex only: ``(GNAParams, tile, extra_tokens)`` when the block mask came from gna_flex.
    gna_mask: Optional[tuple] = None

    @property
    def shapes(self) -> str:
        def fmt(s):
            return "x".join(str(d) if d >= 0 else "?" for d in s)

        return f"q {fmt(self.query_shape)}, k {fmt(self.key_shape)}, v {fmt(self.value_shape)}"


_LOCAL = re.compile(r"^L\[['\"][^'\"]*['\"]\]")


def normalize_module_path(raw: str) -> str:
    """Dynamo's module path (``"L['self'].blocks.0.attn"``, ``"L['self'].blocks[0]"``,
    ``"L['self']._modules['blocks']._modules['0']"``,
    ``"L['self'].__dict__['_modules']['blocks'][0]"``) -> ``"blocks.0.attn"``."""
    s = _LOCAL.sub("", raw)
    s = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", s)
    s = re.sub(r"\[['\"]([^'\"]+)['\"]\]", r".\1", s)
    s = re.sub(r"\[(\d+)\]", r".\1", s)
    # Dynamo may reach submodules through the module's own storage
    # ("__dict__['_modules']['blocks']"): those hops are not part of the path.
    return ".".join(part for part in s.split(".") if part and part not in ("__dict__", "_modules"))


def module_path(node: fx.Node) -> tuple[str, str]:
    """``(path, type name)`` of the innermost module whose forward made this call."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    raw, mod_type = list(stack.values())[-1]
    type_name = getattr(mod_type, "__qualname__", None) or str(mod_type)
    return normalize_module_path(str(raw)), type_name


def _example(n: Any) -> Any:
    return n.meta.get("example_value", n.meta.get("val")) if isinstance(n, fx.Node) else n


def _shape(n: Any) -> tuple[int, ...]:
    v = _example(n)
    if isinstance(v, torch.Tensor):
        # Symbolic sizes (dynamic shapes) read as -1: never reading them as ints
        # keeps the pass from adding guards after Dynamo has finished.
        return tuple(d if isinstance(d, int) else -1 for d in v.shape)
    return ()


def normalize_sdpa_args(node: fx.Node) -> dict[str, Any]:
    """SDPA arguments by name, defaults filled in, whatever mix of args/kwargs the node uses."""
    out = dict(_SDPA_DEFAULTS)
    for name, value in zip(_SDPA_ARGS, node.args):
        out[name] = value
    for name, value in node.kwargs.items():
        out[name] = value
    return out


def _call(node: fx.Node, kind: str, args: dict[str, Any]) -> AttentionCall:
    path, type_name = module_path(node)
    q = _example(args["query"])
    return AttentionCall(
        node=node,
        kind=kind,
        module=path,
        module_type=type_name,
        query_shape=_shape(args["query"]),
        key_shape=_shape(args["key"]),
        value_shape=_shape(args["value"]),
        dtype=q.dtype if isinstance(q, torch.Tensor) else None,
        device=q.device if isinstance(q, torch.Tensor) else None,
        args=args,
    )


def block_mask_marker(node: fx.Node, example_inputs: dict[fx.Node, Any]):
    """The gna_flex marker ``(GNAParams, tile, extra_tokens)`` of a flex_attention call's mask, or None.

    The block mask's tensors and the tensors its mask_mod captures reach the
    graph as placeholders whose real values Dynamo hands to the backend. Each
    of them is asked (:func:`gna_flex.flex.gna_params_of`) whether gna_flex
    marked it; no position inside the block-mask tuple is assumed (its layout
    changes between torch versions).
    """
    from gna_flex import flex

    seen: list[fx.Node] = []
    fx.node.map_arg((node.args[4:], node.kwargs), lambda n: seen.append(n))
    for item in seen:
        if item.op == "placeholder" and item in example_inputs:
            value = example_inputs[item]
            if isinstance(value, torch.Tensor):
                found = flex.gna_params_of(value)
                if found is not None:
                    return found
    return None


def find_attention(gm: fx.GraphModule, example_inputs: Sequence[Any] = ()) -> list[AttentionCall]:
    """All SDPA and flex_attention calls of ``gm``, in graph order.

    ``example_inputs`` are the backend's inputs (real tensors, one per
    placeholder); they are needed only to recognise gna_flex block masks.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    real = {n: v for n, v in zip(placeholders, example_inputs)}
    flex_target = _flex_target()
    calls = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in SDPA_TARGETS:
            calls.append(_call(node, "sdpa", normalize_sdpa_args(node)))
        elif flex_target is not None and node.target is flex_target:
            q, k, v, score_mod, block_mask, scale, kernel_options = (list(node.args) + [None] * 7)[:7]
            args = {"query": q, "key": k, "value": v, "score_mod": score_mod, "block_mask": block_mask,
                    "scale": scale, "kernel_options": kernel_options, "rest": tuple(node.args[7:])}
            call = _call(node, "flex", args)
            call.gna_mask = block_mask_marker(node, real)
            calls.append(call)
    return calls


def output_users(node: fx.Node) -> dict[int, list[fx.Node]]:
    """For a node returning a tuple: index -> the getitem nodes reading it (others under key -1)."""
    users: dict[int, list[fx.Node]] = {}
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int):
            users.setdefault(user.args[1], []).append(user)
        else:
            users.setdefault(-1, []).append(user)
    return users
