import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from _oracle import coords, is_neighbor
from gna_flex import reference
from gna_flex.spec import make_params
from strategies import gna_configs


def _loop_oracle(q, k, v, grid, ks, st_, di, ca, scale, ek=None, ev=None):
    """Per-query softmax over the oracle's neighbour list, in float64."""
    b, heads, d = q.shape[0], q.shape[-2], q.shape[-1]
    group = heads // k.shape[-2]
    pts = coords(grid)
    qf = q.double().reshape(b, len(pts), heads, d)
    kf = k.double().reshape(b, len(pts), k.shape[-2], d)
    vf = v.double().reshape(b, len(pts), v.shape[-2], v.shape[-1])
    out = torch.empty(b, len(pts), heads, v.shape[-1], dtype=torch.float64)
    lse = torch.empty(b, len(pts), heads, dtype=torch.float64)
    for qi, qc in enumerate(pts):
        nbrs = [ki for ki, kc in enumerate(pts) if is_neighbor(qc, kc, grid, ks, st_, di, ca)]
        keys, vals = kf[:, nbrs], vf[:, nbrs]
        if ek is not None:
            keys = torch.cat([keys, ek.double()], 1)
            vals = torch.cat([vals, ev.double()], 1)
        for h in range(heads):
            s = (keys[:, :, h // group] @ qf[:, qi, h, :, None])[..., 0] * scale
            lse[:, qi, h] = torch.logsumexp(s, -1)
            out[:, qi, h] = (torch.softmax(s, -1)[:, None] @ vals[:, :, h // group])[:, 0]
    return out.reshape(b, *grid, heads, -1), lse.reshape(b, *grid, heads)


@given(cfg=gna_configs(max_len=8), data=st.data())
def test_reference_matches_loop_oracle(cfg, data):
    grid, ks, st_, di, ca = cfg
    heads_kv = data.draw(st.sampled_from([1, 2]))
    heads = heads_kv * data.draw(st.sampled_from([1, 2]))
    extra = data.draw(st.integers(0, 3))
    b, d = 1, 8
    q = torch.randn(b, *grid, heads, d)
    k = torch.randn(b, *grid, heads_kv, d)
    v = torch.randn(b, *grid, heads_kv, 6)
    ek = torch.randn(b, extra, heads_kv, d) if extra else None
    ev = torch.randn(b, extra, heads_kv, 6) if extra else None
    out, lse = reference.na(q, k, v, ks, st_, di, ca, scale=0.3, additional_keys=ek, additional_values=ev,
                            return_lse=True, compute_dtype=torch.float64)
    want_out, want_lse = _loop_oracle(q, k, v, grid, ks, st_, di, ca, 0.3, ek, ev)
    assert out.dtype == torch.float64 and out.shape == (b, *grid, heads, 6)
    torch.testing.assert_close(out, want_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse, want_lse, rtol=1e-9, atol=1e-9)


def test_dense_mask_layout_and_extras():
    p = make_params((4, 5), (2, 3))
    m = reference.dense_mask(p, extra_tokens=2)
    assert m.shape == (22, 22) and m.dtype == torch.bool
    assert m[:, 20:].all() and m[20:, :].all()
    assert (m[:20, :20].sum(1) == 6).all()


def test_full_window_is_dense_attention():
    q, k, v = (torch.randn(2, 6, 5, 3, 8) for _ in range(3))
    out = reference.na(q, k, v, (6, 5))
    want = torch.nn.functional.scaled_dot_product_attention(
        *(t.flatten(1, 2).transpose(1, 2) for t in (q, k, v))
    ).transpose(1, 2).reshape(2, 6, 5, 3, 8)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_default_scale_and_gradients():
    q, k, v = (torch.randn(1, 7, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = reference.na(q, k, v, 3, 2, compute_dtype=torch.float64)
    manual = reference.na(q, k, v, 3, 2, scale=4 ** -0.5, compute_dtype=torch.float64)
    assert torch.equal(out, manual)
    assert torch.autograd.gradcheck(lambda a, b, c: reference.na(a, b, c, 3, 2, compute_dtype=torch.float64),
                                    (q, k, v))


def test_rejects_other_compute_dtypes():
    q = torch.randn(1, 6, 1, 4)
    with pytest.raises(ValueError, match="compute_dtype"):
        reference.na(q, q, q, 3, compute_dtype=torch.float16)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_agrees_with_natten(ndim):
    natten = pytest.importorskip("natten.functional")
    torch.manual_seed(ndim)
    grid = (9, 7, 6)[:ndim]
    ks, st_, di, ca = (3, 4, 2)[:ndim], (2, 3, 1)[:ndim], (2, 1, 3)[:ndim], (True, False, True)[:ndim]
    q = torch.randn(2, *grid, 4, 16)
    k, v = torch.randn(2, *grid, 2, 16), torch.randn(2, *grid, 2, 16)
    ek, ev = torch.randn(2, 5, 2, 16), torch.randn(2, 5, 2, 16)
    fn = getattr(natten, f"na{ndim}d")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = fn(q, k, v, kernel_size=ks, stride=st_, dilation=di, is_causal=ca, additional_keys=ek,
                  additional_values=ev, backend="flex-fna")
    got = reference.na(q, k, v, ks, st_, di, ca, additional_keys=ek, additional_values=ev)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
