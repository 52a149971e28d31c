"""Decide, per attention call, whether to rewrite it to GNA.

An SDPA call is eligible when it is plain self-attention over a 4-D
``[B, heads, S, D]`` problem: not causal, no dropout, query
and key of one length, heads equal (or GQA with ``enable_gqa=True``), static
shapes; an ``attn_mask``, if any, is boolean or floating point with static
shape broadcastable to ``[B, heads, S, S]``. The first rule whose ``module``
pattern matches the call's module path, whose ``prod(grid) + extra_tokens``
equals ``S`` and, for a call with an ``attn_mask``, that sets
``extra_key_mask`` is the call's rule (the mask's values are checked at run
time by the op, :mod:`.key_padding`).
The call is rewritten when the simulator predicts at least the rule's
``min_speedup``.

Predicted speedup of the whole call. The rewritten call runs GNA for the
``N`` grid queries and a dense SDPA for the ``E`` extra queries, so with
``gna`` and ``dense`` from :func:`gna_flex.sim.estimate` (grid queries over
all ``N + E`` keys)::

    speedup = dense * (N + E) / N  /  (gna + dense * E / N)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional, Sequence

import torch
from torch import fx

from gna_flex.sim import device_family, estimate, path_simulate_kwargs, simulate
from gna_flex.spec import GNAParams

from .match import AttentionCall
from .rule import Rule

__all__ = ["Decision", "decide_sdpa", "predict_speedup", "predicted_path"]


@dataclass(frozen=True)
class Decision:
    """What the pass does with one call and why."""

    rewrite: bool
    reason: str
    rule_index: Optional[int] = None
    rule: Optional[Rule] = None
    speedup: Optional[float] = None
    #: the simulator path the prediction used: "kernel" or "flex".
    path: Optional[str] = None


def _cutlass_available() -> bool:
    try:
        from gna_flex import cutlass
    except ImportError:
        return False
    probe = getattr(cutlass, "is_available", None)
    return bool(probe()) if callable(probe) else False


def predicted_path(rule: Rule, device: Optional[torch.device], dtype: Optional[torch.dtype] = None) -> str:
    """The simulator path matching what ``gna_flex.ops`` will run for this rule on ``device``.

    The fused kernel runs float16/bfloat16 on an sm90 GPU with the extension
    built; anything else takes the flex path.
    """
    if rule.backend == "cutlass":
        return "kernel"
    if rule.backend in ("flex", "reference") or dtype not in (None, torch.float16, torch.bfloat16):
        return "flex"
    if device is not None and device.type == "cuda" and _cutlass_available():
        major, _ = torch.cuda.get_device_capability(device)
        if major == 9:
            return "kernel"
    return "flex"


@lru_cache(maxsize=256)
def _estimate(p: GNAParams, extra_tokens: int, heads: int, head_dim: int, batch: int, dtype: torch.dtype,
              family: Any, path: str):
    report = simulate(p.grid, p.kernel_size, p.stride, p.dilation, p.is_causal, extra_tokens=extra_tokens,
                      **path_simulate_kwargs(path))
    return estimate(report, heads, head_dim, batch, dtype, device=family, path=path)


def predict_speedup(rule: Rule, heads: int, head_dim: int, batch: int, dtype: torch.dtype,
                    device: Optional[torch.device], path: str) -> float:
    """Predicted speedup of the rewritten call over the dense call (see the module docstring)."""
    family = device_family(device if device is not None and device.type == "cuda" else "default")
    est = _estimate(rule.params, rule.extra_tokens, heads, head_dim, batch, dtype, family, path)
    n, e = rule.params.num_tokens, rule.extra_tokens
    dense_all = est.dense_ms * (n + e) / n
    rewritten = est.gna_ms + est.dense_ms * e / n
    return dense_all / rewritten


def _const(value: Any) -> bool:
    return not isinstance(value, fx.Node)


def _eligibility(call: AttentionCall) -> Optional[str]:
    """Why an SDPA call can never be GNA, or None when it can."""
    a = call.args
    qs, ks, vs = call.query_shape, call.key_shape, call.value_shape
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        return f"inputs are not 4-D [B, heads, S, D] ({call.shapes})"
    if any(d < 0 for d in (*qs, *ks, *vs)):
        return "dynamic (symbolic) shapes"
    mask = a["attn_mask"]
    if mask is not None:
        why = _mask_eligibility(mask, qs, ks)
        if why is not None:
            return why
    if not _const(a["is_causal"]) or a["is_causal"]:
        return "is_causal=True (causal SDPA is not a GNA rule)"
    if not _const(a["dropout_p"]) or a["dropout_p"] != 0:
        return f"dropout_p={a['dropout_p']} (GNA has no dropout)"
    if not _const(a["scale"]) or not _const(a["enable_gqa"]):
        return "scale or enable_gqa is not a constant"
    if call.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {call.dtype} is not float16, bfloat16 or float32"
    b, h, s, d = qs
    if ks[0] != b or vs[0] != b:
        return "query, key and value batch sizes differ"
    if ks[2] != s or vs[2] != s:
        return f"query length {s} differs from key length {ks[2]} (cross-attention)"
    if ks[3] != d:
        return "query and key head dims differ"
    if ks[1] != vs[1]:
        return "key and value head counts differ"
    if ks[1] != h and not (a["enable_gqa"] and h % ks[1] == 0):
        return f"query heads {h} differ from key heads {ks[1]} without enable_gqa"
    return None


def _mask_eligibility(mask: Any, qs: tuple[int, ...], ks: tuple[int, ...]) -> Optional[str]:
    """Why an attn_mask can never be an extra-key padding mask (static checks only), or None."""
    example = mask.meta.get("example_value", mask.meta.get("val")) if isinstance(mask, fx.Node) else mask
    if not isinstance(example, torch.Tensor):
        return "has an attn_mask that is not a tensor"
    if example.dtype != torch.bool and not example.dtype.is_floating_point:
        return f"has an attn_mask of dtype {example.dtype} (neither boolean nor additive float)"
    shape = tuple(d if isinstance(d, int) else -1 for d in example.shape)
    target = (qs[0], qs[1], qs[2], ks[2])
    if not 1 <= len(shape) <= 4 or any(d not in (1, t) for d, t in zip(reversed(shape), reversed(target))):
        return f"has an attn_mask of shape {'x'.join(str(d) if d >= 0 else '?' for d in shape)} that does not " \
               f"broadcast to [B, heads, S, S] ({'x'.join(map(str, target))})"
    return None


def decide_sdpa(call: AttentionCall, rules: Sequence[Rule]) -> Decision:
    """The decision for one SDPA call under ``rules`` (first matching rule wins)."""
    if not rules:
        return Decision(False, "no rules given")
    why = _eligibility(call)
    if why is not None:
        return Decision(False, why)
    b, heads, s, head_dim = call.query_shape
    misses = []
    for index, rule in enumerate(rules):
        if not rule.matches_module(call.module):
            misses.append(f"rule {index}: module {call.module!r} does not match {rule.module!r}")
            continue
        if rule.seq_len != s:
            grid = "x".join(map(str, rule.params.grid))
            misses.append(
                f"rule {index}: length {s} != grid {grid} ({rule.params.num_tokens}) + {rule.extra_tokens} extra"
            )
            continue
        if call.args["attn_mask"] is not None and not rule.extra_key_mask:
            misses.append(f"rule {index}: the call has an attn_mask and the rule does not set extra_key_mask")
            continue
        path = predicted_path(rule, call.device, call.dtype)
        speedup = predict_speedup(rule, heads, head_dim, b, call.dtype, call.device, path)
        if not math.isfinite(speedup) or speedup < rule.min_speedup:
            return Decision(False, f"predicted speedup {speedup:.2f}x < min_speedup {rule.min_speedup:g}",
                            index, rule, speedup, path)
        masked = "; attn_mask checked at run time as a key-padding mask over the extra tokens" \
            if call.args["attn_mask"] is not None else ""
        return Decision(True, f"predicted speedup {speedup:.2f}x >= min_speedup {rule.min_speedup:g}{masked}",
                        index, rule, speedup, path)
    return Decision(False, "no rule matches: " + "; ".join(misses))
