"""The Triton tile-major permutation (CUDA) against layout's torch copies: values, padding, views, gradients."""

import pytest
import torch

from gna_flex import _permute_triton, layout

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CASES = [
    # grid, tile, extra
    ((300,), (64,), 0),
    ((300,), (128,), 17),
    ((256,), (128,), 5),
    ((40, 37), (16, 8), 0),
    ((32, 32), (16, 8), 0),
    ((33, 48), (8, 16), 9),
    ((9, 20, 22), (2, 8, 8), 0),
    ((16, 24, 24), (2, 8, 8), 0),
    ((16, 24, 24), (4, 4, 8), 130),
    ((5, 7, 3), (2, 4, 2), 3),
]


def _torch_path(fn, *args, **kwargs):
    _permute_triton.ENABLED = False
    try:
        return fn(*args, **kwargs)
    finally:
        _permute_triton.ENABLED = True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("grid, tile, extra", CASES)
def test_permute_matches_torch_copies(grid, tile, extra, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    # A view of a fused qkv buffer: tokens are strided, each token's heads*D payload contiguous.
    qkv = torch.randn(2, *grid, 3, 3, 40, device="cuda", dtype=dtype, generator=gen)
    x = qkv.select(-3, 1)
    y, lay = layout.permute(x, grid, tile, extra=extra)
    y_ref, _ = _torch_path(layout.permute, x, grid, tile, extra=extra)
    assert y.shape == y_ref.shape
    assert torch.equal(y, y_ref)
    back = layout.unpermute(y[:, : lay.num_tokens], lay)
    assert torch.equal(back, x)
    flat = layout.unpermute(y[:, : lay.num_tokens], lay, flat=True)
    assert torch.equal(flat, x.flatten(1, len(grid)))
    # Output-side input that is itself a strided view (flex's output read through transpose).
    y_t = y[:, : lay.num_tokens].transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(layout.unpermute(y_t, lay), x)


@pytest.mark.parametrize("grid, tile, extra", [CASES[1], CASES[5], CASES[8]])
def test_permute_gradients(grid, tile, extra):
    x = torch.randn(2, *grid, 2, 16, device="cuda", dtype=torch.float32, requires_grad=True)
    y, lay = layout.permute(x, grid, tile, extra=extra)
    w = torch.randn_like(y)
    (g,) = torch.autograd.grad((y * w).sum(), x)
    assert torch.equal(g, layout.unpermute(w[:, : lay.num_tokens], lay))
    y2 = y.detach().requires_grad_()
    out = layout.unpermute(y2[:, : lay.num_tokens], lay)
    w2 = torch.randn_like(out)
    (g2,) = torch.autograd.grad((out * w2).sum(), y2)
    expected, _ = _torch_path(layout.permute, w2, grid, tile, extra=extra)
    assert torch.equal(g2, expected)
