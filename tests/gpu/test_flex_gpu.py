"""The flex path on CUDA (compiled flex_attention): fp16/bf16 vs the fp32 reference, gradients, no recompiles."""

import pytest
import torch

from gna_flex import flex, reference, score_mods
from gna_flex.spec import make_params, unravel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}

CASES = [
    # grid, kernel_size, stride, dilation, is_causal, extra tokens, heads, heads_kv, tile
    ((300,), 33, 1, 1, False, 0, 4, 4, None),
    ((257,), 16, 16, 2, True, 7, 4, 2, None),
    ((40, 37), (9, 8), (3, 8), (1, 2), (False, True), 0, 4, 1, None),
    ((32, 32), (16, 16), (16, 16), 1, False, 5, 2, 2, (16, 8)),
    ((9, 20, 22), (4, 6, 7), (2, 1, 7), (1, 2, 1), (True, False, False), 0, 2, 2, None),
    ((16, 24, 24), (8, 8, 8), (8, 8, 8), 1, False, 3, 2, 1, (2, 8, 8)),
    # perfectly block-sparse (no partial block): the kernel runs the mask_mod-free twin
    ((16, 24, 24), (8, 8, 8), (8, 8, 8), 1, False, 0, 2, 2, (2, 8, 8)),
]


def _inputs(grid, heads, heads_kv, extra, dtype, d=64, requires_grad=False):
    def t(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=requires_grad)

    q, k, v = t(2, *grid, heads, d), t(2, *grid, heads_kv, d), t(2, *grid, heads_kv, d)
    ak, av = (t(2, extra, heads_kv, d), t(2, extra, heads_kv, d)) if extra else (None, None)
    return q, k, v, ak, av


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_flex_na_matches_fp32_reference(case, dtype):
    grid, ks, st, di, ca, extra, heads, heads_kv, tile = case
    params = make_params(grid, ks, st, di, ca)
    q, k, v, ak, av = _inputs(grid, heads, heads_kv, extra, dtype)
    out, lse = flex.flex_na(q, k, v, params, additional_keys=ak, additional_values=av, return_lse=True, tile=tile)
    f32 = [None if x is None else x.float() for x in (q, k, v, ak, av)]
    ref, ref_lse = reference.na(f32[0], f32[1], f32[2], ks, st, di, ca, additional_keys=f32[3],
                                additional_values=f32[4], return_lse=True)
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("case, d", [(CASES[1], 64), (CASES[2], 64), (CASES[5], 64),
                                     # head dim 128: on sm90 the forward runs gna_flex's kernel options
                                     # (2 stages with partial blocks, 3 without); the backward torch's own
                                     (CASES[5], 128), (CASES[6], 128)])
def test_flex_na_gradients(case, d):
    grid, ks, st, di, ca, extra, heads, heads_kv, tile = case
    params = make_params(grid, ks, st, di, ca)
    inputs = [x for x in _inputs(grid, heads, heads_kv, extra, torch.float16, d=d, requires_grad=True)
              if x is not None]
    q, k, v, *add = inputs
    add = add or [None, None]
    out = flex.flex_na(q, k, v, params, additional_keys=add[0], additional_values=add[1], tile=tile)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    f32 = [x.detach().float().requires_grad_() for x in inputs]
    add32 = f32[3:] or [None, None]
    ref = reference.na(f32[0], f32[1], f32[2], ks, st, di, ca, additional_keys=add32[0], additional_values=add32[1])
    torch.testing.assert_close(out.float(), ref.detach(), atol=TOL[torch.float16], rtol=0)
    want = torch.autograd.grad(ref, f32, grad.float())
    for g, w in zip(got, want):
        assert not g.isnan().any()
        rel = (g.float() - w).norm() / w.norm()
        assert rel < 2e-2, float(rel)


needs_flash = pytest.mark.skipif(not flex.flash_available(),
                                 reason="needs flash-attn-4 (torch's FLASH flex backend) on an sm90/sm100 GPU")
FLASH = {"BACKEND": "FLASH"}


@needs_flash
@pytest.mark.parametrize("case, d", [(c, 128) for c in CASES] + [(CASES[1], 64), (CASES[5], 64)])
def test_flash_backend_matches_fp32_reference(case, d):
    """torch's FLASH backend (FlashAttention-4) under gna_flex's block masks: out and LSE (ln 2 fixed)."""
    grid, ks, st, di, ca, extra, heads, heads_kv, tile = case
    params = make_params(grid, ks, st, di, ca)
    q, k, v, ak, av = _inputs(grid, heads, heads_kv, extra, torch.bfloat16, d=d)
    out, lse = flex.flex_na(q, k, v, params, additional_keys=ak, additional_values=av, return_lse=True, tile=tile,
                            kernel_options=FLASH)
    f32 = [None if x is None else x.float() for x in (q, k, v, ak, av)]
    ref, ref_lse = reference.na(f32[0], f32[1], f32[2], ks, st, di, ca, additional_keys=f32[3],
                                additional_values=f32[4], return_lse=True)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref, atol=TOL[torch.bfloat16], rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=TOL[torch.bfloat16], rtol=0)


@needs_flash
@pytest.mark.parametrize("case", [CASES[2], CASES[5], CASES[6]])
def test_flash_backend_gradients(case):
    grid, ks, st, di, ca, extra, heads, heads_kv, tile = case
    params = make_params(grid, ks, st, di, ca)
    inputs = [x for x in _inputs(grid, heads, heads_kv, extra, torch.float16, d=128, requires_grad=True)
              if x is not None]
    q, k, v, *add = inputs
    add = add or [None, None]
    out = flex.flex_na(q, k, v, params, additional_keys=add[0], additional_values=add[1], tile=tile,
                       kernel_options=FLASH)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    f32 = [x.detach().float().requires_grad_() for x in inputs]
    add32 = f32[3:] or [None, None]
    ref = reference.na(f32[0], f32[1], f32[2], ks, st, di, ca, additional_keys=add32[0], additional_values=add32[1])
    want = torch.autograd.grad(ref, f32, grad.float())
    for g, w in zip(got, want):
        assert not g.isnan().any()
        rel = (g.float() - w).norm() / w.norm()
        assert rel < 2e-2, float(rel)


@pytest.mark.parametrize("flash", [False, pytest.param(True, marks=needs_flash)])
def test_rows_masked_in_their_first_partial_block_stay_finite(flash):
    """Stride 1 on a 2-D grid with 128-token tiles: for some queries, the first partial KV block the kernel
    visits holds no key of their window. Their running maximum is -inf after it; a kernel without its
    masked-row guard (Triton's ROWS_GUARANTEED_SAFE) turns those rows into NaN."""
    grid, ks, tile = (64, 64), (21, 21), (16, 8)
    params = make_params(grid, ks)
    q, k, v, _, _ = _inputs(grid, 2, 2, 0, torch.bfloat16, d=128)
    opts = flex.default_kernel_options(torch.bfloat16, 128, False, (128, 128), has_partial=True, ndim=2, flash=flash)
    out = flex.flex_na(q, k, v, params, tile=tile, kernel_options=opts)
    ref = reference.na(q.float(), k.float(), v.float(), ks)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref, atol=TOL[torch.bfloat16], rtol=0)


def test_no_recompile_across_configs_cuda():
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    fn = torch.compile(flex_attention, backend=counter, dynamic=False, fullgraph=True)
    grid, tile = (32, 32), (16, 8)
    q, k, v = (torch.randn(1, 2, 1024, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    for ks, st, di, ca in [(8, 1, 1, False), ((16, 8), (16, 8), 1, False), (6, 2, 2, (True, False)), (4, 4, 3, True)]:
        bm = flex.block_mask(grid, ks, st, di, ca, tile=tile, device="cuda")
        out = fn(q, k, v, block_mask=bm)
        assert not out.isnan().any()
    assert counter.frame_count == 1


def test_block_mask_on_cuda_equals_cpu():
    for tile in [(2, 8, 8), None]:
        args = ((30, 48, 80), (18, 24, 24), (16, 8, 8), 1, False, tile)
        a = flex.block_mask(*args, device="cuda")
        b = flex.block_mask(*args, device="cpu")
        assert torch.equal(a.to_dense().cpu(), b.to_dense())
        assert torch.equal(a.full_kv_num_blocks.cpu(), b.full_kv_num_blocks)


def test_rpb_gradients_cuda():
    params = make_params((12, 14), (5, 4), (2, 1))
    heads, d = 2, 32
    table = torch.randn(heads, 9, 7, device="cuda", requires_grad=True)
    q, k, v = (torch.randn(1, heads, 168, d, device="cuda") for _ in range(3))
    bm = flex.block_mask(params, None, device="cuda")
    sm = score_mods.relative_position_bias(table, params, None)
    fn = torch.compile(torch.nn.attention.flex_attention.flex_attention, fullgraph=True)
    out = fn(q, k, v, score_mod=sm, block_mask=bm)
    idx = torch.arange(168, device="cuda")
    qc, kc = unravel(idx[:, None], params.grid), unravel(idx[None, :], params.grid)
    bias = table[:, (kc[0] - qc[0] + 4).clamp(0, 8), (kc[1] - qc[1] + 3).clamp(0, 6)]
    s = q @ k.transpose(-1, -2) * d ** -0.5 + bias
    want = torch.softmax(s.masked_fill(~reference.dense_mask(params, device="cuda"), float("-inf")), -1) @ v
    torch.testing.assert_close(out, want, atol=1e-3, rtol=1e-3)
    g = torch.randn_like(out)
    (ga,) = torch.autograd.grad(out, table, g)
    (gb,) = torch.autograd.grad(want, table, g)
    torch.testing.assert_close(ga, gb, atol=1e-3, rtol=1e-3)
