"""The "gna" torch.compile backend on CUDA: Inductor inner compiler, bf16, each gna_flex path, gradients."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gna_flex.backend import gna_backend
from gna_flex.passes import Rule, explain

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _dit import TinyDiT, grid_of, make_inputs  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

VIDEO, PATCH = (4, 32, 32), (1, 2, 2)
GRID = grid_of(VIDEO, PATCH)  # 4 x 16 x 16 = 1024 grid tokens
TEXT, CONTEXT = 16, 12
KERNEL, STRIDE = (2, 8, 8), (2, 8, 8)
TOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}


def _setup(dtype, requires_grad=False):
    torch.manual_seed(0)
    model = TinyDiT(in_channels=4, dim=128, heads=2, depth=2, patch=PATCH, text_dim=64).to("cuda", dtype)
    inputs = make_inputs(1, 4, VIDEO, TEXT, CONTEXT, 64, dtype=dtype, device="cuda", requires_grad=requires_grad)
    return model, inputs


def _paths():
    from gna_flex import cutlass

    return ["flex"] + (["cutlass"] if cutlass.is_available() else [])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", _paths())
def test_inductor_rewrite_matches_reference(path, dtype):
    model, inputs = _setup(dtype)
    rule = Rule(grid=GRID, kernel_size=KERNEL, stride=STRIDE, extra_tokens=TEXT, module=r"blocks\.\d+\.attn",
                min_speedup=0.0, backend=path)
    compiled = torch.compile(model, backend=gna_backend, options={"rules": [rule], "inner": "inductor"})
    with torch.no_grad():
        out = compiled(*inputs)
        model.set_gna_reference(GRID, KERNEL, STRIDE, extra_tokens=TEXT, device="cuda")
        expected = model(*inputs)
        model.clear_gna_reference()
    assert explain(compiled).num_rewritten == 2
    torch.testing.assert_close(out.float(), expected.float(), atol=TOL[dtype], rtol=0)


def test_default_path_and_gradients():
    model, inputs = _setup(torch.bfloat16, requires_grad=True)
    rule = Rule(grid=GRID, kernel_size=KERNEL, stride=STRIDE, extra_tokens=TEXT, min_speedup=0.0)
    compiled = torch.compile(model, backend=gna_backend, options={"rules": [rule]})
    compiled(*inputs).float().square().mean().backward()
    got = [p.grad.float().clone() for p in model.parameters()]
    assert explain(compiled).num_rewritten == 2
    model.zero_grad()
    model.set_gna_reference(GRID, KERNEL, STRIDE, extra_tokens=TEXT, device="cuda")
    model(*inputs).float().square().mean().backward()
    for g, p in zip(got, model.parameters()):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, p.grad.float(), atol=5e-2, rtol=5e-2)
