"""``explain(compiled)``: what the gna backend did with each attention call.

Every time the backend compiles a graph it records one :class:`ExplainRow`
per attention call it found. Records belong to the ``torch.compile`` call that
produced them (the wrapper object torch creates per ``torch.compile``), so
``explain(compiled)`` returns the rows of that compiled model only, for every
graph compiled so far (a model with graph breaks has several graphs; a model
that has not run yet has none).
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

__all__ = ["ExplainRow", "Explanation", "explain", "record", "current_owner"]


@dataclass(frozen=True)
class ExplainRow:
    """One attention call seen by the pass.

    Attributes:
        graph: index of the compiled graph (in compile order) within its model.
        module: dotted module path of the caller (``""`` for the root module).
        module_type: class name of that module.
        kind: ``"sdpa"`` or ``"flex"``.
        shapes: ``"q BxHxSxD, k ..., v ..."``.
        dtype: e.g. ``"bfloat16"``.
        rule: the matched rule (index and short form), or ``""``.
        predicted_speedup: the simulator's prediction for the matched rule, or None.
        path: the simulator path of the prediction (``"kernel"`` / ``"flex"``), or ``""``.
        rewritten: whether the call now runs GNA.
        reason: why (or why not).
        permutation_folded: flex calls with a tile-major mask: whether the caller's
            tile-major permutation chains were folded into the op (True) or the
            op reorders by copies (False; ``reason`` says why). None otherwise.
    """

    graph: int
    module: str
    module_type: str
    kind: str
    shapes: str
    dtype: str
    rule: str
    predicted_speedup: Optional[float]
    path: str
    rewritten: bool
    reason: str
    permutation_folded: Optional[bool] = None

    def asdict(self) -> dict[str, Any]:
        return asdict(self)


_COLUMNS = ("graph", "module", "kind", "shapes", "dtype", "rule", "speedup", "rewritten", "reason")


class Explanation(list):
    """A list of :class:`ExplainRow` that prints as a table (``print(explain(compiled))``)."""

    @property
    def num_rewritten(self) -> int:
        return sum(r.rewritten for r in self)

    def _cells(self, row: ExplainRow) -> tuple[str, ...]:
        speed = "" if row.predicted_speedup is None else f"{row.predicted_speedup:.2f}x"
        return (str(row.graph), row.module or "<root>", row.kind, row.shapes, row.dtype, row.rule, speed,
                "yes" if row.rewritten else "no", row.reason)

    def __str__(self) -> str:
        if not self:
            return "gna: no attention calls recorded (has the compiled model run yet?)"
        cells = [_COLUMNS] + [self._cells(r) for r in self]
        widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS))]
        lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(_COLUMNS))).rstrip() for c in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"{self.num_rewritten} of {len(self)} attention calls rewritten to GNA")
        return "\n".join(lines)

    def print(self, file=None) -> None:
        print(str(self), file=file)


# (weak reference to the owner, or None for calls made outside torch.compile, rows)
_RECORDS: list[tuple[Optional[weakref.ref], list[ExplainRow]]] = []


def current_owner() -> Optional[object]:
    """The ``torch.compile`` wrapper object that is calling the backend right now, if any.

    torch calls a string-named backend through one wrapper object per
    ``torch.compile`` call (``torch._TorchCompileWrapper``), whose
    ``__call__`` is a few frames up the stack; that object is also reachable
    from the compiled model (:func:`_owner_of`), which ties records to models.
    """
    wrapper_type = getattr(torch, "_TorchCompileWrapper", None)
    if wrapper_type is None:
        return None
    frame = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            break
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, wrapper_type):
            return candidate
        frame = frame.f_back
    return None


def record(owner: Optional[object], rows: list[ExplainRow]) -> int:
    """Store the rows of one compiled graph; returns the graph's index within its owner."""
    _RECORDS[:] = [r for r in _RECORDS if r[0] is None or r[0]() is not None]
    ref = weakref.ref(owner) if owner is not None else None
    index = sum(1 for r in _RECORDS if r[0] is not None and r[0]() is owner) if owner is not None else 0
    rows = [ExplainRow(**{**row.asdict(), "graph": index}) for row in rows]
    _RECORDS.append((ref, rows))
    return index


def _owner_of(compiled: Any) -> Optional[object]:
    """The wrapper object of ``torch.compile`` behind a compiled module or function."""
    from torch._dynamo.eval_frame import innermost_backend

    ctx = getattr(compiled, "dynamo_ctx", None)
    if ctx is None and callable(compiled):
        # torch.compile(fn) returns a closure over its dynamo context.
        for cell in getattr(compiled, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if hasattr(value, "callback"):
                ctx = value
                break
    callback = getattr(ctx, "callback", None)
    if callback is None:
        return None
    return innermost_backend(callback)


def explain(compiled: Any) -> Explanation:
    """Rows for every attention call the gna backend found in ``compiled``.

    Args:
        compiled: what ``torch.compile(model_or_fn, backend="gna", ...)`` returned.

    Returns:
        An :class:`Explanation` (a list of :class:`ExplainRow`; ``print`` it
        for a table). Empty until the compiled model has run once.

    Raises:
        TypeError: ``compiled`` is not the result of ``torch.compile``.
    """
    owner = _owner_of(compiled)
    if owner is None:
        raise TypeError(
            f"explain expects the object returned by torch.compile(..., backend='gna'), got {type(compiled).__name__}"
        )
    out = Explanation()
    for ref, rows in _RECORDS:
        if ref is not None and ref() is owner:
            out.extend(rows)
    return out
