import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gna_flex
from gna_flex import functional, reference
from strategies import gna_configs


def _inputs(grid, heads=2, heads_kv=1, d=8, extra=0, dtype=torch.float32, requires_grad=False):
    make = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    q, k, v = make(1, *grid, heads, d), make(1, *grid, heads_kv, d), make(1, *grid, heads_kv, d)
    ek = make(1, extra, heads_kv, d) if extra else None
    ev = make(1, extra, heads_kv, d) if extra else None
    return q, k, v, ek, ev


@given(cfg=gna_configs(max_len=9), data=st.data())
def test_flex_backend_matches_reference(cfg, data):
    grid, ks, st_, di, ca = cfg
    heads_kv = data.draw(st.sampled_from([1, 2]))
    extra = data.draw(st.sampled_from([0, 3]))
    q, k, v, ek, ev = _inputs(grid, heads=2 * heads_kv, heads_kv=heads_kv, extra=extra)
    fn = getattr(functional, f"na{len(grid)}d")
    out, lse = fn(q, k, v, ks, st_, di, ca, additional_keys=ek, additional_values=ev, return_lse=True,
                  backend="flex")
    want, want_lse = reference.na(q, k, v, ks, st_, di, ca, additional_keys=ek, additional_values=ev,
                                  return_lse=True)
    assert out.shape == q.shape and lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=0, atol=1e-4)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", [None, "flex", "reference"])
def test_backends_agree_and_keep_dtype(backend):
    q, k, v, _, _ = _inputs((6, 7), dtype=torch.float64)
    out = functional.na2d(q, k, v, (3, 4), (2, 2), backend=backend)
    assert out.dtype == torch.float64
    want = reference.na(q, k, v, (3, 4), (2, 2), compute_dtype=torch.float64)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


def test_public_names():
    for name in ("na1d", "na2d", "na3d", "block_mask", "mask_mod", "make_params"):
        assert name in gna_flex.__all__ and hasattr(gna_flex, name)


@pytest.mark.parametrize("backend", ["flex", "reference"])
def test_gradients_match_reference(backend):
    grid, ks, st_ = (5, 6), (3, 3), (2, 3)
    q, k, v, ek, ev = _inputs(grid, extra=2, requires_grad=True)
    out = functional.na2d(q, k, v, ks, st_, additional_keys=ek, additional_values=ev, backend=backend)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, ek, ev), g)
    want = reference.na(q, k, v, ks, st_, additional_keys=ek, additional_values=ev)
    want_grads = torch.autograd.grad(want, (q, k, v, ek, ev), g)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_rank_must_match_function():
    q = torch.randn(1, 6, 7, 2, 8)
    with pytest.raises(ValueError, match="query must have 4 dims"):
        functional.na1d(q, q, q, 3)


def test_unknown_backend_and_cutlass_on_cpu_raise():
    q = torch.randn(1, 8, 2, 8)
    with pytest.raises(ValueError, match="backend must be None or one of"):
        functional.na1d(q, q, q, 3, backend="triton")
    with pytest.raises(RuntimeError, match="backend='cutlass' cannot run these inputs"):
        functional.na1d(q, q, q, 3, backend="cutlass")


def test_demo_runs_on_cpu(capsys):
    from gna_flex.__main__ import main

    assert main(["--device", "cpu"]) == 0
    assert "ok" in capsys.readouterr().out
