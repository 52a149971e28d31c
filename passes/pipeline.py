"""The gna pass: find attention calls, decide, rewrite, and report one row per call."""

from __future__ import annotations

from typing import Any, Sequence

from torch import fx

from .decide import decide_sdpa
from .explain import ExplainRow
from .fold import apply_fold, plan_fold
from .match import AttentionCall, find_attention
from .rewrite import flex_rewrite_blocker, rewrite_flex, rewrite_sdpa
from .rule import Rule

__all__ = ["gna_pass"]


def _row(call: AttentionCall, rewritten: bool, reason: str, rule: str = "", speedup=None, path=None,
         folded=None) -> ExplainRow:
    dtype = str(call.dtype).removeprefix("torch.") if call.dtype is not None else ""
    return ExplainRow(graph=0, module=call.module, module_type=call.module_type, kind=call.kind, shapes=call.shapes,
                      dtype=dtype, rule=rule, predicted_speedup=speedup, path=path or "", rewritten=rewritten,
                      reason=reason, permutation_folded=folded)


def gna_pass(gm: fx.GraphModule, example_inputs: Sequence[Any], rules: Sequence[Rule]) -> list[ExplainRow]:
    """Rewrite ``gm`` in place and return one :class:`ExplainRow` per attention call (graph order).

    * SDPA calls: rewritten when a rule matches and the simulator predicts at
      least the rule's ``min_speedup`` (:func:`gna_flex.passes.decide.decide_sdpa`).
    * flex_attention calls whose block mask came from ``gna_flex.block_mask``:
      rewritten to the gna_flex op, no rule needed; the mask already says it
      is GNA and the op computes the same function. Raster-order masks are
      read through views. For tile-major masks the caller's own permutation
      chains are folded when they are exactly the tile-major order of native
      tensors and its inverse (:mod:`gna_flex.passes.fold` lists the chains):
      the op reads and writes the native tensors and the chains die. Otherwise
      the op reorders to the native layout and back by copies, and the row
      says why the chain was not folded (``permutation_folded=False``).
    """
    rows = []
    changed = False
    for call in find_attention(gm, example_inputs):
        if call.kind == "sdpa":
            d = decide_sdpa(call, rules)
            rule = f"{d.rule_index}: {d.rule.describe()}" if d.rule is not None else ""
            if d.rewrite:
                rewrite_sdpa(gm.graph, call, d)
                changed = True
            rows.append(_row(call, d.rewrite, d.reason, rule, d.speedup, d.path))
            continue
        if call.gna_mask is None:
            rows.append(_row(call, False, "block mask does not come from gna_flex.block_mask"))
            continue
        params, tile, extra = call.gna_mask
        rule = (f"block mask: grid={'x'.join(map(str, params.grid))} kernel={'x'.join(map(str, params.kernel_size))}"
                + (f" tile={'x'.join(map(str, tile))}" if tile is not None else ""))
        blocker = flex_rewrite_blocker(call)
        if blocker is not None:
            rows.append(_row(call, False, blocker, rule))
            continue
        changed = True
        if tile is None:
            rewrite_flex(gm.graph, call)
            rows.append(_row(call, True, "block mask from gna_flex.block_mask; raster order, read through views",
                             rule))
            continue
        plan = plan_fold(call, params, tile) if extra == 0 else "the mask has extra tokens"
        if isinstance(plan, str):
            rewrite_flex(gm.graph, call)
            rows.append(_row(call, True, f"block mask from gna_flex.block_mask; tile-major order (tile {tile}), "
                             f"reordered by copies; permutation chain not folded: {plan}", rule, folded=False))
            continue
        apply_fold(gm.graph, call, params, plan, call.args["scale"])
        rows.append(_row(call, True, f"block mask from gna_flex.block_mask; tile-major order (tile {tile}), "
                         "permutation folded: the op reads and writes the native tensors", rule, folded=True))
    if changed:
        gm.graph.lint()
        gm.recompile()
    return rows
