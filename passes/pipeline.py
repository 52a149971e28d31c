"""The gna pass: find attention calls, decide, rewrite, and report one row per call."""

from __future__ import annotations

from typing import Any, Sequence

from torch import fx

from .decide import decide_sdpa
from .explain import ExplainRow
from .match import AttentionCall, find_attention
from .rewrite import flex_rewrite_blocker, rewrite_flex, rewrite_sdpa
from .rule import Rule

__all__ = ["gna_pass"]


def _row(call: AttentionCall, rewritten: bool, reason: str, rule: str = "", speedup=None, path=None) -> ExplainRow:
    dtype = str(call.dtype).removeprefix("torch.") if call.dtype is not None else ""
    return ExplainRow(graph=0, module=call.module, module_type=call.module_type, kind=call.kind, shapes=call.shapes,
                      dtype=dtype, rule=rule, predicted_speedup=speedup, path=path or "", rewritten=rewritten,
                      reason=reason)


def gna_pass(gm: fx.GraphModule, example_inputs: Sequence[Any], rules: Sequence[Rule]) -> list[ExplainRow]:
    """Rewrite ``gm`` in place and return one :class:`ExplainRow` per attention call (graph order).

    * SDPA calls: rewritten when a rule matches and the simulator predicts at
      least the rule's ``min_speedup`` (:func:`gna_flex.passes.decide.decide_sdpa`).
    * flex_attention calls whose block mask came from ``gna_flex.block_mask``:
      rewritten to the gna_flex op, no rule needed; the mask already says it
      is GNA and the op computes the same function. Raster-order masks are
      read through views; tile-major ones are reordered to the native layout
      and back by copies inside the op (folding the caller's own permutation
      chain is not done yet).
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
        rewrite_flex(gm.graph, call)
        changed = True
        how = ("raster order, read through views" if tile is None
               else f"tile-major order (tile {tile}), reordered by copies")
        rows.append(_row(call, True, f"block mask from gna_flex.block_mask; {how}", rule))
    if changed:
        gm.graph.lint()
        gm.recompile()
    return rows
