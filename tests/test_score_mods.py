"""gna_flex.score_mods.relative_position_bias vs a dense reference (CPU eager flex), gradients to the table."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.nn.attention.flex_attention import flex_attention

from gna_flex import flex, layout, reference, score_mods
from gna_flex.spec import make_params, unravel

from strategies import gna_configs

pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")


def dense_rpb_attention(q, k, v, table, params, extra):
    """Raster order: softmax(q k^T * scale + bias) over the reference mask, bias by key offset in group units."""
    s = params.num_tokens
    idx = torch.arange(s)
    qc, kc = unravel(idx[:, None], params.grid), unravel(idx[None, :], params.grid)
    bias_idx = [
        (kk // d - qq // d + w - 1).clamp(0, 2 * w - 2)
        for qq, kk, w, d in zip(qc, kc, params.kernel_size, params.dilation)
    ]
    bias = torch.zeros(table.shape[0], s + extra, s + extra, dtype=table.dtype)
    bias[:, :s, :s] = table[(slice(None), *bias_idx)]
    mask = reference.dense_mask(params, extra)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v


def run_case(params, tile, extra, heads=2, d=8):
    table = torch.randn(heads, *(2 * w - 1 for w in params.kernel_size), requires_grad=True)
    s = params.num_tokens
    q, k, v = (torch.randn(1, heads, s + extra, d) for _ in range(3))
    want = dense_rpb_attention(q, k, v, table, params, extra)
    if tile is not None:  # move the grid part to tile-major order
        lay = layout.make_tile_layout(params.grid, tile)

        def tm(t):
            g, _ = layout.permute(t[:, :, :s], params.grid, tile, heads_last=False, flat=True, extra=extra)
            return torch.cat([g[:, :, : lay.num_tokens], t[:, :, s:]], 2)

        q, k, v = tm(q), tm(k), tm(v)
    bm = flex.block_mask(params, None, tile=tile, extra_tokens=extra, block_size=8)
    sm = score_mods.relative_position_bias(table, params, None, tile=tile, extra_tokens=extra)
    got = flex_attention(q, k, v, score_mod=sm, block_mask=bm)
    if tile is not None:
        got = torch.cat([layout.unpermute(got[:, :, : lay.num_tokens], lay, heads_last=False, flat=True),
                         got[:, :, lay.num_tokens :]], 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(want)
    (g_got,) = torch.autograd.grad((got * grad_out).sum(), table)
    (g_want,) = torch.autograd.grad((want * grad_out).sum(), table)
    assert g_want.abs().sum() > 0
    torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-5)


@settings(max_examples=6)
@given(gna_configs(max_len=8), st.data())
def test_rpb_equals_dense_reference(cfg, data):
    params = make_params(*cfg)
    tile = data.draw(st.one_of(st.none(), st.tuples(*[st.integers(1, 4) for _ in params.grid])))
    extra = data.draw(st.sampled_from([0, 2]))
    run_case(params, tile, extra)


def test_rpb_offsets_stay_inside_the_table():
    """Every query lies in its own window, so a neighbour's offset is within +-(kernel_size - 1)."""
    for cfg in [((9,), (4,), (4,), (2,), (False,)), ((7, 6), (3, 2), (3, 1), (1, 3), (True, False))]:
        params = make_params(*cfg)
        mask = reference.dense_mask(params)
        idx = torch.arange(params.num_tokens)
        qc, kc = unravel(idx[:, None], params.grid), unravel(idx[None, :], params.grid)
        for qq, kk, w, d in zip(qc, kc, params.kernel_size, params.dilation):
            off = (kk // d - qq // d)[mask]
            assert int(off.min()) >= -(w - 1) and int(off.max()) <= w - 1


def test_rpb_bad_table():
    with pytest.raises(ValueError, match="table must have shape"):
        score_mods.relative_position_bias(torch.randn(2, 5), (8, 8), (3, 3))
    with pytest.raises(ValueError, match="kernel_size"):
        score_mods.relative_position_bias(torch.randn(2, 5, 5), (8, 8), (3, 1))
