"""GNA parameters, their validation, and the one window rule.

Everything in gna_flex that decides whether a key is a neighbour of a query
(the reference, the mask_mods, the block-mask builder, the simulator, the
kernel dispatch and the rewrite pass) calls :func:`axis_window` or
:func:`neighbors` from this module. The rule follows NATTEN exactly; per axis
of length ``L`` with window ``w``, stride ``s``, dilation ``d`` and causal flag
``c``, for query coordinate ``i``::

    g, ii = i % d, i // d                        # dilation group, index in group
    Lg    = L // d + (1 if g < L % d else 0)     # length of this dilation group
    left  = w // 2
    if c:
        leader = min((ii // s) * s + s - 1, Lg - 1)    # last query of the stride group
        start  = max(leader - (w - 1), 0) ; end = ii + 1
    else:
        leader = min((ii // s) * s + s // 2, Lg - 1)   # centre query of the stride group
        start  = min(max(leader - left, 0), Lg - w) ; end = start + w

Key ``j`` is a neighbour on the axis iff ``j % d == g and start <= j // d < end``;
a key is a neighbour iff it is one on every axis.

The rule is written with torch ops only (``torch.where`` instead of
``min``/``max``/``if``), so it runs vectorised on coordinate tensors, inside a
FlexAttention ``mask_mod`` under ``torch.compile`` and ``vmap``, and with the
parameters themselves given as tensors (which is how compiled masks avoid a
recompile per configuration).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "GNAParams",
    "make_params",
    "normalize_axes",
    "axis_window",
    "axis_neighbors",
    "neighbors",
    "unravel",
    "axis_windows",
    "count_pairs",
]

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]
IntLike = Union[int, Tensor]
BoolLike = Union[bool, Tensor]

_AXIS_NAMES = ("axis 0", "axis 1", "axis 2")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def normalize_axes(value: object, ndim: int, name: str, *, kind: type = int) -> tuple:
    """Expand an int/bool or a per-axis sequence into a tuple of ``ndim`` entries.

    Raises ``TypeError`` for entries of the wrong type and ``ValueError`` when a
    sequence has the wrong number of entries; both messages name ``name``.
    """
    check = (lambda v: isinstance(v, (bool, int)) and not isinstance(v, float)) if kind is bool else _is_int
    want = "bools" if kind is bool else "integers"
    if isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Python {kind.__name__} or a tuple of {want}, got a Tensor")
    if check(value):
        return (kind(value),) * ndim
    if isinstance(value, (tuple, list)):
        if len(value) != ndim:
            raise ValueError(
                f"{name} has {len(value)} entries but the token grid has {ndim} axes; "
                f"give one {kind.__name__} or a tuple of {ndim}"
            )
        for axis, v in enumerate(value):
            if not check(v):
                raise TypeError(f"{name}[{axis}] (axis {axis}) must be a {kind.__name__}, got {v!r}")
        return tuple(kind(v) for v in value)
    raise TypeError(f"{name} must be a {kind.__name__} or a tuple of {want}, got {value!r}")


@dataclass(frozen=True)
class GNAParams:
    """Validated GNA parameters for a token grid with 1, 2 or 3 axes.

    Attributes are tuples with one entry per axis, outermost axis first (the
    order of the grid dimensions in a ``[B, *grid, heads, D]`` tensor).
    Build instances with :func:`make_params`, which validates.
    """

    grid: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]

    @property
    def ndim(self) -> int:
        return len(self.grid)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    def axis(self, a: int) -> tuple[int, int, int, int, bool]:
        """``(length, kernel_size, stride, dilation, is_causal)`` of axis ``a``."""
        return self.grid[a], self.kernel_size[a], self.stride[a], self.dilation[a], self.is_causal[a]

    def as_tensor(self, device: Union[str, torch.device, None] = None) -> Tensor:
        """The parameters as an int64 tensor of shape ``[5, ndim]``.

        Rows: grid, kernel_size, stride, dilation, is_causal (0/1). Masks that
        read their parameters from this tensor compile once for all configs of
        one rank.
        """
        return torch.tensor(
            [self.grid, self.kernel_size, self.stride, self.dilation, [int(c) for c in self.is_causal]],
            dtype=torch.int64,
            device=device,
        )

    def is_dense(self) -> bool:
        """True when every query sees every key (window covers each whole axis)."""
        return all(w == length and d == 1 and not c for length, w, _, d, c in map(self.axis, range(self.ndim)))


def make_params(
    grid: IntOrTuple,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
) -> GNAParams:
    """Validate GNA parameters against a token grid and return :class:`GNAParams`.

    Args:
        grid: token grid sizes, outermost axis first: ``L``, ``(H, W)`` or ``(T, H, W)``.
        kernel_size: window size per axis; ``2 <= kernel_size`` and
            ``kernel_size * dilation <= L``.
        stride: query group size per axis; ``1 <= stride <= kernel_size``.
            1 is neighborhood attention, ``kernel_size`` is blocked attention.
        dilation: per axis, ``>= 1``.
        is_causal: per axis.

    Raises:
        TypeError: a non-integer (or non-bool for ``is_causal``) argument.
        ValueError: a value outside its range, or a tuple whose length differs
            from the grid's number of axes; the message names the argument,
            the axis and the allowed range.
    """
    if _is_int(grid):
        grid_t = (int(grid),)
    elif isinstance(grid, (tuple, list, torch.Size)):
        grid_t = tuple(grid)
        for axis, n in enumerate(grid_t):
            if not _is_int(n):
                raise TypeError(f"grid[{axis}] (axis {axis}) must be an integer, got {n!r}")
        grid_t = tuple(int(n) for n in grid_t)
    else:
        raise TypeError(f"grid must be an int or a tuple of 1 to 3 integers, got {grid!r}")
    if not 1 <= len(grid_t) <= 3:
        raise ValueError(f"grid must have 1, 2 or 3 axes, got {len(grid_t)}: {grid_t}")
    for axis, n in enumerate(grid_t):
        if n < 1:
            raise ValueError(f"grid[{axis}] (axis {axis}) must be >= 1, got {n}")
    ndim = len(grid_t)
    ks = normalize_axes(kernel_size, ndim, "kernel_size")
    st = normalize_axes(stride, ndim, "stride")
    di = normalize_axes(dilation, ndim, "dilation")
    ca = normalize_axes(is_causal, ndim, "is_causal", kind=bool)
    for axis in range(ndim):
        length, w, s, d = grid_t[axis], ks[axis], st[axis], di[axis]
        if w < 2:
            raise ValueError(f"kernel_size[{axis}] (axis {axis}) must be >= 2, got {w}")
        if d < 1:
            raise ValueError(f"dilation[{axis}] (axis {axis}) must be >= 1, got {d}")
        if not 1 <= s <= w:
            raise ValueError(f"stride[{axis}] (axis {axis}) must be in [1, kernel_size={w}], got {s}")
        if w * d > length:
            raise ValueError(
                f"kernel_size[{axis}] * dilation[{axis}] (axis {axis}) must be <= the grid length {length}, "
                f"got {w} * {d} = {w * d}"
            )
    return GNAParams(grid_t, ks, st, di, ca)


def _min(a, b):
    return torch.where(a < b, a, b)


def _max(a, b):
    return torch.where(a > b, a, b)


def axis_window(
    i: Tensor,
    length: IntLike,
    kernel_size: IntLike,
    stride: IntLike,
    dilation: IntLike,
    is_causal: BoolLike,
) -> tuple[Tensor, Tensor, Tensor]:
    """The window of query coordinates ``i`` on one axis (the GNA rule).

    Args:
        i: integer tensor of query coordinates on this axis, any shape.
        length, kernel_size, stride, dilation: ints or integer tensors
            broadcastable with ``i``.
        is_causal: a bool or a bool/integer tensor broadcastable with ``i``.

    Returns:
        ``(group, start, end)``, each shaped like ``i``: key ``j`` is a
        neighbour on this axis iff ``j % dilation == group`` and
        ``start <= j // dilation < end``.
    """
    d, w, s = dilation, kernel_size, stride
    g = i % d
    ii = i // d
    lg = length // d + torch.where(g < length % d, 1, 0)

    def causal():
        leader = _min((ii // s) * s + s - 1, lg - 1)
        return _max(leader - (w - 1), 0), ii + 1

    def centred():
        leader = _min((ii // s) * s + s // 2, lg - 1)
        start = _min(_max(leader - w // 2, 0), lg - w)
        return start, start + w

    if isinstance(is_causal, Tensor):
        cs, ce = causal()
        ns, ne = centred()
        c = is_causal.bool()
        return g, torch.where(c, cs, ns), torch.where(c, ce, ne)
    start, end = causal() if is_causal else centred()
    return g, start, end


def axis_neighbors(i: Tensor, j: Tensor, length, kernel_size, stride, dilation, is_causal) -> Tensor:
    """Bool tensor: key coordinate ``j`` is a neighbour of query ``i`` on one axis (broadcasts)."""
    g, start, end = axis_window(i, length, kernel_size, stride, dilation, is_causal)
    jj = j // dilation
    return (j % dilation == g) & (start <= jj) & (jj < end)


def neighbors(params: GNAParams, q_coords: Sequence[Tensor], k_coords: Sequence[Tensor]) -> Tensor:
    """Bool tensor: key at ``k_coords`` is a neighbour of the query at ``q_coords``.

    ``q_coords`` and ``k_coords`` hold one integer tensor per axis; all of them
    broadcast together (e.g. queries as a column and keys as a row give the
    ``[Sq, Sk]`` mask).
    """
    out = None
    for a in range(params.ndim):
        m = axis_neighbors(q_coords[a], k_coords[a], *params.axis(a))
        out = m if out is None else out & m
    return out


def unravel(index: Tensor, grid: Sequence[IntLike]) -> list[Tensor]:
    """Raster (row-major) token index -> one coordinate tensor per axis."""
    coords = []
    rest = index
    for n in reversed(grid):
        coords.append(rest % n)
        rest = rest // n
    return coords[::-1]


def axis_windows(params: GNAParams, axis: int, device=None) -> tuple[Tensor, Tensor, Tensor]:
    """``(group, start, end)`` for every query coordinate ``0..L-1`` of ``axis`` (int64 tensors)."""
    length = params.grid[axis]
    i = torch.arange(length, device=device)
    return axis_window(i, *params.axis(axis))


def count_pairs(params: GNAParams) -> int:
    """Number of (query, key) pairs the rule allows over the whole grid (grid tokens only).

    The neighbour set is a product over axes, so the count factorises into a
    product of per-axis sums of window sizes.
    """
    total = 1
    for a in range(params.ndim):
        _, start, end = axis_windows(params, a)
        total *= int((end - start).sum())
    return total
