"""Fold the caller's tile-major permutation chains into a rewritten flex_attention call.

A model that uses a tile-major ``gna_flex.block_mask`` reorders its tokens
itself: native ``q, k, v`` -> tile-major ``[B, heads, S_pad, D]`` ->
``flex_attention`` -> tile-major output -> native again. The gna_flex op
reads and writes the native layout directly, so when the graph shows both
reorderings exactly, the op is fed the native tensors (through views), its
output replaces the end of the inverse chain, and the reordering nodes die.

Which chains are folded
-----------------------
A chain is a run of these single-input data-movement nodes (call_method or
call_function forms, any argument spelling Dynamo records):

* shape changes: ``reshape``, ``view`` (to a shape, not a dtype), ``flatten``,
  ``unflatten``, and the identities ``contiguous`` / ``clone``;
* axis orders: ``permute``, ``transpose``, ``swapaxes``/``swapdims``,
  ``movedim``/``moveaxis``;
* inputs only: ``F.pad`` with zeros (``mode="constant"``, value 0/None) that
  pads one whole grid axis at its end (nothing before, nothing on other axes);
* output only: ``narrow`` / ``x[..., :L, ...]`` slicing that keeps the first
  ``L`` positions of one whole padded grid axis (dropping the padding).

Each node's effect is tracked symbolically: every axis of the source
(``b``, ``h``, ``d`` and the grid axes ``g0..``) is cut into factors by
reshapes, factors are moved by permutes; the result is compared with the
tile-major order of the block mask's ``(grid, tile)`` (tiles of the padded
grid in raster order, tokens of a tile in raster order). No data is read:
the check is exact, on the static shapes Dynamo recorded.

* An input is folded when some node of its chain (the earliest that works) is
  a *native* tensor ``[B, heads, *grid, D]``, ``[B, *grid, heads, D]``,
  ``[B, heads, N, D]`` or ``[B, N, heads, D]`` (``N = prod(grid)``, raster
  order) and the nodes after it turn it into exactly the tile-major
  ``[B, heads, S_pad, D]`` with every padded axis zero-padded to whole tiles.
* The output is folded when, following ``out[0]`` forward through nodes that
  have a single user, some node holds the output with every axis whole and
  no padding (any arrangement of whole axes, e.g. ``[B, heads, *grid, Dv]``,
  ``[B, *grid, heads, Dv]``, ``[B, N, heads * Dv]``); the furthest such node
  is replaced by the op's output and a ``permute``/``reshape`` of it.

The chains :func:`gna_flex.layout.permute` / :func:`~gna_flex.layout.unpermute`
emit for a grid that the tile divides (``reshape -> permute -> reshape``,
with ``unflatten``/``flatten`` for raster-flat inputs or outputs, and with
the ``transpose(1, 2)`` of ``heads_last=True`` tensors) are folded. For a
grid that needs padding they write into a fresh buffer (``new_zeros`` or
``new_empty`` and one ``copy_`` per region): not a view chain, so not folded;
the user's own ``F.pad`` -> ``view`` -> ``permute`` -> ``reshape`` and
``reshape`` -> ``permute`` -> ``reshape`` -> slice chains are. Not folded
either: masks with extra tokens, calls whose q, k or v is not such a chain
(e.g. a ``cat``, an arithmetic op, ``.mT``/``.T``, ``expand``, integer
indexing in the chain), and outputs read by anything other than one such
chain before they are back in a native layout. All of those are left to the
op's reorder-by-copy path, and the explain row says why
(``permutation_folded=False``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import fx

from gna_flex.layout import make_tile_layout

__all__ = ["Piece", "Structure", "FoldPlan", "plan_fold", "apply_fold"]


@dataclass(frozen=True)
class Piece:
    """A factor of one source axis: coordinate ``c`` in ``[0, size)`` adds ``c * stride`` to that axis' index."""

    axis: str
    stride: int
    size: int


@dataclass
class Structure:
    """How each dim of a tensor is made of source-axis factors (major to minor), plus padded axes.

    ``padded[axis]`` is the padded length of a grid axis that was zero-padded
    at its end; positions past the axis' true length are zeros.
    """

    dims: list[tuple[Piece, ...]]
    padded: dict[str, int] = field(default_factory=dict)


def _merge(pieces) -> tuple[Piece, ...]:
    """Drop size-1 factors and merge neighbours that are consecutive factors of one axis."""
    out: list[Piece] = []
    for p in pieces:
        if p.size == 1:
            continue
        if out and out[-1].axis == p.axis and out[-1].stride == p.stride * p.size:
            q = out.pop()
            p = Piece(p.axis, p.stride, q.size * p.size)
        out.append(p)
    return tuple(out)


def _canon(s: Structure) -> tuple:
    return tuple(_merge(d) for d in s.dims), tuple(sorted(s.padded.items()))


def _reshape(s: Structure, shape: tuple[int, ...]) -> Union[Structure, str]:
    queue = [p for d in s.dims for p in _merge(d)]
    dims = []
    for m in shape:
        group, prod = [], 1
        while prod < m:
            if not queue:
                return f"reshape to {shape} does not preserve the number of elements"
            p = queue.pop(0)
            if prod * p.size <= m:
                group.append(p)
                prod *= p.size
                continue
            need = m // prod
            if m % prod or p.size % need:
                return f"reshape to {shape} splits a factor of axis {p.axis} unevenly"
            group.append(Piece(p.axis, p.stride * (p.size // need), need))
            queue.insert(0, Piece(p.axis, p.stride, p.size // need))
            prod *= need
        if prod != m:
            return f"reshape to {shape} does not preserve the number of elements"
        dims.append(_merge(group))
    if queue:
        return f"reshape to {shape} does not preserve the number of elements"
    return Structure(dims, dict(s.padded))


# --------------------------------------------------------------------------- the node kinds of a chain

_RESHAPE_METHODS = {"reshape", "view", "flatten", "unflatten", "contiguous", "clone"}
_RESHAPE_FUNCS = {torch.reshape, torch.flatten, torch.unflatten, torch.clone}
_PERMUTE_METHODS = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"}
_PERMUTE_FUNCS = {torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.movedim, torch.moveaxis}
_PAD_FUNCS = {torch._C._nn.pad, F.pad}
_NARROW_FUNCS = {torch.narrow}


def _value(n: Any) -> Any:
    return n.meta.get("example_value", n.meta.get("val")) if isinstance(n, fx.Node) else None


def _static_shape(n: fx.Node) -> Optional[tuple[int, ...]]:
    v = _value(n)
    if not isinstance(v, torch.Tensor) or not all(isinstance(d, int) for d in v.shape):
        return None
    return tuple(v.shape)


def _kind(node: fx.Node) -> Optional[str]:
    if node.op == "call_method":
        if node.target in _RESHAPE_METHODS:
            return "reshape"
        if node.target in _PERMUTE_METHODS:
            return "permute"
        if node.target == "narrow":
            return "narrow"
        return None
    if node.op != "call_function":
        return None
    if node.target in _RESHAPE_FUNCS:
        return "reshape"
    if node.target in _PERMUTE_FUNCS:
        return "permute"
    if node.target in _PAD_FUNCS:
        return "pad"
    if node.target in _NARROW_FUNCS:
        return "narrow"
    if node.target is operator.getitem:
        return "slice"
    return None


def chain_input(node: fx.Node) -> Optional[fx.Node]:
    """The tensor a data-movement node reads, when ``node`` is one (with only constant arguments), else None."""
    if _kind(node) is None or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    consts: list[fx.Node] = []
    fx.node.map_arg((node.args[1:], node.kwargs), consts.append)
    if consts:
        return None
    src, out = _value(node.args[0]), _value(node)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor) or src.dtype != out.dtype:
        return None
    return node.args[0]


def _perm_of(node: fx.Node, ndim: int) -> Optional[list[int]]:
    """Which input dim each output dim of a permute-like node is (read off strides on the meta device)."""
    probe = torch.empty_strided((1,) * ndim, [10**k for k in range(ndim)], device="meta")
    try:
        if node.op == "call_method":
            out = getattr(probe, node.target)(*node.args[1:], **node.kwargs)
        else:
            out = node.target(probe, *node.args[1:], **node.kwargs)
    except (RuntimeError, TypeError, IndexError, ValueError):
        return None
    by_stride = {10**k: k for k in range(ndim)}
    perm = [by_stride.get(st) for st in out.stride()]
    return perm if None not in perm and sorted(perm) == list(range(ndim)) else None


def _slices(node: fx.Node, shape: tuple[int, ...]) -> Optional[list[tuple[int, int]]]:
    """Per dim ``(start, stop)`` of a narrow / basic-slicing node, or None for other indexing."""
    if node.target is operator.getitem:
        idx = node.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        if sum(i is Ellipsis for i in idx) > 1 or not all(isinstance(i, slice) or i is Ellipsis for i in idx):
            return None
        if Ellipsis in idx:
            at = idx.index(Ellipsis)
            idx = idx[:at] + (slice(None),) * (len(shape) - len(idx) + 1) + idx[at + 1 :]
        if len(idx) > len(shape):
            return None
        idx = idx + (slice(None),) * (len(shape) - len(idx))
        out = []
        for i, n in zip(idx, shape):
            start, stop, step = i.indices(n)
            if step != 1:
                return None
            out.append((start, max(stop, start)))
        return out
    names = ("dim", "start", "length")
    args = list(node.args[1:]) + [node.kwargs[k] for k in names[len(node.args) - 1 :] if k in node.kwargs]
    if len(args) != 3 or not all(isinstance(a, int) for a in args):
        return None
    dim, start, length = args
    dim = dim % len(shape)
    start = start % shape[dim] if start < 0 else start
    return [(start, start + length) if k == dim else (0, n) for k, n in enumerate(shape)]


def _apply(s: Structure, node: fx.Node, grid_len: dict[str, int], allow_pad: bool) -> Union[Structure, str]:
    """The structure after one chain node, or why the node cannot be followed."""
    kind = _kind(node)
    in_shape, out_shape = _static_shape(node.args[0]), _static_shape(node)
    if in_shape is None or out_shape is None:
        return f"{node.name}: dynamic (symbolic) shapes"
    if kind == "reshape":
        return _reshape(s, out_shape)
    if kind == "permute":
        perm = _perm_of(node, len(in_shape))
        if perm is None:
            return f"{node.name}: cannot read the axis order of {node.target}"
        return Structure([s.dims[k] for k in perm], dict(s.padded))
    if kind == "pad":
        if not allow_pad:
            return f"{node.name}: pads the output"
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        if mode != "constant" or value not in (None, 0, 0.0) or not isinstance(pad, (tuple, list)) or len(pad) % 2:
            return f"{node.name}: not a constant zero pad"
        dims, padded = list(s.dims), dict(s.padded)
        for k in range(len(pad) // 2):
            before, after = pad[2 * k], pad[2 * k + 1]
            d = len(in_shape) - 1 - k
            if before != 0 or after < 0:
                return f"{node.name}: pads dim {d} before its start or crops it"
            if after == 0:
                continue
            merged = _merge(dims[d])
            if len(merged) != 1 or merged[0].stride != 1 or merged[0].axis not in grid_len:
                return f"{node.name}: pads dim {d}, which is not one whole grid axis"
            axis = merged[0].axis
            if axis in padded or merged[0].size != grid_len[axis]:
                return f"{node.name}: pads grid axis {axis} twice"
            padded[axis] = merged[0].size + after
            dims[d] = (Piece(axis, 1, merged[0].size + after),)
        return Structure(dims, padded)
    if kind in ("slice", "narrow"):
        if allow_pad:
            return f"{node.name}: slices an input"
        ranges = _slices(node, in_shape)
        if ranges is None:
            return f"{node.name}: not a basic slice"
        dims, padded = list(s.dims), dict(s.padded)
        for d, ((start, stop), n) in enumerate(zip(ranges, in_shape)):
            if (start, stop) == (0, n):
                continue
            merged = _merge(dims[d])
            axis = merged[0].axis if len(merged) == 1 else None
            if axis not in padded or merged[0].stride != 1 or merged[0].size != padded[axis] or start != 0 \
                    or stop != grid_len[axis]:
                return f"{node.name}: slice of dim {d} does not drop exactly the padding of a grid axis"
            del padded[axis]
            dims[d] = (Piece(axis, 1, grid_len[axis]),)
        return Structure(dims, padded)
    return f"{node.name}: not a data-movement node"


# --------------------------------------------------------------------------- native layouts and the tile-major target


def _grid_axes(n: int) -> list[str]:
    return [f"g{a}" for a in range(n)]


def _native_layouts(shape: tuple[int, ...], grid: tuple[int, ...]) -> list[tuple[list[str], dict[str, int]]]:
    """Ways to read ``shape`` as a native tensor: (role of each dim, size of each axis).

    Roles: ``"b"``, ``"h"``, ``"d"``, a grid axis ``"g0"``.., or ``"G"`` (all grid axes flattened).
    """
    n, axes = len(grid), _grid_axes(len(grid))
    found = []
    candidates = [["b", "h", *axes, "d"], ["b", *axes, "h", "d"]]
    if n > 1:
        candidates += [["b", "h", "G", "d"], ["b", "G", "h", "d"]]
    for roles in candidates:
        if len(roles) != len(shape):
            continue
        sizes = dict(zip(roles, shape))
        if sizes.pop("G", math.prod(grid)) != math.prod(grid):
            continue
        if all(sizes.get(g, grid[a]) == grid[a] for a, g in enumerate(axes)):
            sizes.update(zip(axes, grid))
            found.append((roles, sizes))
    return found


def _structure_of(roles: list[str], sizes: dict[str, int], grid_axes: list[str]) -> Structure:
    dims = []
    for r in roles:
        if r == "G":
            dims.append(_merge(Piece(g, 1, sizes[g]) for g in grid_axes))
        else:
            dims.append(_merge([Piece(r, 1, sizes[r])]))
    return Structure(dims)


def _tile_major(grid, tile, sizes: dict[str, int], d_axis: str = "d") -> Structure:
    """``[B, heads, S_pad, D]`` in tile-major order of ``(grid, tile)``."""
    lay = make_tile_layout(grid, tile)
    axes = _grid_axes(len(grid))
    seq = [Piece(g, t, nt) for g, t, nt in zip(axes, lay.tile, lay.tiles)]
    seq += [Piece(g, 1, t) for g, t in zip(axes, lay.tile)]
    padded = {g: p for g, p, n in zip(axes, lay.padded_grid, lay.grid) if p != n}
    return Structure([_merge([Piece("b", 1, sizes["b"])]), _merge([Piece("h", 1, sizes["h"])]), _merge(seq),
                      _merge([Piece(d_axis, 1, sizes[d_axis])])], padded)


# --------------------------------------------------------------------------- planning


@dataclass
class InputFold:
    """A native tensor and what its dims are; ``chain`` are the nodes that led to the flex input."""

    source: fx.Node
    roles: list[str]
    chain: list[fx.Node]


@dataclass
class OutputFold:
    """The node to replace (end of the inverse chain), its structure, and the dead nodes before it."""

    end: fx.Node
    structure: Structure
    chain: list[fx.Node]


@dataclass
class FoldPlan:
    inputs: tuple[InputFold, InputFold, InputFold]
    output: OutputFold


def _match_input(node: fx.Node, grid, tile) -> Union[InputFold, str]:
    chain: list[fx.Node] = []
    root = node
    while (prev := chain_input(root)) is not None:
        chain.append(root)
        root = prev
    chain.reverse()  # forward order: chain[0] reads root
    axes = _grid_axes(len(grid))
    grid_len = dict(zip(axes, grid))
    # The first failure is reported: it comes from the earliest native-shaped candidate, the one
    # the user most likely meant.
    first: Optional[str] = None
    for start in range(len(chain) + 1):
        source = root if start == 0 else chain[start - 1]
        shape = _static_shape(source)
        if shape is None:
            continue
        for roles, sizes in _native_layouts(shape, tuple(grid)):
            s: Union[Structure, str] = _structure_of(roles, sizes, axes)
            for step in chain[start:]:
                s = _apply(s, step, grid_len, allow_pad=True)
                if isinstance(s, str):
                    break
            if isinstance(s, str):
                first = first or s
                continue
            if _canon(s) == _canon(_tile_major(grid, tile, sizes)):
                return InputFold(source, roles, chain[start:])
            first = first or f"the chain from {source.name} is not the tile-major order of grid {grid}, tile {tile}"
    return first or "no view/pad chain leads to it from a native [B, heads, *grid, D] or [B, *grid, heads, D] tensor"


def _is_native(s: Structure, full: dict[str, int]) -> bool:
    return not s.padded and all(p.stride == 1 and p.size == full[p.axis] for d in s.dims for p in _merge(d))


def _match_output(getter: fx.Node, grid, tile, sizes: dict[str, int]) -> Union[OutputFold, str]:
    axes = _grid_axes(len(grid))
    grid_len = dict(zip(axes, grid))
    full = {**sizes, **grid_len}
    s: Union[Structure, str] = _tile_major(grid, tile, sizes)
    node, walked, best = getter, [getter], None
    if _is_native(s, full):
        best = OutputFold(getter, s, [getter])
    reason = "its output is not brought back to the native layout by a view/slice chain"
    while len(node.users) == 1:
        user = next(iter(node.users))
        if chain_input(user) is not node:
            break
        s = _apply(s, user, grid_len, allow_pad=False)
        if isinstance(s, str):
            reason = s
            break
        walked.append(user)
        node = user
        if _is_native(s, full):
            best = OutputFold(user, s, list(walked))
    if best is None and len(node.users) > 1:
        reason = f"the tile-major output {node.name} has {len(node.users)} users"
    return best if best is not None else reason


def plan_fold(call, params, tile) -> Union[FoldPlan, str]:
    """How to fold the permutation chains around one tile-major flex call, or why they cannot be folded.

    ``call`` is a :class:`gna_flex.passes.match.AttentionCall` of kind flex
    whose mask is tile-major with no extra tokens.
    """
    from .match import output_users

    grid = tuple(params.grid)
    folds = []
    for name in ("query", "key", "value"):
        node = call.args[name]
        if not isinstance(node, fx.Node):
            return f"{name} is not a graph value"
        found = _match_input(node, grid, tile)
        if isinstance(found, str):
            return f"{name}: {found}"
        folds.append(found)
    getters = output_users(call.node).get(0, [])
    if len(getters) != 1:
        return "the attention output is read more than once"
    q = folds[0]
    q_sizes = dict(zip(q.roles, _static_shape(q.source)))
    v_sizes = dict(zip(folds[2].roles, _static_shape(folds[2].source)))
    sizes = {"b": q_sizes["b"], "h": q_sizes["h"], "d": v_sizes["d"]}
    out = _match_output(getters[0], grid, tile, sizes)
    if isinstance(out, str):
        return f"output: {out}"
    return FoldPlan(tuple(folds), out)


# --------------------------------------------------------------------------- applying


def _emit(graph: fx.Graph, op: str, target, args: tuple, meta_from: fx.Node) -> fx.Node:
    new = graph.create_node(op, target, args, {})
    new.meta = {k: v for k, v in meta_from.meta.items() if k not in ("example_value", "val", "tensor_meta")}
    fake_args = fx.node.map_arg(args, lambda n: n.meta.get("example_value"))
    fake_mode = getattr(fake_args[0], "fake_mode", None)
    if fake_mode is not None:
        with fake_mode:
            value = getattr(fake_args[0], target)(*fake_args[1:]) if op == "call_method" else target(*fake_args)
        new.meta["example_value"] = value
    return new


def _raster_view(graph: fx.Graph, fold: InputFold, ndim: int, meta_from: fx.Node) -> fx.Node:
    """The native source as ``[B, heads, N, D]`` in raster order (permute + flatten: views of the source)."""
    axes = _grid_axes(ndim)
    roles = fold.roles
    order = ["b", "h", *(["G"] if "G" in roles else axes), "d"]
    perm = [roles.index(r) for r in order]
    x = fold.source
    if perm != list(range(len(perm))):
        x = _emit(graph, "call_method", "permute", (x, perm), meta_from)
    if "G" not in roles and ndim > 1:
        x = _emit(graph, "call_method", "flatten", (x, 2, 1 + ndim), meta_from)
    return x


def _native_output(graph: fx.Graph, out: fx.Node, plan: OutputFold, grid, meta_from: fx.Node) -> fx.Node:
    """The op's ``[B, heads, N, Dv]`` output rearranged into the end of the inverse chain."""
    axes = _grid_axes(len(grid))
    native = ["b", "h", *axes, "d"]
    x = out
    if len(grid) > 1:
        x = _emit(graph, "call_method", "unflatten", (x, 2, tuple(grid)), meta_from)
    order = [p.axis for d in plan.structure.dims for p in _merge(d)]
    order += [a for a in native if a not in order]
    perm = [native.index(a) for a in order]
    if perm != list(range(len(perm))):
        x = _emit(graph, "call_method", "permute", (x, perm), meta_from)
    target = _static_shape(plan.end)
    if tuple(x.meta["example_value"].shape) != target:
        x = _emit(graph, "call_method", "reshape", (x, target), meta_from)
    return x


def _erase_dead(graph: fx.Graph, nodes, erased: set) -> None:
    """Erase the nodes of a chain (last first) that nothing reads any more; q, k and v may share one chain."""
    for n in reversed(list(nodes)):
        if n not in erased and not n.users:
            graph.erase_node(n)
            erased.add(n)


def apply_fold(graph: fx.Graph, call, params, plan: FoldPlan, scale, backend: Optional[str] = None) -> None:
    """Replace the flex call by the op on the native tensors and the inverse chain's end by its output.

    The op is ``gna_flex::rewritten_attention`` in raster order (``tile=None``):
    it takes ``[B, heads, N, D]`` views of the native tensors and returns
    ``[B, heads, N, Dv]``, which is unflattened / permuted / reshaped into the
    shape of the inverse chain's end.
    """
    from .rewrite import _OP, _replace

    grid = tuple(params.grid)
    views: dict = {}
    with graph.inserting_before(call.node):
        for f in plan.inputs:
            key = (f.source, tuple(f.roles))
            if key not in views:
                views[key] = _raster_view(graph, f, len(grid), call.node)
    q, k, v = (views[(f.source, tuple(f.roles))] for f in plan.inputs)
    gqa = _static_shape(q)[1] != _static_shape(k)[1]
    args = (q, k, v, list(grid), list(params.kernel_size), list(params.stride), list(params.dilation),
            list(params.is_causal), 0, False, scale, gqa, backend, None)
    new = _replace(graph, call.node, _OP, args, {}, plan.output.chain[0])
    with graph.inserting_before(call.node):
        tail = _native_output(graph, new, plan.output, grid, plan.output.end)
    plan.output.end.replace_all_uses_with(tail)
    erased: set = set()
    _erase_dead(graph, plan.output.chain, erased)
    graph.erase_node(call.node)
    for f in plan.inputs:
        _erase_dead(graph, f.chain, erased)
