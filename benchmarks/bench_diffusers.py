"""One transformer forward of FLUX and HunyuanVideo, dense vs GNA, at the GNA paper's token layouts.

Full-size architectures from their published configs (FLUX.1-dev,
HunyuanVideo), random weights, bf16, batch 1, on one GPU, all in one process:

* FLUX: 256x256 image tokens (4096x4096 pixels) + 512 text tokens, GNA kernel
  80x80, stride 16x16;
* HunyuanVideo: 30x48x80 video tokens (117 frames of 768x1280) + 256 text
  tokens, GNA kernel 18x24x24, stride 16x8x8.

For each model it measures (medians of ``--reps`` forwards after
``--warmup`` untimed ones, CUDA events):

* ``dense_ms``: the unmodified model. SDPA runs with cuDNN first in priority.
  HunyuanVideo always passes a text padding mask to SDPA, which keeps it off
  the unmasked cuDNN/flash kernels; with an all-valid mask (batch 1 here) the
  same result comes without it, so ``dense_nomask_ms`` times that too, and
  the baseline is the faster of the two;
* ``gna_ms``: GNA processors installed by
  :func:`gna_flex.integrations.diffusers.enable` (visual queries: window +
  all text keys; text queries dense), same SDPA settings for the dense text
  part (mask dropped in the same way when the baseline drops it);
* the share of the forward spent in attention, before and after: one more
  forward per mode with CUDA events around every attention call (the whole
  swapped ``dispatch_attention_fn``: split, GNA, dense text part, concat).

It also records the FLOP-wise bound of the attention (dense pairs / pairs
GNA computes, text included) and which gna_flex backend ran. Results go to
``benchmarks/results/diffusers-<card>.json`` (card, torch and diffusers
versions, git commit, date; entries of models not run this time are kept).

    python benchmarks/bench_diffusers.py                          # both models, all layers
    python benchmarks/bench_diffusers.py --models hunyuan --layer-scale 0.25
    python benchmarks/bench_diffusers.py --dry-run                # tiny models on CPU (tests)

``--layer-scale`` keeps that fraction of the double- and single-stream
blocks (at least one each): per-layer work is identical, so the speedup of a
scaled model is that of the full one up to the embedding/output layers.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script or loaded by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

# Published transformer configs (FLUX.1-dev, hunyuanvideo-community/HunyuanVideo).
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
HUNYUAN_VIDEO = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
    rope_axes_dim=(16, 56, 56),
)
FLUX_TINY = dict(
    patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
)
HUNYUAN_TINY = dict(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
    num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
    rope_axes_dim=(4, 6, 6),
)


@dataclass(frozen=True)
class Case:
    """One model at one token layout."""

    name: str
    cls_name: str
    config: dict
    grid: tuple[int, ...]
    text_tokens: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    layer_keys: tuple[str, ...]


CASES = {
    "flux": Case("flux", "FluxTransformer2DModel", FLUX_DEV, (256, 256), 512, (80, 80), (16, 16),
                 ("num_layers", "num_single_layers")),
    "hunyuan": Case("hunyuan", "HunyuanVideoTransformer3DModel", HUNYUAN_VIDEO, (30, 48, 80), 256, (18, 24, 24),
                    (16, 8, 8), ("num_layers", "num_single_layers")),
}
DRY_CASES = {
    "flux": Case("flux", "FluxTransformer2DModel", FLUX_TINY, (8, 8), 5, (4, 4), (2, 2),
                 ("num_layers", "num_single_layers")),
    "hunyuan": Case("hunyuan", "HunyuanVideoTransformer3DModel", HUNYUAN_TINY, (3, 4, 6), 5, (2, 2, 3),
                    (1, 2, 3), ("num_layers", "num_single_layers")),
}


# --------------------------------------------------------------------------- timing


class Clock:
    """Wall time of GPU work with CUDA events (CPU: perf_counter)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        common.sync(self.device)

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


def time_forward(fn: Callable[[], Any], clock: Clock, warmup: int, reps: int) -> list[float]:
    """Times of ``reps`` calls of ``fn`` in ms, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    clock.sync()
    times = []
    for _ in range(reps):
        start = clock.mark()
        fn()
        end = clock.mark()
        clock.sync()
        times.append(clock.elapsed_ms(start, end))
    return times


@contextmanager
def attention_timers(processors: list, clock: Clock) -> Iterator[list]:
    """Record (start, end) marks around every attention call of the GNA processors."""
    marks: list = []

    def timed(inner: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = clock.mark()
            out = inner(*args, **kwargs)
            marks.append((start, clock.mark()))
            return out
        return call

    for p in processors:
        p.attend = timed(type(p).attend.__get__(p))  # the processor looks attend up per call
    try:
        yield marks
    finally:
        for p in processors:
            del p.attend


def share_of_attention(forward: Callable[[], Any], processors: list, clock: Clock) -> tuple[float, float]:
    """(attention ms, forward ms) of one forward with timers around every attention call."""
    with attention_timers(processors, clock) as marks:
        start = clock.mark()
        forward()
        end = clock.mark()
        clock.sync()
    return sum(clock.elapsed_ms(a, b) for a, b in marks), clock.elapsed_ms(start, end)


# --------------------------------------------------------------------------- models and inputs


def build(case: Case, layer_scale: float, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    import diffusers

    config = dict(case.config)
    for key in case.layer_keys:
        config[key] = max(1, math.ceil(config[key] * layer_scale))
    cls = getattr(diffusers, case.cls_name)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in bf16 directly: a 13B model fits once
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def inputs_for(case: Case, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> dict:
    c = model.config
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    e = case.text_tokens
    if case.name == "flux":
        h, w = case.grid
        ids = torch.zeros(h, w, 3)
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None, :]
        return dict(hidden_states=randn(1, h * w, c.in_channels),
                    encoder_hidden_states=randn(1, e, c.joint_attention_dim),
                    pooled_projections=randn(1, c.pooled_projection_dim),
                    timestep=torch.tensor([0.5], device=device, dtype=dtype),
                    img_ids=ids.reshape(-1, 3).to(device),  # fp32: exact row/column ids
                    txt_ids=torch.zeros(e, 3, device=device),
                    guidance=torch.tensor([3.5], device=device, dtype=dtype), return_dict=False)
    t, h, w = case.grid
    p, pt = c.patch_size, c.patch_size_t
    return dict(hidden_states=randn(1, c.in_channels, t * pt, h * p, w * p),
                timestep=torch.tensor([500], device=device),
                encoder_hidden_states=randn(1, e, c.text_embed_dim),
                encoder_attention_mask=torch.ones(1, e, device=device, dtype=torch.long),
                pooled_projections=randn(1, c.pooled_projection_dim),
                guidance=torch.tensor([6000.0], device=device, dtype=dtype), return_dict=False)


def attention_bound(case: Case) -> float:
    """Dense (query, key) pairs / pairs GNA computes, text tokens included."""
    from gna_flex.spec import count_pairs, make_params

    n, e = math.prod(case.grid), case.text_tokens
    window = count_pairs(make_params(case.grid, case.kernel_size, case.stride))
    return (n + e) ** 2 / (window + n * e + e * (n + e))


@contextmanager
def backends_used() -> Iterator[set]:
    """Collect the gna_flex backends that ran (``ops.select_backend`` results)."""
    from gna_flex import ops

    seen: set = set()
    original = ops.select_backend

    def spy(*args: Any, **kwargs: Any) -> str:
        chosen = original(*args, **kwargs)
        seen.add(chosen)
        return chosen

    ops.select_backend = spy
    try:
        yield seen
    finally:
        ops.select_backend = original


def drop_mask(processors: list) -> None:
    """Make each processor's dense attention ignore an all-valid mask (checked by the caller)."""
    for p in processors:
        inner = p.dense_attention

        def dense(*args: Any, _inner: Callable[..., Any] = inner, **kwargs: Any) -> Any:
            kwargs["attn_mask"] = None
            return _inner(*args, **kwargs)

        p.dense_attention = dense


# --------------------------------------------------------------------------- one model


def run_case(case: Case, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    from gna_flex.integrations import diffusers as gna

    clock = Clock(device)
    row: dict[str, Any] = dict(
        grid=list(case.grid), text_tokens=case.text_tokens, kernel_size=list(case.kernel_size),
        stride=list(case.stride), layer_scale=args.layer_scale, attention_flop_bound=attention_bound(case),
    )
    t0 = time.perf_counter()
    model = build(case, args.layer_scale, device, dtype)
    row["layers"] = {k: int(getattr(model.config, k)) for k in case.layer_keys}
    row["params_billion"] = sum(p.numel() for p in model.parameters()) / 1e9
    inputs = inputs_for(case, model, device, dtype)
    row["build_s"] = time.perf_counter() - t0

    def forward() -> torch.Tensor:
        with torch.no_grad(), sdpa_priority(device):  # a fresh context each call: it is single-use
            return model(**inputs)[0]

    dense_times = time_forward(forward, clock, args.warmup, args.reps)
    row["dense_ms"] = statistics.median(dense_times)
    dense_out = forward().float()

    handle = gna.enable(model, kernel_size=case.kernel_size, stride=case.stride, backend=args.backend)
    processors = [module.processor for module, _ in handle.originals]
    try:
        handle.schedule.set_override("dense")
        row["dense_attention_ms"], row["dense_forward_ms_timed"] = share_of_attention(forward, processors, clock)
        row["baseline"], baseline_ms = "dense_ms", row["dense_ms"]
        baseline_share = row["dense_attention_ms"] / row["dense_forward_ms_timed"]
        if case.name == "hunyuan":  # its text mask is all valid at batch 1: same result without it
            kept = [p.dense_attention for p in processors]
            drop_mask(processors)
            row["dense_nomask_ms"] = statistics.median(time_forward(forward, clock, args.warmup, args.reps))
            attention, timed = share_of_attention(forward, processors, clock)
            row["dense_nomask_attention_ms"], row["dense_nomask_forward_ms_timed"] = attention, timed
            if row["dense_nomask_ms"] < row["dense_ms"]:
                row["baseline"], baseline_ms = "dense_nomask_ms", row["dense_nomask_ms"]
                baseline_share = attention / timed
            else:  # GNA's dense text part gets the same treatment as the baseline
                for p, dense in zip(processors, kept):
                    p.dense_attention = dense

        handle.schedule.set_override("gna")
        with backends_used() as seen:
            gna_times = time_forward(forward, clock, args.warmup, args.reps)
            row["gna_attention_ms"], row["gna_forward_ms_timed"] = share_of_attention(forward, processors, clock)
        row["gna_backends"] = sorted(seen)
        row["gna_ms"] = statistics.median(gna_times)
        gna_out = forward().float()
    finally:
        gna.disable(model)

    row["speedup"] = baseline_ms / row["gna_ms"]
    # The same ratio from the forwards timed for the attention share: each follows at least one untimed
    # forward of its mode, so it stays warm even with --warmup 0 (first calls carry one-off costs).
    baseline_timed = row["dense_nomask_forward_ms_timed" if row["baseline"] == "dense_nomask_ms"
                         else "dense_forward_ms_timed"]
    row["speedup_timed_forwards"] = baseline_timed / row["gna_forward_ms_timed"]
    # shares come from one forward with timers (attention ms / that forward's ms)
    row["attention_share_dense"] = baseline_share
    row["attention_share_gna"] = row["gna_attention_ms"] / row["gna_forward_ms_timed"]
    nomask = row["baseline"] == "dense_nomask_ms"
    baseline_attention = row["dense_nomask_attention_ms" if nomask else "dense_attention_ms"]
    row["attention_speedup"] = baseline_attention / row["gna_attention_ms"]
    row["outputs_finite"] = bool(torch.isfinite(dense_out).all() and torch.isfinite(gna_out).all())
    scale = dense_out.abs().mean().item()
    row["gna_vs_dense_rel_diff"] = ((gna_out - dense_out).abs().mean().item() / scale) if scale else None
    row["dense_times_ms"], row["gna_times_ms"] = dense_times, gna_times
    return row


def sdpa_priority(device: torch.device) -> Any:
    """SDPA with cuDNN first (the project's dense baseline), then flash, efficient, math."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


# --------------------------------------------------------------------------- report


def table(models: dict) -> str:
    head = (f"{'model':8} {'dense ms':>9} {'gna ms':>9} {'speedup':>8} {'timed x':>8} {'attn share':>16} "
            f"{'attn x':>7} {'bound':>6}")
    lines = [head, "-" * len(head)]
    for name, r in models.items():
        if "error" in r:
            lines.append(f"{name:8} error: {r['error']}")
            continue
        share = f"{r['attention_share_dense']:.0%} -> {r['attention_share_gna']:.0%}"
        lines.append(f"{name:8} {r[r['baseline']]:9.1f} {r['gna_ms']:9.1f} {r['speedup']:7.2f}x "
                     f"{r.get('speedup_timed_forwards', float('nan')):7.2f}x {share:>16} "
                     f"{r['attention_speedup']:6.2f}x {r['attention_flop_bound']:5.1f}x")
    return "\n".join(lines)


def write_results(path: Path, run: dict) -> None:
    """Write ``run`` to ``path``, keeping the entries of models that ``run`` did not measure."""
    previous = json.loads(path.read_text()) if path.exists() else {}
    models = dict(previous.get("models", {}))
    models.update(run["models"])
    common.write_json(path, dict(run, models=models))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(CASES), default=["flux", "hunyuan"])
    parser.add_argument("--layer-scale", type=float, default=1.0,
                        help="fraction of the double/single blocks to build (default 1: the full model)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--backend", default=None, choices=[None, "cutlass", "flex", "reference"],
                        help="gna_flex backend (default: fused kernel when it can run, else flex)")
    parser.add_argument("--out", type=Path, default=None,
                        help="result file (default benchmarks/results/diffusers-<card>.json)")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on CPU in fp32 (a smoke test)")
    args = parser.parse_args(argv)
    if not 0 < args.layer_scale <= 1:
        parser.error(f"--layer-scale must be in (0, 1], got {args.layer_scale}")

    import diffusers

    if args.dry_run:
        device, dtype, cases, card = torch.device("cpu"), torch.float32, DRY_CASES, "cpu-dry-run"
        args.warmup, args.reps = min(args.warmup, 1), min(args.reps, 2)
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (use --dry-run for the CPU smoke test)")
        device, dtype, cases = torch.device("cuda"), torch.bfloat16, CASES
        card = common.card_name(device)
    env = common.environment()  # card, versions, commit (see common.git_commit), time
    run: dict[str, Any] = dict(
        env, card=card, diffusers=diffusers.__version__, date=env["utc"], dtype=str(dtype).removeprefix("torch."),
        batch=1, warmup=args.warmup, reps=args.reps, backend_arg=args.backend, models={},
    )
    failed = False
    for name in args.models:
        print(f"[{name}] building and timing ...", flush=True)
        try:
            run["models"][name] = run_case(cases[name], args, device, dtype)
        except Exception as exc:  # keep the other model's numbers
            failed = True
            traceback.print_exc()
            run["models"][name] = dict(error="".join(traceback.format_exception_only(type(exc), exc)).strip())
        print(json.dumps(run["models"][name], indent=1), flush=True)
        gc.collect()  # free this model before building the next
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = args.out or common.RESULTS / f"diffusers-{common.card_slug(card)}.json"
    write_results(out, run)
    print(f"wrote {out}")
    print(table(run["models"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
