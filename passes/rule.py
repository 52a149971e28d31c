"""``Rule``: a user's declaration that some attention calls are GNA.

A rule says: "the scaled_dot_product_attention calls of modules whose path
matches ``module``, whose query/key length is ``prod(grid) + extra_tokens``,
are really GNA over this token grid with this window". The backend rewrites a
matching call only when the simulator predicts at least ``min_speedup``.

Token order of a matching call's sequence axis: the ``prod(grid)`` grid tokens
in raster (row-major) order, and the ``extra_tokens`` (e.g. text) either after
them (``extra_position="end"``) or before them (``"start"``). Grid queries
attend to their window plus every extra key (one softmax); extra queries
attend to every key, exactly as in the dense call.

Calls with an ``attn_mask`` are rewritten only under a rule with
``extra_key_mask=True``, and then only when the mask, read at run time, is a
key-padding mask over the extra tokens (see :mod:`.key_padding`).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Optional

from gna_flex.ops import BACKENDS
from gna_flex.spec import BoolOrTuple, GNAParams, IntOrTuple, make_params

__all__ = ["Rule", "EXTRA_POSITIONS"]

EXTRA_POSITIONS = ("end", "start")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class Rule:
    """Declare that matching SDPA calls compute GNA over a token grid.

    Args:
        grid: token grid ``L``, ``(H, W)`` or ``(T, H, W)``, outermost axis
            first (raster order of the sequence axis).
        kernel_size, stride, dilation, is_causal: GNA parameters, an int/bool
            or one per axis (see :func:`gna_flex.spec.make_params` for ranges).
        extra_tokens: number of non-grid tokens (text, registers) in the same
            sequence, ``>= 0``.
        extra_position: ``"end"`` (grid tokens first) or ``"start"``.
        module: regular expression that must match the *whole* path of the
            module calling SDPA (``re.fullmatch``; e.g. ``r"blocks\\.\\d+\\.attn"``),
            or None for any module.
        min_speedup: rewrite only when the simulator predicts at least this
            speedup over dense attention; 0 rewrites every matching call.
        backend: passed to :func:`gna_flex.functional.na`: None (fused kernel
            when it can run, else flex), ``"cutlass"``, ``"flex"`` or
            ``"reference"`` (dense masked fp32 attention, for tests).
        extra_key_mask: also rewrite calls that pass an ``attn_mask``, on the
            promise that it is a key-padding mask over the extra tokens (e.g.
            padded text): boolean or additive float, broadcastable to
            ``[B, heads, S, S]``, attending to every grid key and the same
            keys for every query row and head. At run time the op checks this
            and raises RuntimeError otherwise; grid queries then attend to
            their window plus their batch element's valid extra keys, extra
            queries run dense SDPA under the original mask. False (default):
            calls with an ``attn_mask`` are left alone.

    Raises:
        TypeError / ValueError at construction, naming the field and the axis.
    """

    grid: IntOrTuple
    kernel_size: IntOrTuple
    stride: IntOrTuple = 1
    dilation: IntOrTuple = 1
    is_causal: BoolOrTuple = False
    extra_tokens: int = 0
    extra_position: str = "end"
    module: Optional[str] = None
    min_speedup: float = 1.1
    backend: Optional[str] = None
    extra_key_mask: bool = False
    params: GNAParams = field(init=False, repr=False, compare=False)
    _pattern: Optional[re.Pattern] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            params = make_params(self.grid, self.kernel_size, self.stride, self.dilation, self.is_causal)
        except (TypeError, ValueError) as e:
            raise type(e)(f"Rule: {e}") from None
        if not _is_int(self.extra_tokens):
            raise TypeError(f"Rule: extra_tokens must be an integer, got {self.extra_tokens!r}")
        if self.extra_tokens < 0:
            raise ValueError(f"Rule: extra_tokens must be >= 0, got {self.extra_tokens}")
        if self.extra_position not in EXTRA_POSITIONS:
            raise ValueError(f"Rule: extra_position must be one of {EXTRA_POSITIONS}, got {self.extra_position!r}")
        pattern = None
        if self.module is not None:
            if not isinstance(self.module, str):
                raise TypeError(f"Rule: module must be a regular expression string or None, got {self.module!r}")
            try:
                pattern = re.compile(self.module)
            except re.error as e:
                raise ValueError(f"Rule: module {self.module!r} is not a valid regular expression: {e}") from None
        if isinstance(self.min_speedup, bool) or not isinstance(self.min_speedup, numbers.Real):
            raise TypeError(f"Rule: min_speedup must be a number, got {self.min_speedup!r}")
        if not math.isfinite(self.min_speedup) or self.min_speedup < 0:
            raise ValueError(f"Rule: min_speedup must be a finite number >= 0, got {self.min_speedup}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"Rule: backend must be None or one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.extra_key_mask, bool):
            raise TypeError(f"Rule: extra_key_mask must be a bool, got {self.extra_key_mask!r}")
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "_pattern", pattern)

    @property
    def seq_len(self) -> int:
        """Sequence length of a matching call: grid tokens plus extra tokens."""
        return self.params.num_tokens + self.extra_tokens

    def matches_module(self, path: str) -> bool:
        """Whether the module path (e.g. ``"blocks.0.attn"``) satisfies ``module``."""
        return self._pattern is None or self._pattern.fullmatch(path) is not None

    def describe(self) -> str:
        """Short human-readable form used in explain rows."""
        p = self.params
        parts = [f"grid={'x'.join(map(str, p.grid))}", f"kernel={'x'.join(map(str, p.kernel_size))}"]
        if any(s != 1 for s in p.stride):
            parts.append(f"stride={'x'.join(map(str, p.stride))}")
        if any(d != 1 for d in p.dilation):
            parts.append(f"dilation={'x'.join(map(str, p.dilation))}")
        if any(p.is_causal):
            parts.append(f"causal={p.is_causal}")
        if self.extra_tokens:
            parts.append(f"extra={self.extra_tokens}@{self.extra_position}")
        if self.extra_key_mask:
            parts.append("extra_key_mask")
        return " ".join(parts)

