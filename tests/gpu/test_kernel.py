"""The fused sm90 kernel (gna_flex.cutlass.forward) against the fp32 reference, on an sm_90 GPU.

* 324 random configs from a seeded generator: 1-D/2-D/3-D, odd and
  non-tile-multiple shapes, strides from 1 to kernel_size, dilation, every
  per-axis causal combination, extra tokens, GQA/MQA, fp16 and bf16, head
  dims 64 and 128, batch 1-2, and non-contiguous inputs (q/k/v sliced out of a
  packed qkv tensor, heads-major storage, padded head rows).
* The benchmark configs of benchmarks/bench_kernel.py with 2 heads, checked
  on sampled query rows (a dense reference of 100k tokens does not fit).
* Unsupported inputs raise, saying what is unsupported.

Outputs and LSE are filled with NaN before each run, so elements the kernel
does not write fail. Tolerances (absolute, vs fp32): DESIGN.md's fp16 1e-2,
bf16 5e-2 on the output; LSE_ATOL / LSE_RTOL on the log-sum-exp.

Under compute-sanitizer (a handful of small configs)::

    compute-sanitizer --tool memcheck python tests/gpu/test_kernel.py --sanitize
"""

from __future__ import annotations

import importlib.util
import itertools
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

from gna_flex import cutlass
from gna_flex.spec import GNAParams, make_params, neighbors, unravel

if __name__ != "__main__":
    _why = cutlass.unavailable_reason()
    if _why is not None:
        pytest.skip(f"fused kernel not runnable here: {_why}", allow_module_level=True)

from gna_flex import reference  # noqa: E402 (only needed where the kernel runs)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
OUT_ATOL = {"float16": 1e-2, "bfloat16": 5e-2}
# LSE is computed in fp32 from the same inputs; errors come only from fp32
# accumulation order and fast exp2/log2, far below this.
LSE_ATOL, LSE_RTOL = 1e-3, 1e-4
LAYOUTS = ("contiguous", "packed_qkv", "heads_major", "padded_heads")
NUM_RANDOM_CASES = 324
ROWS_CHECKED = 1024  # query rows compared on the large benchmark configs
DEVICE = torch.device("cuda")


@dataclass(frozen=True)
class Case:
    """One kernel call: problem, data layout and seed."""

    grid: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]
    batch: int
    heads: int
    heads_kv: int
    head_dim: int
    dtype: str
    num_extra: int = 0
    layout: str = "contiguous"
    scale: Optional[float] = None
    with_lse: bool = True
    seed: int = 0
    rows: Optional[int] = None  # check only this many sampled query rows (large grids)

    @property
    def params(self) -> GNAParams:
        return make_params(self.grid, self.kernel_size, self.stride, self.dilation, self.causal)

    def __str__(self) -> str:
        def axes(values):
            return "x".join(str(int(v)) for v in values)

        return (f"g{axes(self.grid)}-w{axes(self.kernel_size)}-s{axes(self.stride)}-d{axes(self.dilation)}"
                f"-c{axes(self.causal)}-b{self.batch}h{self.heads}kv{self.heads_kv}-D{self.head_dim}"
                f"-{self.dtype}-e{self.num_extra}-{self.layout}{'' if self.with_lse else '-nolse'}")


# --------------------------------------------------------------------------- configs


def _axis(rng: random.Random, lo: int, hi: int, max_window: int) -> tuple[int, int, int, int]:
    """(length, kernel_size, stride, dilation) of one axis, valid for the GNA rule."""
    dilation = rng.choice((1, 1, 1, 2, 3))
    length = rng.randint(max(lo, 2 * dilation), hi)
    kernel_size = rng.randint(2, max(2, min(max_window, length // dilation)))
    stride = rng.choice((1, kernel_size, rng.randint(1, kernel_size)))
    return length, kernel_size, stride, dilation


# Per-rank axis length range and largest window drawn, so the dense reference
# (S x S scores per head) stays small while shapes straddle the kernel's tiles
# (1-D 128 tokens, 2-D 16x8, 3-D 2x8x8).
_RANK_SHAPES = {1: ((2, 1400), (8, 64, 300)), 2: ((2, 60), (4, 12, 40)), 3: ((2, 16), (3, 6, 12))}


def random_cases(count: int = NUM_RANDOM_CASES, seed: int = 2504_16922) -> list[Case]:
    """``count`` valid, varied cases; rank, dtype, head dim and causal combination cycle so all are covered."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        ndim = 1 + i % 3
        (lo, hi), windows = _RANK_SHAPES[ndim]
        combos = list(itertools.product((False, True), repeat=ndim))
        axes = [_axis(rng, lo, hi, rng.choice(windows)) for _ in range(ndim)]
        heads_kv = rng.choice((1, 1, 2, 3))
        heads = heads_kv * rng.choice((1, 2, 3))
        cases.append(Case(
            grid=tuple(a[0] for a in axes),
            kernel_size=tuple(a[1] for a in axes),
            stride=tuple(a[2] for a in axes),
            dilation=tuple(a[3] for a in axes),
            causal=combos[(i // 12) % len(combos)],
            batch=rng.randint(1, 2),
            heads=heads,
            heads_kv=heads_kv,
            head_dim=(64, 128)[(i // 6) % 2],
            dtype=("float16", "bfloat16")[(i // 3) % 2],
            num_extra=rng.choice((0, 0, 0, rng.randint(1, 16), rng.randint(100, 300))),
            layout=rng.choice(LAYOUTS),
            scale=rng.choice((None, round(rng.uniform(0.03, 0.3), 4))),
            with_lse=rng.random() < 0.8,
            seed=rng.randrange(2**31),
        ))
    return cases


def _bench_configs():
    """CONFIGS of benchmarks/bench_kernel.py (a script, not a package module)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernel.py"
    spec = importlib.util.spec_from_file_location("gna_flex_bench_kernel", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.CONFIGS


def benchmark_cases() -> list[Case]:
    cases = []
    for i, cfg in enumerate(_bench_configs()):
        for head_dim in (64, 128):
            cases.append(Case(
                grid=cfg.grid, kernel_size=cfg.kernel_size, stride=cfg.stride,
                dilation=(1,) * len(cfg.grid), causal=(False,) * len(cfg.grid),
                batch=1, heads=2, heads_kv=2, head_dim=head_dim, dtype="bfloat16",
                seed=1000 + 2 * i + head_dim, rows=ROWS_CHECKED,
            ))
    return cases


def sanitize_cases() -> list[Case]:
    """Small cases for compute-sanitizer: each rank, causal, dilation, extra tokens, GQA, both dtypes."""
    return [
        Case((150,), (13,), (4,), (2,), (False,), 2, 4, 2, 128, "bfloat16", 5, "packed_qkv"),
        Case((200,), (64,), (64,), (1,), (True,), 1, 2, 1, 64, "float16", 0, "contiguous"),
        Case((21, 13), (5, 4), (2, 4), (1, 2), (False, True), 2, 3, 1, 64, "bfloat16", 130, "heads_major"),
        Case((17, 10), (17, 3), (1, 3), (1, 1), (True, False), 1, 2, 2, 128, "float16", 0, "padded_heads"),
        Case((3, 11, 9), (2, 5, 3), (1, 2, 3), (1, 2, 1), (True, False, True), 2, 2, 2, 128, "bfloat16", 7,
             "contiguous"),
        Case((5, 9, 17), (3, 9, 4), (3, 1, 2), (1, 1, 3), (False, False, False), 1, 6, 3, 64, "float16", 0,
             "packed_qkv", with_lse=False),
    ]


# --------------------------------------------------------------------------- inputs


def make_inputs(case: Case) -> tuple[torch.Tensor, ...]:
    """q, k, v (and extra k, v or None) in the case's layout, random normal, on the GPU."""
    gen = torch.Generator(device=DEVICE).manual_seed(case.seed)
    dtype = DTYPES[case.dtype]
    b, grid, h, hkv, d, e = case.batch, case.grid, case.heads, case.heads_kv, case.head_dim, case.num_extra

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=DEVICE, dtype=dtype)

    if case.layout == "packed_qkv":
        packed = randn(b, *grid, h + 2 * hkv, d)
        q, k, v = packed[..., :h, :], packed[..., h : h + hkv, :], packed[..., h + hkv :, :]
    elif case.layout == "heads_major":  # stored [B, heads, *grid, D]
        q, k, v = (randn(b, n, *grid, d).movedim(1, -2) for n in (h, hkv, hkv))
    elif case.layout == "padded_heads":  # every head row padded by 8 elements (16 bytes)
        q, k, v = (randn(b, *grid, n, d + 8)[..., :d] for n in (h, hkv, hkv))
    else:
        q, k, v = randn(b, *grid, h, d), randn(b, *grid, hkv, d), randn(b, *grid, hkv, d)
    if e == 0:
        return q, k, v, None, None
    if case.layout == "packed_qkv":
        packed_extra = randn(b, e, 2 * hkv, d)
        return q, k, v, packed_extra[:, :, :hkv], packed_extra[:, :, hkv:]
    return q, k, v, randn(b, e, hkv, d), randn(b, e, hkv, d)


def reference_rows(q, k, v, ek, ev, params: GNAParams, rows: torch.Tensor, scale: float):
    """fp32 GNA for the raster query indices ``rows`` only: ``out [B, R, heads, D]``, ``lse [B, R, heads]``.

    Same maths as gna_flex.reference.na (masked softmax over window + extra
    keys), restricted to some queries so 100k-token grids fit in memory.
    """
    b, s, heads, hkv = q.shape[0], params.num_tokens, q.shape[-2], k.shape[-2]
    qf = q.reshape(b, s, heads, -1)[:, rows].float().transpose(1, 2)  # [B, H, R, D]
    kf = k.reshape(b, s, hkv, -1).float().transpose(1, 2)
    vf = v.reshape(b, s, hkv, -1).float().transpose(1, 2)
    if ek is not None:
        kf = torch.cat([kf, ek.float().transpose(1, 2)], dim=2)
        vf = torch.cat([vf, ev.float().transpose(1, 2)], dim=2)
    group = heads // hkv
    kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    keys = torch.arange(s, device=q.device)
    mask = neighbors(params, unravel(rows[:, None], params.grid), unravel(keys[None, :], params.grid))
    if ek is not None:
        mask = torch.cat([mask, mask.new_ones(len(rows), ek.shape[1])], dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ vf
    return out.transpose(1, 2), lse.transpose(1, 2)


def _sample_rows(params: GNAParams, count: int, gen: torch.Generator) -> torch.Tensor:
    """Random raster rows plus the grid's corners (where windows shift inward)."""
    everything = torch.arange(params.num_tokens, device=DEVICE)
    at_corner = torch.ones_like(everything, dtype=torch.bool)
    for coord, n in zip(unravel(everything, params.grid), params.grid):
        at_corner &= (coord == 0) | (coord == n - 1)
    rows = torch.randint(0, params.num_tokens, (count,), generator=gen, device=DEVICE)
    return torch.unique(torch.cat([rows, everything[at_corner]]))


# --------------------------------------------------------------------------- the check


def _where(diff: torch.Tensor) -> str:
    index = int(diff.flatten().argmax())
    return str(tuple(int(i) for i in torch.unravel_index(torch.tensor(index), diff.shape)))


def check_case(case: Case) -> None:
    """Run the kernel on ``case`` into NaN-filled outputs and compare with the fp32 reference."""
    params = case.params
    q, k, v, ek, ev = make_inputs(case)
    out = torch.full(q.shape, float("nan"), device=DEVICE, dtype=q.dtype)
    lse = torch.full(q.shape[:-1], float("nan"), device=DEVICE) if case.with_lse else None
    reason = cutlass.unsupported_reason(q, k, v, params, ek, ev, scale=case.scale)
    assert reason is None, f"{case}: kernel refuses a supported config: {reason}"

    got_out, got_lse = cutlass.forward(q, k, v, params, scale=case.scale, additional_keys=ek,
                                       additional_values=ev, out=out, lse_out=lse)
    torch.cuda.synchronize()
    assert got_out is out and got_lse is lse
    bad = int((~torch.isfinite(out)).sum())
    assert bad == 0, f"{case}: {bad} of {out.numel()} output elements are NaN/inf (unwritten or overflow)"
    if lse is not None:
        bad = int((~torch.isfinite(lse)).sum())
        assert bad == 0, f"{case}: {bad} of {lse.numel()} LSE elements are NaN/inf"

    scale = case.scale if case.scale is not None else case.head_dim ** -0.5
    if case.rows is None:
        ref_out, ref_lse = reference.na(q, k, v, params.kernel_size, params.stride, params.dilation,
                                        params.is_causal, scale=scale, additional_keys=ek,
                                        additional_values=ev, return_lse=True)
        got, got_l = out.float(), lse
    else:
        gen = torch.Generator(device=DEVICE).manual_seed(case.seed)
        rows = _sample_rows(params, case.rows, gen)
        ref_out, ref_lse = reference_rows(q, k, v, ek, ev, params, rows, scale)
        b, s = q.shape[0], params.num_tokens
        got = out.reshape(b, s, case.heads, -1)[:, rows].float()
        got_l = lse.reshape(b, s, case.heads)[:, rows] if lse is not None else None

    diff = (got - ref_out).abs()
    err = float(diff.max())
    assert err <= OUT_ATOL[case.dtype], (
        f"{case}: output max abs error {err:.3g} > {OUT_ATOL[case.dtype]} at {_where(diff)} "
        f"(mean error {float(diff.mean()):.3g})"
    )
    if got_l is not None:
        tol = LSE_ATOL + LSE_RTOL * ref_lse.abs()
        excess = (got_l - ref_lse).abs() - tol
        assert float(excess.max()) <= 0, (
            f"{case}: LSE error {float((got_l - ref_lse).abs().max()):.3g} above tolerance at {_where(excess)}"
        )


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", random_cases(), ids=str)
def test_random_config(case: Case):
    check_case(case)


@pytest.mark.parametrize("case", benchmark_cases(), ids=str)
def test_benchmark_config(case: Case):
    check_case(case)


def test_generator_covers_the_space():
    cases = random_cases()
    assert len(cases) >= 300
    for ndim in (1, 2, 3):
        of_rank = [c for c in cases if len(c.grid) == ndim]
        assert {c.causal for c in of_rank} == set(itertools.product((False, True), repeat=ndim))
        assert {(c.dtype, c.head_dim) for c in of_rank} == {(t, d) for t in DTYPES for d in (64, 128)}
        assert any(c.num_extra for c in of_rank) and any(c.heads_kv < c.heads for c in of_rank)
        assert any(max(c.dilation) > 1 for c in of_rank)
        assert {c.layout for c in of_rank} == set(LAYOUTS)
    assert any(c.stride == c.kernel_size for c in cases) and any(set(c.stride) == {1} for c in cases)
    assert any(1 < s < w for c in cases for s, w in zip(c.stride, c.kernel_size))


def test_reference_rows_match_reference():
    case = Case((9, 14), (4, 5), (2, 3), (2, 1), (False, True), 2, 4, 2, 64, "bfloat16", 6, "packed_qkv", seed=7)
    q, k, v, ek, ev = make_inputs(case)
    params = case.params
    rows = torch.arange(params.num_tokens, device=DEVICE)
    out, lse = reference_rows(q, k, v, ek, ev, params, rows, 0.125)
    ref_out, ref_lse = reference.na(q, k, v, params.kernel_size, params.stride, params.dilation,
                                    params.is_causal, scale=0.125, additional_keys=ek, additional_values=ev,
                                    return_lse=True)
    torch.testing.assert_close(out, ref_out.reshape(out.shape), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse.reshape(lse.shape), atol=1e-5, rtol=1e-5)


def _unsupported(**overrides) -> Case:
    base = dict(grid=(40,), kernel_size=(8,), stride=(1,), dilation=(1,), causal=(False,), batch=2, heads=4,
                heads_kv=4, head_dim=64, dtype="bfloat16")
    return Case(**{**base, **overrides})


def _assert_refused(q, k, v, params, match: str, **kwargs):
    reason = cutlass.unsupported_reason(q, k, v, params, **kwargs)
    assert reason is not None and match in reason, reason
    with pytest.raises(RuntimeError, match=match):
        cutlass.forward(q, k, v, params, scale=None, **kwargs)


def test_unsupported_inputs_raise_with_a_message():
    params = make_params(40, 8)
    q, k, v, _, _ = make_inputs(_unsupported())

    _assert_refused(q.float(), k.float(), v.float(), params, "torch.float32")
    _assert_refused(q.cpu(), k.cpu(), v.cpu(), params, "cpu")

    q96, k96, v96, _, _ = make_inputs(_unsupported(head_dim=96))
    _assert_refused(q96, k96, v96, params, "head_dim")

    flat = torch.randn(q.numel() + 1, device=DEVICE, dtype=q.dtype)
    misaligned = flat[1:].view(q.shape)  # 2 bytes past an aligned address
    _assert_refused(misaligned, k, v, params, "align")

    rows = torch.randn(2, 40, 4 * 64 + 4, device=DEVICE, dtype=q.dtype)
    odd_stride = rows[..., : 4 * 64].view(2, 40, 4, 64)  # token stride of 260 elements = 520 bytes
    _assert_refused(odd_stride, k, v, params, "stride")

    _assert_refused(q, k, v, params, "tile", q_tile=(3,))


def test_repeated_runs_are_identical():
    case = random_cases(6)[4]
    q, k, v, ek, ev = make_inputs(case)
    first, _ = cutlass.forward(q, k, v, case.params, scale=case.scale, additional_keys=ek, additional_values=ev)
    second, _ = cutlass.forward(q, k, v, case.params, scale=case.scale, additional_keys=ek, additional_values=ev)
    assert torch.equal(first, second), f"{case}: two runs differ"


# --------------------------------------------------------------------------- script mode


def _sanitize() -> int:
    why = cutlass.unavailable_reason()
    if why is not None:
        print(f"test_kernel --sanitize: fused kernel not runnable here: {why}")
        return 2
    failures = 0
    for case in sanitize_cases():
        try:
            check_case(case)
            print(f"ok      {case}", flush=True)
        except AssertionError as error:
            failures += 1
            print(f"FAILED  {error}", flush=True)
    print(f"{len(sanitize_cases()) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    if sys.argv[1:] != ["--sanitize"]:
        sys.exit("usage: python tests/gpu/test_kernel.py --sanitize  (run the test suite with pytest)")
    sys.exit(_sanitize())
