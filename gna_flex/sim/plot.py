"""Draw which KV tiles one Q tile visits, on a 2-D slice of the grid (needs matplotlib).

Colours: full (visited, no masking), partial (visited, masked), skipped. The
Q tile is hatched; the union of its queries' windows is outlined solid, their
common part dashed, and the windows of its first and last query dotted.
Coordinates are inside the Q tile's dilation group (for dilation 1 these are
the grid coordinates). A 1-D grid is drawn as one row; a 3-D grid as the slice
of axes 1 and 2 at one coordinate of axis 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .axes import axis_groups, axis_tiles
from .report import SimReport

__all__ = ["plot_tile_visits", "MatplotlibMissing"]

_COLOURS = {"full": "#4caf50", "partial": "#ff9800", "skipped": "#eeeeee"}


class MatplotlibMissing(RuntimeError):
    """Raised when plotting is asked for without matplotlib installed."""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MatplotlibMissing(
            "plotting needs matplotlib: pip install 'gna_flex[plot]' (or pip install matplotlib)"
        ) from exc
    return plt


def plot_tile_visits(
    report: SimReport,
    path: Union[str, Path],
    q_tile_index: Optional[Sequence[int]] = None,
    slice_index: Optional[int] = None,
) -> Path:
    """Write a PNG of the KV tiles visited by one Q tile of a multi-tiled report.

    Args:
        report: from :func:`simulate` with ``tiling="multi"``.
        path: output file (PNG).
        q_tile_index: the Q tile, one index per axis inside dilation group 0
            (default: the middle tile).
        slice_index: for 3-D grids, the axis-0 coordinate (group-local) of the
            slice (default: the Q tile's first query).

    Returns:
        The path written.
    """
    if report.tiling != "multi":
        raise ValueError("plot_tile_visits draws multi-tiled reports; simulate with tiling='multi'")
    if not report.fold_dilation and any(d > 1 for d in report.dilation):
        raise ValueError("plot_tile_visits draws tiles inside one dilation group; simulate with fold_dilation=True")
    plt = _pyplot()
    params = report.params()
    ndim = params.ndim
    tables = []
    for a in range(ndim):
        group = axis_groups(params, a)[0]
        tables.append((group, axis_tiles(group, report.q_tile[a], report.kv_tile[a])))
    if q_tile_index is None:
        q_tile_index = [t.num_q // 2 for _, t in tables]
    q_tile_index = list(q_tile_index)
    if len(q_tile_index) != ndim:
        raise ValueError(f"q_tile_index needs {ndim} entries, got {len(q_tile_index)}")
    for a, (r, (_, t)) in enumerate(zip(q_tile_index, tables)):
        if not 0 <= r < t.num_q:
            raise ValueError(f"q_tile_index[{a}] (axis {a}) must be in [0, {t.num_q - 1}], got {r}")

    def view(a: int) -> dict:
        group, t = tables[a]
        r = q_tile_index[a]
        c = np.arange(t.num_kv)
        first = r * report.q_tile[a]
        last = min(first + report.q_tile[a], group.length) - 1
        return {
            "length": group.length,
            "tile": report.kv_tile[a],
            "visited": (c >= t.kv_first[r]) & (c <= t.kv_last[r]),
            "full": (c >= t.full_first[r]) & (c < t.full_stop[r]),
            "q": (first, last + 1),
            "union": (int(group.start[first]), int(group.end[last])),
            "common": (int(group.start[last]), int(group.end[first])),
            "first": (int(group.start[first]), int(group.end[first])),
            "last": (int(group.start[last]), int(group.end[last])),
        }

    one = {"length": 1, "tile": 1, "visited": np.ones(1, bool), "full": np.ones(1, bool),
           "q": (0, 1), "union": (0, 1), "common": (0, 1), "first": (0, 1), "last": (0, 1)}
    rows = view(ndim - 2) if ndim >= 2 else one
    cols = view(ndim - 1)
    visited = np.outer(rows["visited"], cols["visited"])
    full = np.outer(rows["full"], cols["full"])
    title_extra = ""
    if any(d > 1 for d in report.dilation):
        title_extra += ", dilation group 0 (coordinates inside the group)"
    if ndim == 3:
        depth = view(0)
        z = depth["q"][0] if slice_index is None else slice_index
        if not 0 <= z < depth["length"]:
            raise ValueError(f"slice_index (axis 0) must be in [0, {depth['length'] - 1}], got {z}")
        c0 = z // depth["tile"]
        visited &= bool(depth["visited"][c0])
        full &= bool(depth["full"][c0])
        title_extra += f", slice axis 0 = {z} (KV tile {c0})"
    status = np.where(full, 2, np.where(visited, 1, 0))

    import matplotlib.patches as patches

    fig, ax = plt.subplots(figsize=(10, 7) if ndim > 1 else (12, 3))
    colours = [_COLOURS["skipped"], _COLOURS["partial"], _COLOURS["full"]]
    for i in range(status.shape[0]):
        for j in range(status.shape[1]):
            y0, x0 = i * rows["tile"], j * cols["tile"]
            h = min(rows["tile"], rows["length"] - y0)
            w = min(cols["tile"], cols["length"] - x0)
            ax.add_patch(patches.Rectangle((x0, y0), w, h, facecolor=colours[status[i, j]],
                                           edgecolor="white", linewidth=0.5))

    handles = [patches.Patch(color=_COLOURS[k], label=f"KV tile {k}") for k in ("full", "partial", "skipped")]

    def outline(key: str, **style) -> None:
        (x0, x1), (y0, y1) = cols[key], rows[key]
        if x1 > x0 and y1 > y0:
            handles.append(ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, **style)))

    outline("q", hatch="///", edgecolor="black", linewidth=1.5, label="Q tile")
    outline("union", edgecolor="navy", linewidth=2.0, label="union of the windows")
    outline("common", edgecolor="navy", linewidth=1.2, linestyle="--", label="window common to all queries")
    outline("first", edgecolor="purple", linewidth=1.0, linestyle=":", label="first query's window")
    outline("last", edgecolor="magenta", linewidth=1.0, linestyle=":", label="last query's window")

    ax.set_xlim(0, cols["length"])
    ax.set_ylim(rows["length"], 0)
    ax.set_aspect("equal" if ndim > 1 else "auto")
    ax.set_xlabel(f"axis {ndim - 1}")
    if ndim > 1:
        ax.set_ylabel(f"axis {ndim - 2}")
    else:
        ax.set_yticks([])
    n_full, n_partial = int((status == 2).sum()), int((status == 1).sum())
    ax.set_title(
        f"grid {'x'.join(map(str, report.grid))}, window {'x'.join(map(str, report.kernel_size))}, "
        f"stride {'x'.join(map(str, report.stride))}\nQ tile {tuple(q_tile_index)} of "
        f"{'x'.join(map(str, report.q_tile))}{title_extra}: {n_full} full, {n_partial} partial KV tiles",
        fontsize=9,
    )
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
