"""Benchmark the gna_flex FlexAttention path against dense cuDNN SDPA (same process, same card).

Usage (GPU machine, one process for all configs):

    python benchmarks/bench_flex.py            # all configs, the default kernel-option set
    python benchmarks/bench_flex.py --quick    # smoke run: first layout and option set per config
    python benchmarks/bench_flex.py --options all --configs 3d-s1
    python benchmarks/bench_flex.py --dry-run  # tiny shapes, CPU eager: checks the script itself
    python benchmarks/bench_flex.py --configs 3d-s1 --mask-impl tables,arith   # A/B the mask_mods
    python benchmarks/bench_flex.py --wide-q --configs 2d-s16 --options default,m256n128w16s2tma

bf16, batch 1, 24 heads, head dim 128. For each config and each (tile, block
size, kernel options) variant it reports: the median time (``triton.testing.do_bench``)
of the flex kernel alone on tile-major inputs and of the whole op
(``flex_na``: permute, kernel, unpermute), the speedup over cuDNN SDPA for
the same token count, the FLOP-wise bound (dense pairs / allowed pairs), the
block-level bound (dense blocks / visited blocks), useful TFLOP/s
(``4 * D * heads * batch * pairs / time``), the mask build time (cold: first
build in the process; warm: rebuilt with the cache cleared; cached: a
lookup), and a spot check of 64 query rows against a dense fp32 computation.
The best variant per config is reported with all the others. Results go to
``benchmarks/results/flex-<card>.json``; a short table is printed last.

Each (shape, block size, kernel options) variant is one Triton compile
(tens of seconds): the default run compiles about 25, ``--quick`` 6. Where
a command's time is limited, run groups of configs with ``--configs`` and
``--out`` and merge, or use ``--quick`` first.
"""

from __future__ import annotations

import argparse
import gc
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from gna_flex import flex  # noqa: E402
from gna_flex.flex import attention as flex_attention_mod, block_masks, masks  # noqa: E402
from gna_flex.spec import count_pairs, make_params  # noqa: E402


@dataclass
class Config:
    name: str
    grid: tuple
    kernel_size: Any
    stride: Any
    layouts: list  # (tile, (Q block, KV block)); the first is the recommended one
    target: Optional[float] = None  # required speedup over cuDNN (issue 2), if any
    extra: dict = field(default_factory=dict)


# Tiles are chosen so one tile is one Q block. With stride a multiple of the
# tile on every axis (and window starts that land on tile boundaries, which
# the border shift does for these grids) the config is perfectly
# block-sparse: every visited block is full and the mask_mod never runs.
CONFIGS = [
    Config("3d-s16x8x8", (30, 48, 80), (18, 24, 24), (16, 8, 8), [((2, 8, 8), (128, 128))], target=9.0),
    # Stride 1: most visited blocks are partial, so the mask_mod's cost and the
    # visited volume decide; these tiles visit the fewest blocks (see the
    # block_bound column).
    Config("3d-s1", (30, 48, 80), (18, 24, 24), 1,
           [((2, 8, 8), (128, 128)), ((4, 8, 4), (128, 128)), ((4, 4, 8), (128, 64))], target=2.0),
    Config("2d-s16", (256, 256), (80, 80), (16, 16), [((16, 8), (128, 128))], target=8.0),
    Config("2d-s1", (256, 256), (80, 80), 1, [((16, 8), (128, 128)), ((16, 8), (128, 64))]),
    Config("1d-s256", (32768,), 2048, 256, [((128,), (128, 128))], target=12.0),
    Config("1d-s1", (32768,), 2048, 1, [((128,), (128, 128))]),
]

DRY_CONFIGS = [
    Config("dry-3d", (4, 8, 8), (2, 4, 4), (2, 4, 4), [((1, 4, 4), (16, 16)), ((1, 4, 4), (16, 8))]),
    Config("dry-2d", (8, 12), (4, 6), 1, [((4, 4), (16, 16))]),
    Config("dry-1d", (64,), 16, 8, [((16,), (16, 16))]),
]

# Kernel options tried per variant (CUDA only; the CPU dry run uses eager flex).
# "default" is what flex_na uses when given none (flex.default_kernel_options
# for the card, dtype, head dim and blocks); "m128n64w8s3" is torch's own sm90
# choice for 16-bit, head dim 128. 128-wide KV steps halve the loop trips per
# block; TMA loads free registers and issue slots on Hopper.
KERNEL_OPTIONS = {
    "default": None,
    # flex_na's choice with the FLASH backend ruled out (its Triton options)
    "triton": "triton",
    "m128n64w8s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    "m128n128w8s2": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    "m128n64w8s3tma": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, USE_TMA=True),
    "m128n128w8s2tma": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, USE_TMA=True),
    "m128n64w4s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    "m128n128w8s3": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    "m128n128w8s2pre": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, PRESCALE_QK=True),
    "m128n128w8s3tma": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, USE_TMA=True),
    "m128n64w8s2": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    "m128n64w8s4": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4),
    # 256-row programs (4 warpgroups) for 256-token Q blocks (--wide-q): each K/V block loaded once for twice
    # the queries. Not measured yet.
    "m256n128w16s2tma": dict(BLOCK_M=256, BLOCK_N=128, num_warps=16, num_stages=2, USE_TMA=True),
    "m256n64w16s3tma": dict(BLOCK_M=256, BLOCK_N=64, num_warps=16, num_stages=3, USE_TMA=True),
    # The default 1-D choice plus BLOCKS_ARE_CONTIGUOUS: the kernel steps through a row's KV blocks without
    # reading their indices. Only valid where every Q block's KV blocks are consecutive (1-D windows; the
    # spot check catches misuse).
    "m128n128w8s3tmacontig": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, USE_TMA=True,
                                  BLOCKS_ARE_CONTIGUOUS=True),
    "torch": {},
    # torch's FLASH backend (FlashAttention-4 CuTe-DSL kernels, package flash-attn-4).
    "flash": dict(BACKEND="FLASH"),
}
# --wide-q: a second layout per strided config whose 256-token tile is a whole stride group (2-D, 1-D) or
# half of one (3-D), with 128-token KV blocks.
WIDE_Q_LAYOUTS = {"3d-s16x8x8": ((4, 8, 8), (256, 128)), "2d-s16": ((16, 16), (256, 128)),
                  "1d-s256": ((256,), (256, 128))}
DEFAULT_OPTION_SET = ["default", "triton", "m128n64w8s3"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="first layout and first option set per config, short timing")
    ap.add_argument("--wide-q", action="store_true",
                    help="add 256-token Q-block layouts to the strided configs (use with m256* option sets)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU with eager flex")
    ap.add_argument("--configs", default="all", help="comma-separated config names, or 'all'")
    ap.add_argument("--options", default="default",
                    help=f"comma-separated kernel-option names ({', '.join(KERNEL_OPTIONS)}), 'default' or 'all'")
    ap.add_argument("--out", default=None, help="result file (default benchmarks/results/flex-<card>.json)")
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms of GPU time per measurement)")
    ap.add_argument("--mask-impl", default=None,
                    help=f"comma-separated mask_mod implementations ({', '.join(flex.MASK_IMPLS)}); each config "
                         f"runs once per implementation (default: masks.DEFAULT_MASK_IMPL)")
    return ap.parse_args(argv)


def select(args) -> tuple[list[Config], list[str]]:
    pool = DRY_CONFIGS if args.dry_run else CONFIGS
    if args.configs != "all":
        wanted = args.configs.split(",")
        unknown = [w for w in wanted if w not in {c.name for c in pool}]
        if unknown:
            raise SystemExit(f"unknown config(s) {unknown}; choose from {[c.name for c in pool]}")
        pool = [c for c in pool if c.name in wanted]
    if args.options == "all":
        opts = list(KERNEL_OPTIONS)
    elif args.options == "default":
        opts = list(DEFAULT_OPTION_SET)
    else:
        opts = args.options.split(",")
        unknown = [o for o in opts if o not in KERNEL_OPTIONS]
        if unknown:
            raise SystemExit(f"unknown kernel option set(s) {unknown}; choose from {list(KERNEL_OPTIONS)}")
    if args.wide_q:
        pool = [Config(c.name, c.grid, c.kernel_size, c.stride, c.layouts + [WIDE_Q_LAYOUTS[c.name]], c.target)
                if c.name in WIDE_Q_LAYOUTS else c for c in pool]
    if args.quick:
        pool = [Config(c.name, c.grid, c.kernel_size, c.stride, c.layouts[:1], c.target) for c in pool]
        opts = opts[:1]
    if args.dry_run:
        opts = opts[:1]
    return pool, opts


def options_fit(opts: dict, block: tuple[int, int]) -> bool:
    """flex needs the sparse block sizes to be multiples of the kernel's BLOCK_M / BLOCK_N."""
    return block[0] % opts.get("BLOCK_M", 1) == 0 and block[1] % opts.get("BLOCK_N", 1) == 0


def mask_build_times(params, tile, block, device, q_len, kv_len) -> dict:
    """Cold (first build in the process for this layout), warm (cache cleared) and cached build times in ms."""
    def build():
        return flex.block_mask(params, None, tile=tile, block_size=block, device=device, q_len=q_len, kv_len=kv_len)

    # The garbage collector stays off while timing (as timeit does): a full collection of the object graphs
    # that compiles leave behind can land inside one build and cost tens of milliseconds.
    gc.collect()
    gc.disable()
    try:
        block_masks._cached_block_mask.cache_clear()
        cold, bm = common.wall_ms(build, device)
        warm = []
        for _ in range(3):
            block_masks._cached_block_mask.cache_clear()
            warm.append(common.wall_ms(build, device)[0])
        cached = common.wall_ms(build, device)[0]
    finally:
        gc.enable()
    return {"cold_ms": cold, "warm_ms": sorted(warm)[1], "cached_ms": cached,
            "partial_blocks": int(bm.kv_num_blocks.sum()), "full_blocks": int(bm.full_kv_num_blocks.sum()),
            "q_blocks": int(bm.kv_num_blocks.shape[-1]), "kv_blocks": int(bm.kv_indices.shape[-1])}


def spot_check(qt, kt, vt, out_t, spec, kv_len, rows: int = 64) -> float:
    """Max abs error of ``rows`` random valid query rows against dense fp32 attention under the exact mask."""
    gen = torch.Generator().manual_seed(0)
    mm = flex.mask_mod(spec.params, None, tile=spec.tile, device=qt.device)
    cand = torch.randint(0, spec.grid_tokens, (rows * 4,), generator=gen).to(qt.device)
    z = torch.zeros((), dtype=torch.long, device=qt.device)
    keys = torch.arange(kv_len, device=qt.device)
    self_ok = mm(z, z, cand[:, None], keys[None, :]).any(-1)
    idx = cand[self_ok][:rows]
    mask = mm(z, z, idx[:, None], keys[None, :])
    heads_kv = kt.shape[1]
    group = qt.shape[1] // heads_kv
    q = qt[:, :, idx].float()
    k = kt.float().repeat_interleave(group, 1)
    v = vt.float().repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    ref = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v
    return float((out_t[:, :, idx].float() - ref).abs().max())


def run_config(cfg: Config, opt_names: list[str], args, device, dtype, baselines: dict) -> dict:
    params = make_params(cfg.grid, cfg.kernel_size, cfg.stride)
    s = params.num_tokens
    pairs = count_pairs(params)
    heads, d, b = args.heads, args.head_dim, args.batch
    on_cuda = device.type == "cuda"
    rep = max(10, args.rep // (4 if args.quick else 1))

    if s not in baselines:
        qd, kd, vd = (torch.randn(b, heads, s, d, device=device, dtype=dtype) for _ in range(3))
        ms = common.bench_ms(lambda: common.dense_sdpa(qd, kd, vd), device=device, rep=rep, cpu_repeats=1 if args.dry_run else 3)
        baselines[s] = {"name": common.dense_baseline_name(device), "ms": ms,
                        "tflops": common.attention_tflops(s * s, heads, d, b, ms)}
        del qd, kd, vd
    base = baselines[s]

    q, k, v = (torch.randn(b, *cfg.grid, heads, d, device=device, dtype=dtype) for _ in range(3))
    entry: dict[str, Any] = {
        "name": cfg.name, "grid": list(cfg.grid), "kernel_size": list(params.kernel_size),
        "stride": list(params.stride), "tokens": s, "pairs": pairs, "flop_bound": s * s / pairs,
        "target": cfg.target, "dense": base, "variants": [],
    }
    ref_out = None
    for tile, block in cfg.layouts:
        spec = flex.mask_spec(params, None, tile=tile)
        sg = spec.grid_tokens
        kv_len = -(-sg // block[1]) * block[1]
        try:
            build = mask_build_times(params, tile, block, device, sg, kv_len)
        except Exception as e:  # keep going: one broken layout must not lose the run
            entry["variants"].append({"tile": list(tile), "block": list(block), "error": repr(e)})
            traceback.print_exc()
            continue
        bm = flex.block_mask(params, None, tile=tile, block_size=block, device=device, q_len=sg, kv_len=kv_len)
        # The layout flex_na gives the kernel (tile-major [B, S, heads, D] in memory, read as
        # [B, heads, S, D] views); qt may be a view of q itself (1-D, no padding).
        qt, kt, vt, lay = flex.tile_major_inputs(q, k, v, cfg.grid, tile, kv_len)
        visited = build["partial_blocks"] + build["full_blocks"]
        block_bound = build["q_blocks"] * build["kv_blocks"] / max(1, visited)
        for name in opt_names:
            if not on_cuda:
                opts = None
            elif KERNEL_OPTIONS[name] in (None, "triton"):
                opts = flex.default_kernel_options(dtype, d, lay.is_padded, block,
                                                   has_partial=block_masks.has_partial_blocks(bm), ndim=len(cfg.grid),
                                                   flash=False if KERNEL_OPTIONS[name] == "triton" else None)
            else:
                opts = dict(KERNEL_OPTIONS[name])
            row = {"tile": list(tile), "block": list(block), "options": name, "mask": build,
                   "block_bound": block_bound}
            if opts is not None:
                if not options_fit(opts, block):
                    row["skipped"] = "kernel block does not divide the sparse block"
                    entry["variants"].append(row)
                    continue
                if "BACKEND" not in opts and flex_attention_mod.rows_guaranteed_safe(
                        lay.is_padded, block_masks.has_partial_blocks(bm)):
                    opts["ROWS_GUARANTEED_SAFE"] = True
            try:
                fn = flex_attention_mod._compiled_flex() if on_cuda else flex_attention_mod.flex_attention

                def kernel(fn=fn, qt=qt, kt=kt, vt=vt, bm=block_masks.kernel_block_mask(bm, opts) if on_cuda else bm,
                           opts=opts):
                    return fn(qt, kt, vt, block_mask=bm, kernel_options=opts)

                def whole(tile=tile, block=block, opts=opts):
                    return flex.flex_na(q, k, v, params, tile=tile, block_size=block, kernel_options=opts)

                out_t = kernel()
                common.sync(device)
                row["spot_check_max_abs_err"] = spot_check(qt, kt, vt, out_t, spec, kv_len)
                out = whole()
                if ref_out is None:
                    ref_out = out
                row["max_abs_diff_vs_first_variant"] = float((out.float() - ref_out.float()).abs().max())
                del out, out_t
                row["kernel_ms"] = common.bench_ms(kernel, device=device, rep=rep, cpu_repeats=1 if args.dry_run else 3)
                row["whole_ms"] = common.bench_ms(whole, device=device, rep=rep, cpu_repeats=1 if args.dry_run else 3)
                for kind in ("kernel", "whole"):
                    row[f"{kind}_speedup"] = base["ms"] / row[f"{kind}_ms"]
                    row[f"{kind}_tflops"] = common.attention_tflops(pairs, heads, d, b, row[f"{kind}_ms"])
            except Exception as e:
                row["error"] = repr(e)
                traceback.print_exc()
            entry["variants"].append(row)
            print(f"  {cfg.name} tile={tile} block={block} {name}: "
                  + ", ".join(f"{k}={row[k]:.3f}" for k in ("kernel_ms", "whole_ms", "kernel_speedup", "whole_speedup")
                              if k in row), flush=True)
        del qt, kt, vt
    ok = [r for r in entry["variants"] if "kernel_ms" in r]
    if ok:
        entry["best_kernel"] = min(ok, key=lambda r: r["kernel_ms"])
        entry["best_whole"] = min(ok, key=lambda r: r["whole_ms"])
        entry["meets_target"] = None if cfg.target is None else entry["best_whole"]["whole_speedup"] >= cfg.target
    return entry


def summary_rows(entries: list[dict]) -> list[dict]:
    rows = []
    for e in entries:
        bk, bw = e.get("best_kernel"), e.get("best_whole")
        rows.append({
            "config": e["name"], "bound": e["flop_bound"], "dense_ms": e["dense"]["ms"],
            "kernel_ms": bk and bk["kernel_ms"], "kx": bk and bk["kernel_speedup"],
            "whole_ms": bw and bw["whole_ms"], "wx": bw and bw["whole_speedup"],
            "tflops": bk and bk["kernel_tflops"], "target": e["target"],
            "variant": bw and f"{'x'.join(map(str, bw['tile']))}/{bw['block'][0]}x{bw['block'][1]}/{bw['options']}",
            "mask_ms": bw and bw["mask"]["warm_ms"],
        })
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    configs, opt_names = select(args)
    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        args.heads, args.head_dim = min(args.heads, 2), min(args.head_dim, 16)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_flex.py needs a CUDA GPU (use --dry-run to check the script on the CPU)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        # One compiled flex_attention serves all variants; kernel options and
        # shapes are guarded, so allow one cache entry per variant.
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, 1024)
    torch.manual_seed(0)
    env = common.environment()
    print(f"card: {env['card']}  torch {env['torch']}  commit {env['commit']}", flush=True)
    baselines: dict = {}
    entries = []
    impls = args.mask_impl.split(",") if args.mask_impl else [masks.DEFAULT_MASK_IMPL]
    if any(i not in flex.MASK_IMPLS for i in impls):
        raise SystemExit(f"unknown --mask-impl {impls}; choose from {list(flex.MASK_IMPLS)}")
    default_impl = masks.DEFAULT_MASK_IMPL
    try:
        for cfg in configs:
            for impl in impls:
                # The module default reaches every block_mask / mask_mod / flex_na call of run_config.
                masks.DEFAULT_MASK_IMPL = impl
                print(f"{cfg.name} [{impl} mask]: grid {cfg.grid} kernel {cfg.kernel_size} stride {cfg.stride}",
                      flush=True)
                entry = run_config(cfg, opt_names, args, device, dtype, baselines)
                entry["mask_impl"] = impl
                if len(impls) > 1:
                    entry["name"] = f"{cfg.name}[{impl}]"
                entries.append(entry)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        masks.DEFAULT_MASK_IMPL = default_impl
    payload = {
        "benchmark": "bench_flex", "env": env,
        "setup": {"dtype": str(dtype), "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim,
                  "quick": args.quick, "dry_run": args.dry_run, "options": {n: KERNEL_OPTIONS[n] for n in opt_names},
                  "timing": "triton.testing.do_bench median" if device.type == "cuda" else "wall-clock median"},
        "configs": entries,
    }
    if args.out:
        out = Path(args.out)
    elif args.dry_run:
        out = Path("/tmp/gna_flex-bench_flex-dry-run.json")
    else:
        out = common.RESULTS / f"flex-{common.card_slug(env['card'])}.json"
    common.write_json(out, payload)
    print(f"\nwrote {out}\n")
    print(common.format_table(summary_rows(entries), [
        ("config", "config", "{}"), ("bound", "FLOP bound", "{:.1f}x"), ("dense_ms", "dense ms", "{:.2f}"),
        ("kernel_ms", "kernel ms", "{:.3f}"), ("kx", "kernel x", "{:.2f}"), ("whole_ms", "whole ms", "{:.3f}"),
        ("wx", "whole x", "{:.2f}"), ("target", "target", "{:.0f}x"), ("tflops", "TFLOP/s", "{:.0f}"),
        ("mask_ms", "mask ms", "{:.1f}"), ("variant", "best (tile/block/options)", "{}"),
    ]))
    return payload


if __name__ == "__main__":
    main()
