"""Benchmark the "gna" torch.compile backend on a DiT-like block stack against Inductor (dense).

Usage (GPU machine):

    python benchmarks/bench_backend.py              # 30x48x80 grid + 256 text tokens, 2 blocks
    python benchmarks/bench_backend.py --depth 4
    python benchmarks/bench_backend.py --dry-run    # tiny shapes on the CPU: checks the script itself

The model is tests/_dit.py's ``TinyDiT`` at full size: patch embedding of a
``[1, 16, 30, 96, 160]`` video with patch 1x2x2 (a 30x48x80 token grid),
``--depth`` blocks of joint self-attention over the grid plus 256 text
tokens (24 heads, head dim 128, model dim 3072), a cross-attention to 256
context tokens (never rewritten) and an MLP; bf16, batch 1, forward only
(``torch.no_grad``).

Measured in one process, ``triton.testing.do_bench`` medians:

* ``stack_inductor_ms``: ``torch.compile(model, backend="inductor")``: dense attention.
* ``stack_gna_ms``: ``torch.compile(model, backend="gna", options={"rules": [rule]})``
  with ``Rule(grid=(30, 48, 80), kernel_size=(18, 24, 24), stride=(16, 8, 8),
  extra_tokens=256, module=r"blocks\\.\\d+\\.attn")`` (inner compiler Inductor).
* ``stack_speedup`` = inductor / gna.
* ``dense_sdpa_ms``: one dense cuDNN SDPA over the same ``[1, 24, 115456, 128]``
  problem (the reference of every gna_flex speed claim), and
  ``gna_attention_ms``: one rewritten attention call alone (the op the pass
  inserts), with ``attention_speedup`` = dense / gna.

Also recorded: the ``explain`` rows of the gna model (predicted speedups,
what was rewritten) and a spot check of the rewritten attention on random
inputs: 64 grid query rows (and 8 text rows) against dense fp32 attention
under the exact mask. Results go to ``benchmarks/results/backend-<card>.json``
(card, torch version, commit); a short table is printed last.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import common  # noqa: E402
from _dit import TinyDiT, grid_of, make_inputs  # noqa: E402

from gna_flex.backend import gna_backend  # noqa: E402
from gna_flex.passes import Rule, explain  # noqa: E402
from gna_flex.passes.rewrite import gna_attention  # noqa: E402
from gna_flex.spec import count_pairs, neighbors, unravel  # noqa: E402

FULL = dict(video=(30, 96, 160), patch=(1, 2, 2), in_channels=16, text=256, context=256, heads=24, head_dim=128,
            kernel_size=(18, 24, 24), stride=(16, 8, 8), dtype=torch.bfloat16, batch=1)
DRY = dict(video=(3, 12, 16), patch=(1, 2, 2), in_channels=4, text=8, context=5, heads=2, head_dim=16,
           kernel_size=(2, 3, 4), stride=(1, 2, 2), dtype=torch.float32, batch=1)


def spot_check(cfg: dict, rule: Rule, device: torch.device, rows: int = 64, text_rows: int = 8) -> float:
    """Max abs error of the rewritten attention on random inputs, for sampled query rows, vs fp32 dense masked."""
    params = rule.params
    n, e = params.num_tokens, rule.extra_tokens
    h, d = cfg["heads"], cfg["head_dim"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(cfg["batch"], h, n + e, d, generator=gen).to(device, cfg["dtype"]) for _ in range(3))
    out = gna_attention(q, k, v, params.grid, params.kernel_size, params.stride, params.dilation, params.is_causal,
                        e, rule.extra_position == "start", None, False, rule.backend)
    grid_rows = torch.randperm(n, generator=gen)[:rows].to(device)
    picked = torch.cat([grid_rows, torch.arange(n, n + min(e, text_rows), device=device)])
    keys = torch.arange(n, device=device)
    mask = neighbors(params, [c[:, None] for c in unravel(grid_rows, params.grid)],
                     [c[None, :] for c in unravel(keys, params.grid)])
    full = torch.ones(len(picked), n + e, dtype=torch.bool, device=device)
    full[: len(grid_rows), :n] = mask
    ref = F.scaled_dot_product_attention(q[:, :, picked].float(), k.float(), v.float(), attn_mask=full)
    return float((out[:, :, picked].float() - ref).abs().max())


def _log(message: str) -> None:
    print(f"bench_backend: {message}", flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = DRY if args.dry_run else FULL
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on the CPU")
    grid = grid_of(cfg["video"], cfg["patch"])
    dim = cfg["heads"] * cfg["head_dim"]
    rule = Rule(grid=grid, kernel_size=cfg["kernel_size"], stride=cfg["stride"], extra_tokens=cfg["text"],
                module=r"blocks\.\d+\.attn", min_speedup=0.0 if args.dry_run else 1.1)
    # The dry run uses AOT eager on both sides (fast to compile on 2 CPU cores); the real run Inductor.
    dense_backend = "aot_eager" if args.dry_run else "inductor"
    options = {"rules": [rule], "inner": dense_backend}

    torch.manual_seed(0)
    model = TinyDiT(in_channels=cfg["in_channels"], dim=dim, heads=cfg["heads"], depth=args.depth,
                    patch=cfg["patch"], text_dim=dim).to(device=device, dtype=cfg["dtype"]).eval()
    inputs = make_inputs(cfg["batch"], cfg["in_channels"], cfg["video"], cfg["text"], cfg["context"], dim,
                         dtype=cfg["dtype"], device=device)
    result: dict[str, Any] = {
        **common.environment(),
        "benchmark": "bench_backend",
        "dry_run": args.dry_run,
        "config": {
            "grid": list(grid), "text_tokens": cfg["text"], "context_tokens": cfg["context"], "heads": cfg["heads"],
            "head_dim": cfg["head_dim"], "dim": dim, "depth": args.depth, "batch": cfg["batch"],
            "dtype": str(cfg["dtype"]).removeprefix("torch."), "kernel_size": list(cfg["kernel_size"]),
            "stride": list(cfg["stride"]), "rule": repr(rule), "dense_backend": dense_backend,
            "gna_options": {"inner": dense_backend},
        },
        "dense_baseline": common.dense_baseline_name(device),
    }
    params = rule.params
    n, e = params.num_tokens, cfg["text"]
    dense_pairs = n * (n + e)
    allowed = count_pairs(params) + n * e
    result["flop_bound"] = dense_pairs / allowed

    with torch.no_grad():
        _log(f"compiling the dense stack ({dense_backend})")
        dense = torch.compile(model, backend=dense_backend)
        ms, _ = common.wall_ms(lambda: dense(*inputs), device)
        result["compile_dense_s"] = ms / 1e3
        _log(f"compiling the gna stack ({result['compile_dense_s']:.1f} s for the dense one)")
        gna = torch.compile(model, backend=gna_backend, options=options)
        ms, _ = common.wall_ms(lambda: gna(*inputs), device)
        result["compile_gna_s"] = ms / 1e3
        _log(f"timing ({result['compile_gna_s']:.1f} s to compile the gna stack)")
        rows = explain(gna)
        result["explain"] = [r.asdict() for r in rows]
        result["explain_table"] = str(rows)
        result["rewritten"] = rows.num_rewritten
        if rows.num_rewritten != args.depth:
            result["error"] = f"expected {args.depth} rewritten self-attentions, got {rows.num_rewritten}"
        predicted = [r.predicted_speedup for r in rows if r.rewritten and r.predicted_speedup]
        result["predicted_attention_speedup"] = predicted[0] if predicted else None

        rep = args.rep_ms
        result["stack_inductor_ms"] = common.bench_ms(lambda: dense(*inputs), device=device, warmup=rep // 4, rep=rep)
        result["stack_gna_ms"] = common.bench_ms(lambda: gna(*inputs), device=device, warmup=rep // 4, rep=rep)
        result["stack_speedup"] = result["stack_inductor_ms"] / result["stack_gna_ms"]

        q, k, v = (torch.randn(cfg["batch"], cfg["heads"], n + e, cfg["head_dim"], device=device,
                               dtype=cfg["dtype"]) for _ in range(3))
        result["dense_sdpa_ms"] = common.bench_ms(lambda: common.dense_sdpa(q, k, v), device=device,
                                                  warmup=rep // 4, rep=rep)
        p = rule.params
        result["gna_attention_ms"] = common.bench_ms(
            lambda: gna_attention(q, k, v, p.grid, p.kernel_size, p.stride, p.dilation, p.is_causal, e, False, None,
                                  False, None),
            device=device, warmup=rep // 4, rep=rep,
        )
        result["attention_speedup"] = result["dense_sdpa_ms"] / result["gna_attention_ms"]
        result["dense_sdpa_tflops"] = common.attention_tflops((n + e) ** 2, cfg["heads"], cfg["head_dim"],
                                                              cfg["batch"], result["dense_sdpa_ms"])
        result["gna_attention_useful_tflops"] = common.attention_tflops(
            allowed + e * (n + e), cfg["heads"], cfg["head_dim"], cfg["batch"], result["gna_attention_ms"])
        _log("spot check")
        result["spot_check_max_abs_err"] = spot_check(cfg, rule, device)
        tol = 1e-4 if cfg["dtype"] == torch.float32 else 5e-2
        result["spot_check_tolerance"] = tol
        if not result["spot_check_max_abs_err"] <= tol:
            result["error"] = (result.get("error", "") + f" spot check error {result['spot_check_max_abs_err']:.3g} "
                               f"> {tol}").strip()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (checks the script)")
    parser.add_argument("--depth", type=int, default=2, help="number of DiT blocks (default 2)")
    parser.add_argument("--rep-ms", type=int, default=5000,
                        help="do_bench repetition budget for the whole stack, in ms (default 5000)")
    parser.add_argument("--out", type=Path, default=None,
                        help="result file (default benchmarks/results/backend-<card>.json)")
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except Exception as error:  # record the failure with the environment, then fail
        traceback.print_exc()
        result = {**common.environment(), "benchmark": "bench_backend", "dry_run": args.dry_run,
                  "error": f"{type(error).__name__}: {error}"}
    suffix = "-dry" if args.dry_run else ""
    out = args.out or common.RESULTS / f"backend-{common.card_slug(result.get('card'))}{suffix}.json"
    common.write_json(out, result)
    if "explain_table" in result:
        print(result["explain_table"])
    if "stack_gna_ms" in result:
        row = {k: result.get(k) for k in ("stack_inductor_ms", "stack_gna_ms", "stack_speedup", "dense_sdpa_ms",
                                          "gna_attention_ms", "attention_speedup", "flop_bound",
                                          "predicted_attention_speedup", "spot_check_max_abs_err")}
        cols = [(k, k, "{:.4g}") for k in row]
        print(f"card: {result['card']}, torch {result['torch']}, commit {result['commit']}")
        print(common.format_table([row], cols))
    print(f"wrote {out}")
    if "error" in result:
        print(f"ERROR: {result['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

