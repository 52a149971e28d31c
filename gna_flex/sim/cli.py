"""``gna-sim``: the simulator, cost model and recommender on the command line.

Examples::

    gna-sim --grid 30x48x80 --kernel-size 18x24x24 --stride 16x8x8 --q-tile 2x8x8 --kv-tile 2x8x8
    gna-sim --grid 256x256 --kernel-size 80x80 --recommend --kernel-size-tolerance 4
    gna-sim --grid 32768 --kernel-size 2048 --stride 256 --json
    gna-sim --grid 30x48x80 --kernel-size 18x24x24 --plot visits.png

Sizes are ``AxBxC`` (one number per grid axis, or one number for all).
Bad arguments print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Optional, Sequence

from .cost import DEVICES, PATHS, estimate, path_simulate_kwargs, report_fits_path
from .recommend import recommend
from .report import TILINGS, VISITS, SimReport, simulate

__all__ = ["main"]


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the usage too)
        raise _UsageError(message)


def _sizes(text: str) -> tuple[int, ...] | int:
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 30x48x80 or 16, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _bools(text: str) -> tuple[bool, ...] | bool:
    table = {"1": True, "true": True, "t": True, "yes": True, "y": True,
             "0": False, "false": False, "f": False, "no": False, "n": False}
    parts = text.lower().replace(",", "x").split("x")
    if any(p not in table for p in parts):
        raise argparse.ArgumentTypeError(f"expected per-axis flags like 1x0x0 or true, got {text!r}")
    values = tuple(table[p] for p in parts)
    return values[0] if len(values) == 1 else values


def _build_parser() -> _Parser:
    p = _Parser(
        prog="gna-sim",
        description="NATTENSim for gna_flex: what a tiled GNA kernel visits, its predicted speedup, "
                    "and nearby configs that run faster.",
    )
    p.add_argument("--grid", type=_sizes, required=True, help="token grid, e.g. 30x48x80")
    p.add_argument("--kernel-size", type=_sizes, required=True, help="window size per axis, e.g. 18x24x24")
    p.add_argument("--stride", type=_sizes, default=None, help="stride per axis (default 1; searched by --recommend)")
    p.add_argument("--dilation", type=_sizes, default=1, help="dilation per axis (default 1)")
    p.add_argument("--causal", type=_bools, nargs="?", const=True, default=False,
                   help="causal per axis, e.g. 1x0x0 (flag alone: every axis)")
    p.add_argument("--q-tile", type=_sizes, default=None, help="Q tile shape (multi) or tokens (single)")
    p.add_argument("--kv-tile", type=_sizes, default=None, help="KV tile shape (multi) or tokens (single)")
    p.add_argument("--extra-tokens", type=int, default=0, help="extra keys every query attends to")
    p.add_argument("--tiling", choices=TILINGS, default="multi")
    p.add_argument("--visit", choices=VISITS, default="box")
    p.add_argument("--undilated-tiles", action="store_true",
                   help="with dilation: tiles of the undilated grid (the flex path's order) instead of "
                        "tiles inside one dilation group")
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--device", choices=DEVICES, default="sm90", help="device family of the cost model")
    p.add_argument("--path", choices=PATHS, default=None,
                   help="predict one path only (default: kernel and flex; --recommend ranks by kernel)")
    p.add_argument("--recommend", action="store_true", help="rank nearby configs by predicted speedup")
    p.add_argument("--kernel-size-tolerance", type=_sizes, default=0,
                   help="with --recommend: how far the window may move per axis")
    p.add_argument("--tile-volume", type=int, default=128, help="with --recommend: tokens per searched tile")
    p.add_argument("--top", type=int, default=10, help="with --recommend: how many configs")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="draw the KV tiles one Q tile visits (needs matplotlib)")
    p.add_argument("--plot-q-tile", type=_sizes, default=None, help="with --plot: Q tile index per axis")
    p.add_argument("--plot-slice", type=int, default=None, help="with --plot on 3-D grids: axis-0 coordinate")
    return p


def _x(values) -> str:
    return "x".join(str(int(v)) for v in values)


def _estimates(rep: SimReport, args) -> list:
    """Estimates per path; a path that tiles differently from ``rep`` (dilation) gets its own simulation."""
    paths = [args.path] if args.path else list(PATHS)
    out = []
    for path in paths:
        own = rep
        if report_fits_path(rep, path) is not None:
            if rep.tiling == "single":
                continue
            own = simulate(rep.grid, rep.kernel_size, rep.stride, rep.dilation, rep.is_causal, rep.q_tile,
                           rep.kv_tile, rep.extra_tokens, **path_simulate_kwargs(path))
        out.append(estimate(own, args.heads, args.head_dim, args.batch, args.dtype, args.device, path))
    return out


def _table(rep: SimReport, ests) -> str:
    causal = "no" if not any(rep.is_causal) else _x(int(c) for c in rep.is_causal)
    lines = [
        f"grid {_x(rep.grid)}   kernel_size {_x(rep.kernel_size)}   stride {_x(rep.stride)}   "
        f"dilation {_x(rep.dilation)}   causal {causal}   extra tokens {rep.extra_tokens}",
        f"{rep.tiling} tiling, Q tile {_x(rep.q_tile)}, KV tile {_x(rep.kv_tile)}, visit rule {rep.visit}",
        "",
        f"  {'FLOP-wise speedup':<28}{rep.flop_speedup:>12.2f}x   "
        f"({rep.allowed_pairs:,} of {rep.dense_pairs:,} query-key pairs)",
        f"  {'visited tile pairs':<28}{rep.visited:>12,}    (dense: {rep.dense_tile_pairs:,}; "
        f"{rep.num_q_tiles:,} Q tiles x {rep.num_kv_tiles + rep.num_extra_kv_tiles:,} KV tiles)",
        f"  {'  fully unmasked':<28}{rep.visited_full:>12,}",
        f"  {'  partially masked':<28}{rep.visited_partial:>12,}",
        f"  {'tile-wise speedup bound':<28}{rep.tile_speedup:>12.2f}x",
        f"  {'perfectly block-sparse':<28}{'yes' if rep.perfectly_block_sparse else 'no':>12}",
        f"  {'padding waste':<28}{'Q %.1f%%, KV %.1f%%' % (100 * rep.padding_waste['q'], 100 * rep.padding_waste['kv']):>12}",
    ]
    for est in ests:
        label = f"predicted, {est.path} ({est.device})"
        lines.append(
            f"  {label:<28}{est.speedup:>12.2f}x   ({est.gna_ms:.3f} ms vs dense {est.dense_ms:.3f} ms; "
            f"{est.status})"
        )
    if ests:
        e = ests[0]
        lines.append(f"  (cost model: {e.dtype}, constants from {e.card})")
    lines.append("")
    lines += textwrap.wrap(rep.explanation, width=100, initial_indent="  ", subsequent_indent="    ")
    return "\n".join(lines)


def _recommend_table(recs, path: str) -> str:
    head = (f"{'rank':>4}  {'kernel_size':<12}{'stride':<12}{'q_tile':<9}{'kv_tile':<9}"
            f"{'FLOP':>7}{'tile':>7}{'predicted':>11}  perfect")
    lines = [f"configs ranked by predicted speedup over dense attention ({path} path)", head, "-" * len(head)]
    for r in recs:
        rank = "in" if r.rank == 0 else str(r.rank)
        mark = "yes" if r.perfectly_block_sparse else "no"
        if r.is_input:
            mark += "  <- input"
        lines.append(
            f"{rank:>4}  {_x(r.kernel_size):<12}{_x(r.stride):<12}{_x(r.q_tile):<9}{_x(r.kv_tile):<9}"
            f"{r.flop_speedup:>7.2f}{r.tile_speedup:>7.2f}{r.predicted_speedup:>10.2f}x  {mark}"
        )
    return "\n".join(lines)


def _run(args) -> int:
    if args.recommend:
        if args.tiling != "multi":
            raise ValueError("--recommend searches multi tiling only; drop --tiling single")
        path = args.path or "kernel"
        recs = recommend(
            args.grid, args.kernel_size, args.stride, args.dilation, args.causal, args.q_tile, args.kv_tile,
            args.extra_tokens, args.kernel_size_tolerance, args.heads, args.head_dim, args.batch, args.dtype,
            args.device, path, args.tile_volume, args.top,
        )
        if args.json:
            print(json.dumps([r.asdict() for r in recs], indent=2))
        else:
            print(_recommend_table(recs, path))
        return 0
    rep = simulate(args.grid, args.kernel_size, 1 if args.stride is None else args.stride, args.dilation,
                   args.causal, args.q_tile, args.kv_tile, args.extra_tokens, args.tiling, args.visit,
                   not args.undilated_tiles)
    ests = _estimates(rep, args)
    if args.plot:
        from .plot import plot_tile_visits

        q_index = args.plot_q_tile
        if isinstance(q_index, int):
            q_index = (q_index,)
        plot_tile_visits(rep, args.plot, q_index, args.plot_slice)
    if args.json:
        out = rep.asdict()
        out["estimates"] = [e.asdict() for e in ests]
        print(json.dumps(out, indent=2))
    else:
        print(_table(rep, ests))
        if args.plot:
            print(f"\n  plot written to {args.plot}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``gna-sim``; returns the exit status (0, 1 for a missing optional package, 2 for bad arguments)."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        return _run(args)
    except (_UsageError, ValueError, TypeError) as exc:
        print(f"gna-sim: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from .plot import MatplotlibMissing

        if isinstance(exc, MatplotlibMissing):
            print(f"gna-sim: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
