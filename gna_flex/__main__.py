"""``python -m gna_flex``: run GNA on a built-in video-like example.

Builds random q/k/v on a 3-D token grid (small on CPU, the HunyuanVideo-size
30x48x80 grid on a GPU), runs :func:`gna_flex.na3d` with the best available
backend, checks the result against the fp32 reference on a slice of queries,
and, on a GPU, times it against dense SDPA.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from . import functional, ops, reference
from .sim import estimate, simulate
from .spec import count_pairs, make_params


def _time_ms(fn, repeats: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gna_flex", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, choices=[None, *ops.BACKENDS])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        grid, kernel, stride, heads, dim, dtype = (30, 48, 80), (18, 24, 24), (16, 8, 8), 24, 128, torch.bfloat16
    else:
        grid, kernel, stride, heads, dim, dtype = (8, 24, 32), (3, 6, 8), (2, 4, 4), 2, 32, torch.float32
    params = make_params(grid, kernel, stride)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, *grid, heads, dim, device=device, dtype=dtype) for _ in range(3))
    backend = ops.select_backend(args.backend, q, k, v, params)
    print(f"grid {grid}, kernel_size {kernel}, stride {stride}, heads {heads}, head dim {dim}, {dtype}, {device}")
    print(f"backend: {backend}; FLOP-wise speedup bound {params.num_tokens ** 2 / count_pairs(params):.2f}x")
    gpu_cfg = ((30, 48, 80), (18, 24, 24), (16, 8, 8))
    report = simulate(*gpu_cfg)
    predicted = estimate(report, 24, 128, 1, torch.bfloat16, device="sm90", path="kernel")
    print(f"NATTENSim, GPU example {gpu_cfg} with 24 heads, head dim 128, bf16: perfectly block-sparse "
          f"{'yes' if report.perfectly_block_sparse else 'no'}, predicted fused-kernel speedup "
          f"{predicted.speedup:.2f}x over dense on sm90 (H100/H200; constants calibrated on an H100)")

    # Correctness on a grid small enough for the dense reference, same parameters scaled down.
    small_grid, small_kernel, small_stride = (4, 12, 16), (3, 6, 8), (2, 4, 4)
    qs, ks, vs = (torch.randn(1, *small_grid, heads, dim, device=device, dtype=dtype) for _ in range(3))
    got = functional.na3d(qs, ks, vs, small_kernel, small_stride, backend=backend)
    want = reference.na(qs, ks, vs, small_kernel, small_stride)
    err = (got.float() - want).abs().max().item()
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    print(f"small grid {small_grid}: max |out - fp32 reference| = {err:.3g} (tolerance {tol:g})")
    if not err <= tol:
        print("FAILED: result differs from the reference", file=sys.stderr)
        return 1
    out = functional.na3d(q, k, v, kernel, stride, backend=backend)
    assert out.shape == q.shape and torch.isfinite(out).all()
    if on_gpu:
        sdpa_in = [t.flatten(1, 3).transpose(1, 2) for t in (q, k, v)]
        dense = _time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(*sdpa_in), 10)
        gna = _time_ms(lambda: functional.na3d(q, k, v, kernel, stride, backend=backend), 10)
        print(f"dense SDPA {dense:.2f} ms, GNA ({backend}) {gna:.2f} ms: {dense / gna:.2f}x faster")
    print("ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
