"""Tile-major permutation cost: gna_flex's Triton copy against torch's strided copies.

The flex path moves q, k, v into tile-major order and the output back
(:func:`gna_flex.layout.permute` / :func:`~gna_flex.layout.unpermute`,
heads-last ``[B, *grid, heads, D]``). This times each direction on the
benchmark grids (bf16, batch 1, 24 heads, head dim 128) with the Triton
kernel (:mod:`gna_flex._permute_triton`) and with the torch fallback, next
to a plain ``clone`` of the same tensor (the copy-bandwidth ceiling), as
``triton.testing.do_bench`` medians. ``GB/s`` counts bytes read + written.

    python benchmarks/bench_layout.py                  # GPU; results/layout-<card>.json
    python benchmarks/bench_layout.py --dry-run        # tiny shapes on the CPU (torch path only)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from gna_flex import _permute_triton, layout  # noqa: E402

CONFIGS = [
    # name, grid, tile, extra key tokens (KV side)
    ("3d-30x48x80", (30, 48, 80), (2, 8, 8), 0),
    ("2d-256x256", (256, 256), (16, 8), 0),
    ("3d-padded-30x45x80+256", (30, 45, 80), (2, 8, 8), 256),
]
DRY_CONFIGS = [("dry-3d", (4, 8, 8), (2, 4, 4), 3)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    paths = ["triton", "torch"] if _permute_triton.available(torch.empty(0, device=device)) else ["torch"]
    rows = []
    for name, grid, tile, extra in DRY_CONFIGS if args.dry_run else CONFIGS:
        x = torch.randn(1, *grid, args.heads, args.head_dim, device=device, dtype=dtype)
        nbytes = 2 * x.numel() * x.element_size()
        row = {"config": name, "grid": list(grid), "tile": list(tile), "extra": extra, "bytes_moved": nbytes,
               "clone_ms": common.bench_ms(x.clone, device=device)}
        for path in paths:
            _permute_triton.ENABLED = path == "triton"
            try:
                y, lay = layout.permute(x, grid, tile, extra=extra)
                y = y[:, : lay.num_tokens]
                assert torch.equal(layout.unpermute(y, lay), x)
                row[f"permute_{path}_ms"] = common.bench_ms(lambda: layout.permute(x, grid, tile, extra=extra),
                                                            device=device)
                row[f"unpermute_{path}_ms"] = common.bench_ms(lambda: layout.unpermute(y, lay), device=device)
            finally:
                _permute_triton.ENABLED = True
            for kind in ("permute", "unpermute"):
                row[f"{kind}_{path}_gbps"] = nbytes / row[f"{kind}_{path}_ms"] / 1e6
        row["clone_gbps"] = nbytes / row["clone_ms"] / 1e6
        rows.append(row)
        print(row, flush=True)
    payload = {"benchmark": "bench_layout", "env": common.environment(),
               "setup": {"heads": args.heads, "head_dim": args.head_dim, "dtype": str(dtype)}, "configs": rows}
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"layout-{common.card_slug()}.json"
    if not args.dry_run or args.out:
        common.write_json(out, payload)
        print(f"wrote {out}")
    cols = [("config", "config", "{}"), ("clone_gbps", "clone GB/s", "{:.0f}")]
    for path in paths:
        cols += [(f"permute_{path}_ms", f"perm {path} ms", "{:.3f}"), (f"permute_{path}_gbps", "GB/s", "{:.0f}"),
                 (f"unpermute_{path}_ms", f"unperm {path} ms", "{:.3f}"), (f"unpermute_{path}_gbps", "GB/s", "{:.0f}")]
    print(common.format_table(rows, cols))


if __name__ == "__main__":
    main()
