"""Standalone check and timing of the sm90 GNA kernel through ``gna_flex._C``.

Calls the raw binding directly (no gna_flex.cutlass wrapper needed), so it
works while the Python side is still moving. Run on a Hopper GPU after
``GNA_FLEX_CUDA_ARCH=90a python setup.py build_ext --inplace``::

    python csrc/tools/check_sm90.py --configs 300            # random sweep vs the fp32 reference
    python csrc/tools/check_sm90.py --configs 4 --small      # a few tiny cases (compute-sanitizer)
    python csrc/tools/check_sm90.py --configs 0 --bench --json out.json

Outputs are filled with NaN before every run, inputs are fresh random values
every case, and Q/K/V are sometimes non-contiguous views (a packed qkv tensor,
permuted grid axes) to exercise the native-stride path.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time

import torch

from gna_flex import _C
from gna_flex.reference import na as reference_na
from gna_flex.spec import count_pairs, make_params, neighbors, unravel

TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
DTYPE_CODE = {torch.float16: _C.DTYPE_FLOAT16, torch.bfloat16: _C.DTYPE_BFLOAT16}


def make_qkv(batch, grid, heads, heads_kv, dim, dtype, layout, device="cuda"):
    """Random q, k, v of shape [B, *grid, h, D] in one of several memory layouts."""
    shape_q = (batch, *grid, heads, dim)
    shape_kv = (batch, *grid, heads_kv, dim)
    if layout == "packed" and heads == heads_kv:
        qkv = torch.randn(batch, *grid, 3, heads, dim, device=device, dtype=dtype)
        return qkv.select(-3, 0), qkv.select(-3, 1), qkv.select(-3, 2)
    if layout == "heads_first":  # [B, h, *grid, D] storage, viewed as [B, *grid, h, D]
        nd = len(grid)
        perm = (0, *range(2, 2 + nd), 1, 2 + nd)
        q = torch.randn(batch, heads, *grid, dim, device=device, dtype=dtype).permute(perm)
        k = torch.randn(batch, heads_kv, *grid, dim, device=device, dtype=dtype).permute(perm)
        v = torch.randn(batch, heads_kv, *grid, dim, device=device, dtype=dtype).permute(perm)
        return q, k, v
    return (
        torch.randn(shape_q, device=device, dtype=dtype),
        torch.randn(shape_kv, device=device, dtype=dtype),
        torch.randn(shape_kv, device=device, dtype=dtype),
    )


def run_kernel(q, k, v, gp, scale, extra_k=None, extra_v=None, want_lse=True, o=None, lse=None):
    batch, heads, dim = q.shape[0], q.shape[-2], q.shape[-1]
    if o is None:
        o = torch.full(q.shape, float("nan"), device=q.device, dtype=q.dtype)
    if want_lse and lse is None:
        lse = torch.full(q.shape[:-1], float("nan"), device=q.device, dtype=torch.float32)
    kw = {}
    if extra_k is not None:
        kw = dict(
            extra_k=extra_k.data_ptr(),
            extra_v=extra_v.data_ptr(),
            extra_k_stride=list(extra_k.stride()[:-1]),
            extra_v_stride=list(extra_v.stride()[:-1]),
            num_extra=extra_k.shape[1],
        )
    prm = _C.FwdParams(
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), o=o.data_ptr(),
        q_stride=list(q.stride()[:-1]), k_stride=list(k.stride()[:-1]),
        v_stride=list(v.stride()[:-1]), o_stride=list(o.stride()[:-1]),
        lse=lse.data_ptr() if want_lse else 0,
        batch=batch, heads=heads, heads_kv=k.shape[-2], head_dim=dim,
        grid=list(gp.grid), kernel_size=list(gp.kernel_size), stride=list(gp.stride),
        dilation=list(gp.dilation), causal=list(gp.is_causal), scale=scale,
        dtype=DTYPE_CODE[q.dtype], **kw,
    )
    why = _C.supports(prm)
    if why:
        raise RuntimeError(f"unsupported: {why}")
    return prm, o, lse


def random_config(rng: random.Random, small: bool):
    nd = rng.choice([1, 2, 3])
    if nd == 1:
        grid = [rng.randint(2, 80 if small else 700)]
    elif nd == 2:
        grid = [rng.randint(2, 12 if small else 45) for _ in range(2)]
    else:
        grid = [rng.randint(2, 6 if small else 14) for _ in range(3)]
    ks, st, di, ca = [], [], [], []
    for n in grid:
        d = 1 if rng.random() < 0.7 or n < 4 else rng.randint(1, max(1, n // 2))
        w = rng.randint(2, max(2, n // d))
        ks.append(w)
        st.append(rng.randint(1, w))
        di.append(d)
        ca.append(rng.random() < 0.3)
    heads_kv = rng.choice([1, 2])
    heads = heads_kv * rng.choice([1, 1, 2, 3])
    return dict(
        grid=grid, kernel_size=ks, stride=st, dilation=di, causal=ca,
        batch=rng.choice([1, 1, 2]), heads=heads, heads_kv=heads_kv,
        dim=rng.choice([64, 128]), dtype=rng.choice([torch.float16, torch.bfloat16]),
        extra=0 if rng.random() < 0.75 else rng.randint(1, 40 if small else 300),
        layout=rng.choice(["contiguous", "packed", "heads_first"]),
    )


def check_one(cfg) -> tuple[bool, str]:
    gp = make_params(cfg["grid"], cfg["kernel_size"], cfg["stride"], cfg["dilation"], cfg["causal"])
    dtype, dim = cfg["dtype"], cfg["dim"]
    q, k, v = make_qkv(cfg["batch"], gp.grid, cfg["heads"], cfg["heads_kv"], dim, dtype, cfg["layout"])
    ek = ev = None
    if cfg["extra"]:
        ek = torch.randn(cfg["batch"], cfg["extra"], cfg["heads_kv"], dim, device="cuda", dtype=dtype)
        ev = torch.randn_like(ek)
    scale = dim ** -0.5
    prm, o, lse = run_kernel(q, k, v, gp, scale, ek, ev)
    _C.forward(prm, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    ref, ref_lse = reference_na(
        q, k, v, gp.kernel_size, gp.stride, gp.dilation, gp.is_causal, scale=scale,
        additional_keys=ek, additional_values=ev, return_lse=True,
    )
    err = (o.float() - ref).abs().max().item() if o.numel() else 0.0
    lse_err = (lse - ref_lse).abs().max().item()
    ok = math.isfinite(err) and math.isfinite(lse_err) and err <= TOL[dtype] and lse_err <= 1e-2
    return ok, f"err={err:.2e} lse_err={lse_err:.2e}"


def sampled_check(q, k, v, gp, o, lse, scale, rows=48) -> tuple[float, float]:
    """Max error on a random sample of query rows against fp32 attention under the exact mask."""
    b = 0
    s = gp.num_tokens
    heads, group = q.shape[-2], q.shape[-2] // k.shape[-2]
    idx = torch.randint(0, s, (rows,), device=q.device)
    qc = unravel(idx[:, None], gp.grid)
    kc = unravel(torch.arange(s, device=q.device)[None, :], gp.grid)
    mask = neighbors(gp, qc, kc)  # [rows, S]
    qf = q[b].reshape(s, heads, -1)[idx].float().transpose(0, 1)  # [h, rows, D]
    kf = k[b].reshape(s, k.shape[-2], -1).float().transpose(0, 1).repeat_interleave(group, 0)
    vf = v[b].reshape(s, v.shape[-2], -1).float().transpose(0, 1).repeat_interleave(group, 0)
    sc = (qf @ kf.transpose(-1, -2)) * scale
    sc = sc.masked_fill(~mask[None], float("-inf"))
    ref = torch.softmax(sc, -1) @ vf
    ref_lse = torch.logsumexp(sc, -1)
    got = o[b].reshape(s, heads, -1)[idx].float().transpose(0, 1)
    got_lse = lse[b].reshape(s, heads)[idx].transpose(0, 1)
    return (got - ref).abs().max().item(), (got_lse - ref_lse).abs().max().item()


BENCH = [
    ("3d-30x48x80-k18x24x24-s16x8x8", (30, 48, 80), (18, 24, 24), (16, 8, 8)),
    ("3d-30x48x80-k18x24x24-s1", (30, 48, 80), (18, 24, 24), (1, 1, 1)),
    ("2d-256x256-k80x80-s16x16", (256, 256), (80, 80), (16, 16)),
    ("2d-256x256-k80x80-s1", (256, 256), (80, 80), (1, 1)),
    ("1d-32768-k2048-s1", (32768,), (2048,), (1,)),
    ("1d-32768-k2048-s256", (32768,), (2048,), (256,)),
]


def bench(dims, heads=24):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    results = []
    for dim in dims:
        for name, grid, ks, st in BENCH:
            gp = make_params(grid, ks, st)
            s = gp.num_tokens
            dtype = torch.bfloat16
            q, k, v = make_qkv(1, grid, heads, heads, dim, dtype, "contiguous")
            scale = dim ** -0.5
            prm, o, lse = run_kernel(q, k, v, gp, scale, want_lse=False)
            stream = torch.cuda.current_stream().cuda_stream
            _C.forward(prm, stream)
            torch.cuda.synchronize()
            prm_l, o_l, lse_l = run_kernel(q, k, v, gp, scale, want_lse=True)
            _C.forward(prm_l, stream)
            torch.cuda.synchronize()
            err, lse_err = sampled_check(q, k, v, gp, o_l, lse_l, scale)
            t_gna = do_bench(lambda: _C.forward(prm, stream), warmup=50, rep=300, return_mode="median")
            qd = q.reshape(1, s, heads, dim).transpose(1, 2)
            kd = k.reshape(1, s, heads, dim).transpose(1, 2)
            vd = v.reshape(1, s, heads, dim).transpose(1, 2)
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd)
                fn()
                t_dense = do_bench(fn, warmup=50, rep=300, return_mode="median")
            pairs = count_pairs(gp)
            useful = 4 * dim * heads * pairs
            dense = 4 * dim * heads * s * s
            r = dict(
                config=name, head_dim=dim, heads=heads, batch=1, dtype="bfloat16",
                gna_ms=t_gna, cudnn_ms=t_dense, speedup=t_dense / t_gna,
                flop_bound=dense / useful, gna_tflops=useful / t_gna / 1e9,
                cudnn_tflops=dense / t_dense / 1e9, sampled_err=err, sampled_lse_err=lse_err,
            )
            results.append(r)
            print(
                f"{name:34s} D={dim:3d} gna {t_gna:8.3f} ms ({r['gna_tflops']:6.1f} TF/s useful)  "
                f"cudnn {t_dense:8.3f} ms ({r['cudnn_tflops']:6.1f} TF/s)  speedup {r['speedup']:5.2f}x "
                f"(bound {r['flop_bound']:5.2f})  err {err:.1e}/{lse_err:.1e}",
                flush=True,
            )
            del q, k, v, o, o_l, lse_l
            torch.cuda.empty_cache()
    return results


def profile(name: str, dim: int = 128, heads: int = 24, launches: int = 3) -> None:
    """Launch one benchmark config's kernel a few times (for ncu); no reference, no cuDNN."""
    _, grid, ks, st = next(b for b in BENCH if b[0] == name)
    gp = make_params(grid, ks, st)
    q, k, v = make_qkv(1, grid, heads, heads, dim, torch.bfloat16, "contiguous")
    prm, o, _ = run_kernel(q, k, v, gp, dim ** -0.5, want_lse=False)
    for _ in range(launches):
        _C.forward(prm, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert not torch.isnan(o).any().item(), "unwritten output"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", type=int, default=300)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--bench-dims", default="128,64")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", default=None, help="benchmark config name: launch it only (for ncu)")
    args = ap.parse_args()
    if args.profile:
        profile(args.profile)
        return 0
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    print(f"seed {seed} device {torch.cuda.get_device_name()}", flush=True)
    failures = 0
    by_kind: dict[str, list[int]] = {}
    t0 = time.time()
    for n in range(args.configs):
        cfg = random_config(rng, args.small)
        try:
            ok, msg = check_one(cfg)
        except Exception as e:  # report and count, keep sweeping
            ok, msg = False, f"exception {type(e).__name__}: {e}"
        kind = f"{len(cfg['grid'])}d-{str(cfg['dtype'])[6:]}-d{cfg['dim']}"
        by_kind.setdefault(kind, [0, 0])[0 if ok else 1] += 1
        if not ok:
            failures += 1
            print(f"FAIL {n}: {cfg} {msg}", flush=True)
    if args.configs:
        print(f"{args.configs - failures}/{args.configs} configs passed in {time.time() - t0:.1f} s", flush=True)
        for kind in sorted(by_kind):
            print(f"  {kind}: {by_kind[kind][0]} passed, {by_kind[kind][1]} failed")
    out = dict(seed=seed, configs=args.configs, failures=failures, by_kind=by_kind)
    if args.bench:
        out["card"] = torch.cuda.get_device_name()
        out["torch"] = torch.__version__
        try:
            out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        except OSError:
            out["commit"] = ""
        out["bench"] = bench([int(d) for d in args.bench_dims.split(",")])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
