"""gna_flex._permute_triton on the CPU: the Triton copy kernel run by Triton's interpreter.

The kernel's index arithmetic (tile-major decode, padding and extra zeros,
raster re-encode, strided payload-contiguous inputs) is checked against
layout's torch copies without a GPU; tests/gpu/test_layout_gpu.py runs the
compiled kernel on CUDA.
"""

import pytest
import torch

from gna_flex import _permute_triton as pt
from gna_flex import layout

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

CASES = [
    # grid, tile, extra
    ((37,), (16,), 0),
    ((37,), (8,), 5),
    ((9, 10), (4, 4), 0),
    ((8, 12), (4, 4), 3),
    ((5, 7, 3), (2, 4, 2), 3),
    ((4, 8, 8), (2, 4, 4), 0),
]


@pytest.fixture
def interpreted(monkeypatch):
    kernel = pt._tile_major_copy
    if not isinstance(kernel, InterpretedFunction):  # TRITON_INTERPRET=1 already gives one
        monkeypatch.setattr(pt, "_tile_major_copy", InterpretedFunction(kernel.fn))


def _torch_permute(x, grid, tile, extra):
    pt.ENABLED = False
    try:
        return layout.permute(x, grid, tile, extra=extra)
    finally:
        pt.ENABLED = True


@pytest.mark.parametrize("grid, tile, extra", CASES)
def test_kernel_matches_torch_copies(interpreted, grid, tile, extra):
    gen = torch.Generator().manual_seed(0)
    # tokens strided (a slice of a fused qkv buffer), each token's heads*D payload contiguous
    x = torch.randn(2, *grid, 3, 2, 20, generator=gen).select(-3, 2)
    lay = layout.make_tile_layout(grid, tile)
    y = pt._to_tiles(x, lay, extra)
    expected, _ = _torch_permute(x, grid, tile, extra)
    assert y.shape == expected.shape and torch.equal(y, expected)
    back = pt._from_tiles(y[:, : lay.num_tokens], lay)
    assert back.shape == x.shape and torch.equal(back, x)
    # the output side reads a strided view too (flex's output through its transpose)
    y_t = y[:, : lay.num_tokens].transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(pt._from_tiles(y_t, lay), x)


def test_token_strides_refuse_split_payloads():
    x = torch.randn(2, 4, 6, 3, 8)
    assert pt._token_strides(x, 2) == [x.stride(0), 0, x.stride(1), x.stride(2)]
    assert pt._token_strides(x.transpose(-1, -2), 2) is None  # D not innermost
    assert pt._token_strides(x[..., ::2], 2) is None  # payload not contiguous
    assert not pt.available(x)  # CPU tensors never take the kernel path in layout


@pytest.mark.parametrize("grid, tile, extra", [CASES[1], CASES[4]])
def test_autograd_directions_are_each_others_backward(interpreted, grid, tile, extra):
    lay = layout.make_tile_layout(grid, tile)
    x = torch.randn(1, *grid, 2, 8, requires_grad=True)
    y = pt._Permute.apply(x, lay, extra)
    w = torch.randn_like(y)
    (g,) = torch.autograd.grad((y * w).sum(), x)
    assert torch.equal(g, layout.unpermute(w[:, : lay.num_tokens], lay))
    y2 = y.detach()[:, : lay.num_tokens].requires_grad_()
    out = pt._Unpermute.apply(y2, lay)
    w2 = torch.randn_like(out)
    (g2,) = torch.autograd.grad((out * w2).sum(), y2)
    expected, _ = _torch_permute(w2, grid, tile, 0)
    assert torch.equal(g2, expected)
