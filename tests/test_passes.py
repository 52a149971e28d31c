"""Unit tests of gna_flex.passes: Rule, matching, decision, the rewritten op, explain tables."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import fx

from gna_flex.passes import Rule
from gna_flex.passes.decide import decide_sdpa, predict_speedup
from gna_flex.passes.explain import ExplainRow, Explanation
from gna_flex.passes.match import find_attention, normalize_module_path, normalize_sdpa_args
from gna_flex.passes.rewrite import (
    _rewritten_attention_backward_fake,
    gna_attention,
    rewritten_attention,
    rewritten_attention_backward,
)
from gna_flex.reference import dense_mask
from gna_flex.spec import make_params

# --------------------------------------------------------------------------- Rule


def test_rule_fields_and_seq_len():
    rule = Rule(grid=(3, 4, 5), kernel_size=(2, 3, 3), stride=(1, 2, 3), extra_tokens=7, module=r"blocks\.\d+\.attn")
    assert rule.params.grid == (3, 4, 5)
    assert rule.params.stride == (1, 2, 3)
    assert rule.seq_len == 60 + 7
    assert rule.matches_module("blocks.12.attn")
    assert not rule.matches_module("blocks.1.attn.inner")  # whole-path match
    assert not rule.matches_module("blocks.1.cross")
    assert Rule(grid=8, kernel_size=3).matches_module("anything")
    assert "grid=3x4x5" in rule.describe() and "extra=7@end" in rule.describe()


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(grid=(0, 4), kernel_size=2), ValueError, ["grid[0]", "axis 0"]),
        (dict(grid=(4, 4), kernel_size=(2, 5)), ValueError, ["kernel_size[1]", "axis 1"]),
        (dict(grid=(4, 4), kernel_size=1), ValueError, ["kernel_size[0]", ">= 2"]),
        (dict(grid=(4, 4), kernel_size=3, stride=4), ValueError, ["stride[0]"]),
        (dict(grid=(4, 4), kernel_size=(3, 3, 3)), ValueError, ["kernel_size", "2 axes"]),
        (dict(grid=(4, 4), kernel_size=2.5), TypeError, ["kernel_size"]),
        (dict(grid=(4, 4), kernel_size=2, extra_tokens=-1), ValueError, ["extra_tokens"]),
        (dict(grid=(4, 4), kernel_size=2, extra_tokens=1.0), TypeError, ["extra_tokens"]),
        (dict(grid=(4, 4), kernel_size=2, extra_position="middle"), ValueError, ["extra_position"]),
        (dict(grid=(4, 4), kernel_size=2, module="blocks.(["), ValueError, ["module"]),
        (dict(grid=(4, 4), kernel_size=2, module=3), TypeError, ["module"]),
        (dict(grid=(4, 4), kernel_size=2, min_speedup=-1.0), ValueError, ["min_speedup"]),
        (dict(grid=(4, 4), kernel_size=2, min_speedup="fast"), TypeError, ["min_speedup"]),
        (dict(grid=(4, 4), kernel_size=2, backend="cuda"), ValueError, ["backend"]),
    ],
)
def test_rule_rejects_bad_fields(kwargs, exc, words):
    with pytest.raises(exc) as info:
        Rule(**kwargs)
    for w in words:
        assert w in str(info.value)


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    "raw, path",
    [
        ("L['self'].blocks.0.attn", "blocks.0.attn"),
        ("L['self'].blocks[0].attn", "blocks.0.attn"),
        ("L['self']._modules['blocks']._modules['3']._modules['attn']", "blocks.3.attn"),
        ("L['s'].attn", "attn"),
        ("L['self']", ""),
        ("L['self'].__dict__['_modules']['transformer_blocks'][0].attn", "transformer_blocks.0.attn"),
    ],
)
def test_normalize_module_path(raw, path):
    assert normalize_module_path(raw) == path


def _dynamo_graph(fn, *args):
    """The Dynamo FX graph(s) of fn(*args) and their example inputs."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True)(*args)
    assert len(graphs) == 1
    return graphs[0]


def _qkv(b=2, h=2, s=24, d=8, hk=None):
    hk = h if hk is None else hk
    return torch.randn(b, h, s, d), torch.randn(b, hk, s, d), torch.randn(b, hk, s, d)


def test_find_attention_normalises_args_and_kwargs():
    def fn(q, k, v):
        a = F.scaled_dot_product_attention(q, k, v)
        b = F.scaled_dot_product_attention(q, k, v, None, 0.0, False, scale=0.5)
        c = F.scaled_dot_product_attention(query=q, key=k, value=v, is_causal=True)
        return a + b + c

    gm, inputs = _dynamo_graph(fn, *_qkv())
    calls = find_attention(gm, inputs)
    assert [c.kind for c in calls] == ["sdpa"] * 3
    assert all(c.query_shape == (2, 2, 24, 8) for c in calls)
    assert [c.args["scale"] for c in calls] == [None, 0.5, None]
    assert [c.args["is_causal"] for c in calls] == [False, False, True]
    assert all(c.args["attn_mask"] is None for c in calls)
    assert all(c.dtype == torch.float32 for c in calls)


def test_find_attention_in_hand_built_graph():
    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, enable_gqa=True)

    gm = fx.symbolic_trace(M())
    calls = find_attention(gm)
    assert len(calls) == 1 and calls[0].node.target is F.scaled_dot_product_attention
    assert normalize_sdpa_args(calls[0].node)["enable_gqa"] is True
    # No shapes were recorded by symbolic tracing: never rewritten.
    d = decide_sdpa(calls[0], [Rule(grid=(4, 6), kernel_size=3, min_speedup=0)])
    assert not d.rewrite and "4-D" in d.reason


def _decide(fn, rules, *args):
    gm, inputs = _dynamo_graph(fn, *args)
    calls = find_attention(gm, inputs)
    assert len(calls) == 1
    return decide_sdpa(calls[0], rules)


RULE = Rule(grid=(4, 6), kernel_size=3, min_speedup=0, backend="reference")


@pytest.mark.parametrize(
    "fn, words",
    [
        (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(24, 24, dtype=torch.bool)),
         "attn_mask"),
        (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), "is_causal"),
        (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1), "dropout_p"),
        (lambda q, k, v: F.scaled_dot_product_attention(q, k[:, :, :10], v[:, :, :10]), "cross-attention"),
        (lambda q, k, v: F.scaled_dot_product_attention(q[:, :, :20], k[:, :, :20], v[:, :, :20]), "length 20"),
    ],
)
def test_decide_reasons(fn, words):
    d = _decide(fn, [RULE], *_qkv())
    assert not d.rewrite
    assert words in d.reason


def test_decide_rewrites_matching_call_and_reports_speedup():
    d = _decide(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), [RULE], *_qkv())
    assert d.rewrite and d.rule is RULE and d.rule_index == 0
    assert d.speedup is not None and d.speedup > 0 and d.path == "flex"


def test_decide_first_matching_rule_wins_and_module_filter():
    wrong_len = Rule(grid=(5, 6), kernel_size=3, min_speedup=0)
    other_module = Rule(grid=(4, 6), kernel_size=3, min_speedup=0, module="nothing")
    d = _decide(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), [wrong_len, other_module, RULE], *_qkv())
    assert d.rewrite and d.rule_index == 2
    d = _decide(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), [wrong_len, other_module], *_qkv())
    assert not d.rewrite
    assert "rule 0: length 24" in d.reason and "rule 1: module" in d.reason


def test_decide_min_speedup_blocks_rewrite():
    slow = Rule(grid=(4, 6), kernel_size=3, min_speedup=1e6)
    d = _decide(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), [slow], *_qkv())
    assert not d.rewrite and "min_speedup" in d.reason and d.speedup is not None


def test_decide_gqa_needs_enable_gqa():
    q, k, v = _qkv(h=4, hk=2)
    d = _decide(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), [RULE], q, k, v)
    assert d.rewrite


@pytest.mark.parametrize("path", ["kernel", "flex"])
def test_predicted_speedup_with_dilation_and_causal(path):
    rule = Rule(grid=(16, 40), kernel_size=(4, 7), stride=(2, 3), dilation=(2, 3), is_causal=(True, False),
                extra_tokens=5)
    speedup = predict_speedup(rule, 4, 64, 2, torch.float16, None, path)
    assert math.isfinite(speedup) and speedup > 0


def test_predicted_speedup_grows_with_sparsity():
    big = (30, 48, 80)
    dense_like = Rule(grid=big, kernel_size=(30, 48, 80), min_speedup=0)
    sparse = Rule(grid=big, kernel_size=(18, 24, 24), stride=(16, 8, 8), extra_tokens=256, min_speedup=0)
    args = (24, 128, 1, torch.bfloat16, torch.device("cuda"), "kernel")
    assert predict_speedup(sparse, *args) > 2 * predict_speedup(dense_like, *args)


# --------------------------------------------------------------------------- the rewritten computation


def _expected(q, k, v, params, extra, extra_first, scale=None, gqa=False):
    """Dense attention under the reference GNA mask, fp64."""
    mask = dense_mask(params, extra)
    if extra_first and extra:
        n = params.num_tokens
        order = torch.cat([torch.arange(n, n + extra), torch.arange(n)])
        mask = mask[order][:, order]
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=scale,
                                          enable_gqa=gqa)


@pytest.mark.parametrize("extra_first", [False, True])
@pytest.mark.parametrize(
    "grid, ks, st, di, extra",
    [((5, 7), (3, 4), (1, 2), (1, 1), 3), ((3, 4, 5), (2, 3, 2), (2, 1, 2), (1, 1, 2), 0), ((20,), 6, 3, 2, 5)],
)
def test_gna_attention_matches_reference(grid, ks, st, di, extra, extra_first):
    params = make_params(grid, ks, st, di)
    s = params.num_tokens + extra
    q, k, v = _qkv(b=2, h=3, s=s, d=8)
    out = gna_attention(q, k, v, params.grid, params.kernel_size, params.stride, params.dilation, params.is_causal,
                        extra, extra_first, None, False, "reference")
    assert out.shape == (2, 3, s, 8) and out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, _expected(q, k, v, params, extra, extra_first).float(), atol=1e-5, rtol=1e-5)


def test_gna_attention_gqa_scale_and_grid_queries_only():
    params = make_params((4, 6), 3, 2)
    n, e = params.num_tokens, 4
    q, k, v = _qkv(b=1, h=4, hk=2, s=n + e, d=8)
    args = (params.grid, params.kernel_size, params.stride, params.dilation, params.is_causal, e, False, 0.3, True,
            "reference")
    out = gna_attention(q, k, v, *args)
    expected = _expected(q, k, v, params, e, False, scale=0.3, gqa=True).float()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # flex-style call: grid queries only, keys padded past grid + extra (ignored).
    pad = torch.randn(1, 2, 5, 8)
    out = gna_attention(q[:, :, :n], torch.cat([k, pad], 2), torch.cat([v, pad], 2), *args)
    torch.testing.assert_close(out, expected[:, :, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid, tile", [((4, 6), (2, 3)), ((5, 7), (2, 4)), ((3, 4, 5), (2, 2, 2))])
@pytest.mark.parametrize("extra, q_extra", [(0, False), (3, True), (3, False)])
def test_gna_attention_tile_major_matches_flex(grid, tile, extra, q_extra):
    # Sequences in the tile-major order of a gna_flex block mask (padding included): compare with
    # flex_attention under that very mask.
    from torch.nn.attention.flex_attention import flex_attention

    from gna_flex import flex

    params = make_params(grid, 2, 1)
    p = flex.mask_spec(params, None, tile=tile, extra_tokens=extra).grid_tokens
    q_len, kv_len = (p + extra if q_extra else p), p + extra + 2
    bm = flex.block_mask(params, None, tile=tile, extra_tokens=extra, q_len=q_len, kv_len=kv_len)
    q = torch.randn(2, 2, q_len, 8)
    k, v = torch.randn(2, 2, kv_len, 8), torch.randn(2, 2, kv_len, 8)
    with torch.no_grad():
        expected = flex_attention(q, k, v, block_mask=bm)
    out = gna_attention(q, k, v, params.grid, params.kernel_size, params.stride, params.dilation, params.is_causal,
                        extra, False, None, False, "reference", list(tile))
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_rewritten_attention_op_registration():
    params = make_params((3, 5), (2, 3))
    q, k, v = (t.requires_grad_() for t in _qkv(b=1, h=2, s=params.num_tokens + 2, d=8))
    args = (q, k, v, list(params.grid), list(params.kernel_size), list(params.stride), list(params.dilation),
            list(params.is_causal), 2, False, None, False, "reference")
    torch.library.opcheck(rewritten_attention, args)
    out = rewritten_attention(*args)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _expected(qd, kd, vd, params, 2, False)
    ref_grads = torch.autograd.grad(ref.square().sum(), (qd, kd, vd))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r.float(), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- explain tables


def test_explanation_prints_a_table():
    rows = Explanation([
        ExplainRow(0, "blocks.0.attn", "SelfAttention", "sdpa", "q 1x2x3x4", "float32", "0: grid=4x6 kernel=3",
                   2.5, "flex", True, "predicted speedup 2.50x >= min_speedup 1.1"),
        ExplainRow(0, "", "M", "sdpa", "q 1x2x3x4", "float32", "", None, "", False, "no rules given"),
    ])
    text = str(rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["graph", "module", "kind"]
    assert "blocks.0.attn" in lines[2] and "2.50x" in lines[2] and "yes" in lines[2]
    assert "<root>" in lines[3] and "no rules given" in lines[3]
    assert lines[-1] == "1 of 2 attention calls rewritten to GNA"
    assert rows.num_rewritten == 1
    assert math.isclose(rows[0].asdict()["predicted_speedup"], 2.5)
    assert "no attention calls" in str(Explanation())


# --------------------------------------------------------------------------- folding tile-major permutation chains


def _flex_fn(prep, post, bm, gqa=False):
    """flex_attention under ``bm`` on ``prep``-ed q, k, v, its output through ``post``."""
    from torch.nn.attention.flex_attention import flex_attention

    def fn(q, k, v):
        out = flex_attention(prep(q), prep(k), prep(v), block_mask=bm, enable_gqa=gqa)
        return post(out)

    return fn


def _fold_case(fn, *args):
    """Run the gna pass on fn's Dynamo graph: (rows, nodes before, graph after, outputs, expected outputs)."""
    from gna_flex.passes import gna_pass

    gm, example_inputs = _dynamo_graph(fn, *args)
    before = {n.name: n for n in gm.graph.nodes}
    rows = gna_pass(gm, example_inputs, [])
    with torch.no_grad():
        out = gm(*example_inputs)
        expected = fn(*args)
    as_tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x,)  # noqa: E731
    return rows, before, gm, as_tuple(out), as_tuple(expected)


def _assert_same(outs, expecteds):
    assert len(outs) == len(expecteds)
    for out, expected in zip(outs, expecteds):
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def _moves(nodes):
    """Names of the data-movement nodes (reshape/permute/pad/slice family) among ``nodes``."""
    import operator

    from gna_flex.passes.fold import _kind

    return {n.name for n in nodes
            if _kind(n) is not None and not (n.target is operator.getitem and isinstance(n.args[1], int))}


def _assert_folded(rows, before, gm, out, expected, max_new_moves):
    assert len(rows) == 1 and rows[0].rewritten and rows[0].permutation_folded is True, rows[0].reason
    assert "permutation folded" in rows[0].reason
    targets = _targets(gm)
    assert targets.count(torch.ops.gna_flex.rewritten_attention.default) == 1
    assert torch.ops.higher_order.flex_attention not in targets
    # Every permute / reshape / pad / slice of the caller's chains is gone; what is left are the
    # few views that feed the op the native tensors and shape its output.
    old_moves = _moves(before.values())
    after = {n.name for n in gm.graph.nodes}
    assert old_moves and not (old_moves & after)
    assert not any(t in (torch._C._nn.pad, F.pad) for t in targets)
    assert len(_moves(gm.graph.nodes)) <= max_new_moves
    _assert_same(out, expected)


def _assert_not_folded(rows, out, expected, words):
    assert len(rows) == 1 and rows[0].rewritten and rows[0].permutation_folded is False
    assert "reordered by copies" in rows[0].reason and "not folded" in rows[0].reason
    for w in words:
        assert w in rows[0].reason, rows[0].reason
    _assert_same(out, expected)


@pytest.mark.parametrize("grid, tile", [((4, 6), (2, 3)), ((4, 6, 8), (2, 3, 4)), ((12,), (4,))])
def test_fold_layout_permute_heads_first(grid, tile):
    from gna_flex import flex, layout

    bm = flex.block_mask(grid, 2 if len(grid) > 1 else 3, 1, tile=tile)
    lay = layout.make_tile_layout(grid, tile)
    fn = _flex_fn(lambda x: layout.permute(x, grid, tile, heads_last=False)[0],
                  lambda o: layout.unpermute(o, lay, heads_last=False), bm)
    q, k, v = (torch.randn(2, 3, *grid, 8) for _ in range(3))
    _assert_folded(*_fold_case(fn, q, k, v), max_new_moves=4)


@pytest.mark.parametrize("flat", [False, True])
def test_fold_layout_permute_heads_last_and_flat(flat):
    # [B, *grid, heads, D] (or [B, N, heads, D]) -> layout.permute -> transpose(1, 2) for flex;
    # the output goes back through transpose(1, 2) and layout.unpermute.
    from gna_flex import flex, layout

    grid, tile = (4, 6, 8), (2, 3, 4)
    bm = flex.block_mask(grid, (2, 3, 4), (1, 2, 2), tile=tile)
    lay = layout.make_tile_layout(grid, tile)
    fn = _flex_fn(lambda x: layout.permute(x, grid, tile, heads_last=True)[0].transpose(1, 2),
                  lambda o: layout.unpermute(o.transpose(1, 2), lay, heads_last=True, flat=flat), bm)
    shape = (2, 192, 3, 8) if flat else (2, *grid, 3, 8)
    q, k, v = (torch.randn(*shape) for _ in range(3))
    _assert_folded(*_fold_case(fn, q, k, v), max_new_moves=8)


def test_fold_own_pad_chain_on_padded_grid_with_gqa():
    # The user's own chain: F.pad of the grid axes to whole tiles -> view -> permute -> reshape,
    # and back: reshape -> permute -> reshape -> slice off the padding -> [B, N, heads * D].
    from gna_flex import flex

    grid, tile = (5, 7), (2, 4)
    bm = flex.block_mask(grid, (3, 3), (1, 2), tile=tile)

    def prep(x):  # [B, H, 5, 7, D]
        b, h, _, _, d = x.shape
        x = F.pad(x, (0, 0, 0, 1, 0, 1))
        return x.view(b, h, 3, 2, 2, 4, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, h, -1, d)

    def post(o):  # [B, H, 48, D]
        b, h, _, d = o.shape
        o = o.reshape(b, h, 3, 2, 2, 4, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, h, 6, 8, d)
        return o[:, :, :5, :7].flatten(2, 3).transpose(1, 2).reshape(b, 35, h * d)

    q = torch.randn(2, 4, *grid, 8)
    k, v = torch.randn(2, 2, *grid, 8), torch.randn(2, 2, *grid, 8)
    _assert_folded(*_fold_case(_flex_fn(prep, post, bm, gqa=True), q, k, v), max_new_moves=6)


def test_fold_one_chain_shared_by_query_key_and_value():
    from torch.nn.attention.flex_attention import flex_attention

    from gna_flex import flex, layout

    grid, tile = (6, 8), (3, 4)
    bm = flex.block_mask(grid, (3, 5), (1, 2), tile=tile)
    lay = layout.make_tile_layout(grid, tile)

    def fn(x):  # x: [B, *grid, heads, D]
        t = layout.permute(x * 0.5, grid, tile)[0].transpose(1, 2)
        return layout.unpermute(flex_attention(t, t, t, block_mask=bm).transpose(1, 2), lay)

    _assert_folded(*_fold_case(fn, torch.randn(2, *grid, 2, 8)), max_new_moves=4)


def _own_chains(grid, tile):
    """A user's hand-written tile-major chain for [B, H, *grid, D]: zero pad, split, permute, merge; and back."""
    from gna_flex import layout

    lay = layout.make_tile_layout(grid, tile)
    n = len(grid)

    def prep(x):
        b, h, d = x.shape[0], x.shape[1], x.shape[-1]
        pads = [p for a in reversed(range(n)) for p in (0, lay.padded_grid[a] - grid[a])]
        if any(pads):
            x = F.pad(x, [0, 0] + pads)
        x = x.reshape(b, h, *[v for a in range(n) for v in (lay.tiles[a], lay.tile[a])], d)
        order = [0, 1] + [2 + 2 * a for a in range(n)] + [3 + 2 * a for a in range(n)] + [2 + 2 * n]
        return x.permute(order).reshape(b, h, lay.num_tokens, d)

    def post(o):
        b, h, _, d = o.shape
        o = o.reshape(b, h, *lay.tiles, *lay.tile, d)
        order = [0, 1] + [k for a in range(n) for k in (2 + a, 2 + n + a)] + [2 + 2 * n]
        o = o.permute(order).reshape(b, h, *lay.padded_grid, d)
        return o[(slice(None), slice(None)) + tuple(slice(0, g) for g in grid)]

    return prep, post


@pytest.mark.parametrize(
    "grid, kernel, stride, dilation, causal, tile",
    [
        ((9,), 4, 3, 2, True, (4,)),
        ((7, 5), (3, 2), (2, 2), (2, 1), (False, True), (3, 4)),
        ((5, 8), (5, 4), (5, 1), 1, False, (7, 2)),  # a tile longer than its axis
        ((3, 7, 6), (2, 3, 3), (1, 3, 2), (1, 2, 1), (True, False, False), (2, 4, 4)),
        ((4, 6, 5), (3, 4, 2), (3, 1, 2), (1, 1, 2), False, (1, 2, 5)),
    ],
)
def test_fold_own_chains_sweep(grid, kernel, stride, dilation, causal, tile):
    from gna_flex import flex

    bm = flex.block_mask(grid, kernel, stride, dilation, causal, tile=tile)
    prep, post = _own_chains(grid, tile)
    q, k, v = (torch.randn(2, 2, *grid, 8) for _ in range(3))
    _assert_folded(*_fold_case(_flex_fn(prep, post, bm), q, k, v), max_new_moves=4)


def test_fold_heads_last_source_with_one_permute():
    # [B, *grid, heads, D] -> pad -> view into tile factors -> one permute that also moves the heads
    # -> [B, heads, S, D]; back: reshape -> permute -> reshape -> slice -> [B, *grid, heads, D].
    from gna_flex import flex

    grid, tile = (5, 6), (2, 4)
    bm = flex.block_mask(grid, (3, 4), (2, 1), tile=tile)

    def prep(x):
        x = F.pad(x, (0, 0, 0, 0, 0, 2, 0, 1))  # [2, 6, 8, 3, 8]
        return x.view(2, 3, 2, 2, 4, 3, 8).permute(0, 5, 1, 3, 2, 4, 6).reshape(2, 3, 48, 8)

    def post(o):
        o = o.reshape(2, 3, 3, 2, 2, 4, 8).permute(0, 2, 4, 3, 5, 1, 6).reshape(2, 6, 8, 3, 8)
        return o[:, :5, :6]

    q, k, v = (torch.randn(2, *grid, 3, 8) for _ in range(3))
    _assert_folded(*_fold_case(_flex_fn(prep, post, bm), q, k, v), max_new_moves=8)


def test_fold_layout_permute_on_padded_grid_is_not_folded():
    # layout.permute pads through new_zeros + copy_ regions: not a view chain.
    from gna_flex import flex, layout

    grid, tile = (5, 7), (2, 4)
    bm = flex.block_mask(grid, (3, 3), 1, tile=tile)
    lay = layout.make_tile_layout(grid, tile)
    fn = _flex_fn(lambda x: layout.permute(x, grid, tile, heads_last=False)[0],
                  lambda o: layout.unpermute(o, lay, heads_last=False), bm)
    q, k, v = (torch.randn(2, 2, *grid, 8) for _ in range(3))
    rows, _, _, out, expected = _fold_case(fn, q, k, v)
    _assert_not_folded(rows, out, expected, ["query"])


def _wrong_tile(x):
    b, h, _, _, d = x.shape  # tiles of 3x2 where the mask has 2x3
    return x.reshape(b, h, 2, 2, 3, 2, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, h, 24, d)


def _right_tile(x):
    b, h, _, _, d = x.shape
    return x.reshape(b, h, 2, 2, 2, 3, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, h, 24, d)


def _back(o):
    b, h, _, d = o.shape
    return o.reshape(b, h, 2, 2, 2, 3, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, h, 4, 6, d)


@pytest.mark.parametrize(
    "prep, post, words",
    [
        (_wrong_tile, _back, ["query", "not the tile-major order"]),
        (lambda x: _right_tile(x) * 1.0, _back, ["query", "not the tile-major order"]),
        (_right_tile, lambda o: (_back(o), o), ["output", "users"]),
        (_right_tile, lambda o: o + 1, ["output", "not brought back"]),
        (_right_tile, lambda o: o.reshape(2, 2, 2, 2, 2, 3, 8).permute(0, 1, 3, 2, 4, 5, 6).reshape(2, 2, 4, 6, 8),
         ["output"]),
    ],
)
def test_fold_leaves_other_chains_to_the_copy_path(prep, post, words):
    from gna_flex import flex

    bm = flex.block_mask((4, 6), 2, 1, tile=(2, 3))
    fn = _flex_fn(prep, post, bm)
    q, k, v = (torch.randn(2, 2, 4, 6, 8) for _ in range(3))
    rows, _, gm, out, expected = _fold_case(fn, q, k, v)
    _assert_not_folded(rows, out, expected, words)
    assert torch.ops.gna_flex.rewritten_attention.default in _targets(gm)


def test_fold_needs_a_zero_pad():
    from gna_flex import flex

    grid, tile = (5, 7), (2, 4)
    bm = flex.block_mask(grid, 3, 1, tile=tile)

    def prep(x):
        x = F.pad(x, (0, 0, 0, 1, 0, 1), value=1.0)
        return x.reshape(2, 2, 3, 2, 2, 4, 8).permute(0, 1, 2, 4, 3, 5, 6).reshape(2, 2, 48, 8)

    def post(o):
        return o.reshape(2, 2, 3, 2, 2, 4, 8).permute(0, 1, 2, 4, 3, 5, 6).reshape(2, 2, 6, 8, 8)[:, :, :5, :7]

    q, k, v = (torch.randn(2, 2, *grid, 8) for _ in range(3))
    rows, _, _, out, expected = _fold_case(_flex_fn(prep, post, bm), q, k, v)
    _assert_not_folded(rows, out, expected, ["query", "not a constant zero pad"])


def test_fold_not_tried_with_extra_tokens():
    from gna_flex import flex, layout

    grid, tile = (4, 6), (2, 3)
    bm = flex.block_mask(grid, 2, 1, tile=tile, extra_tokens=4)

    def prep(x):
        t, _ = layout.permute(x[:, :, :24].unflatten(2, grid), grid, tile, heads_last=False)
        return torch.cat([t, x[:, :, 24:]], dim=2)

    fn = _flex_fn(prep, lambda o: o, bm)
    q, k, v = (torch.randn(2, 2, 28, 8) for _ in range(3))
    rows, _, _, out, expected = _fold_case(fn, q, k, v)
    _assert_not_folded(rows, out, expected, ["extra tokens"])


# --------------------------------------------------------------------------- extra-key (text padding) masks

MASK_GRID, MASK_EXTRA = (4, 6), 5
MASK_RULE = Rule(grid=MASK_GRID, kernel_size=3, stride=(1, 2), extra_tokens=MASK_EXTRA, min_speedup=0,
                 backend="reference", extra_key_mask=True)


def _key_mask(valid_extra: list[int], n: int, e: int, extra_first: bool = False) -> torch.Tensor:
    """``[B, S]`` bool: every grid key plus the first ``valid_extra[b]`` extra keys of batch element b."""
    rows = []
    for count in valid_extra:
        extra = torch.arange(e) < count
        grid = torch.ones(n, dtype=torch.bool)
        rows.append(torch.cat([extra, grid] if extra_first else [grid, extra]))
    return torch.stack(rows)


def _expected_masked(q, k, v, params, extra, extra_first, keys):
    """Dense fp64 attention under the GNA mask AND the ``[B, S]`` key-padding mask."""
    mask = dense_mask(params, extra)
    if extra_first and extra:
        n = params.num_tokens
        order = torch.cat([torch.arange(n, n + extra), torch.arange(n)])
        mask = mask[order][:, order]
    full = mask[None, None] & keys[:, None, None, :]
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=full)


def test_rule_extra_key_mask_field():
    assert not Rule(grid=8, kernel_size=3).extra_key_mask
    assert "extra_key_mask" in MASK_RULE.describe()
    with pytest.raises(TypeError, match="extra_key_mask"):
        Rule(grid=8, kernel_size=3, extra_key_mask=1)


@pytest.mark.parametrize("extra_first", [False, True])
@pytest.mark.parametrize("form", ["bool_b11s", "bool_b1ss", "float_b11s", "float_min_b1ss", "bool_11s"])
def test_gna_attention_with_extra_key_mask_matches_reference(form, extra_first):
    params = make_params(MASK_GRID, 3, (1, 2))
    n, e = params.num_tokens, MASK_EXTRA
    b = 3
    valid = [2, 5, 0] if form != "bool_11s" else [3]
    keys = _key_mask(valid, n, e, extra_first)
    q, k, v = _qkv(b=b, h=2, s=n + e, d=8)
    m = keys[:, None, None, :]
    if form.endswith("b1ss"):
        m = m.expand(-1, 1, n + e, -1)
    if form.startswith("float"):
        low = torch.finfo(torch.float32).min if "min" in form else -math.inf
        m = torch.zeros(m.shape).masked_fill(~m, low)
    out = gna_attention(q, k, v, params.grid, params.kernel_size, params.stride, params.dilation, params.is_causal,
                        e, extra_first, None, False, "reference", None, m)
    expected = _expected_masked(q, k, v, params, e, extra_first, keys.expand(b, -1)).float()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make, words", [
    (lambda keys: keys.clone().index_fill_(1, torch.tensor([3]), False),
     "grid (visual) keys of batch element(s) [0, 1]"),
    (lambda keys: keys[:, None, None, :].expand(-1, 1, 29, -1).clone().index_fill_(2, torch.tensor([0]), False),
     "differs between query rows"),
    (lambda keys: torch.zeros(keys.shape).masked_fill(~keys, -1e4), "-inf"),
    (lambda keys: torch.zeros(keys.shape).masked_fill(~keys, -math.inf).index_fill_(1, torch.tensor([25]), 0.5),
     "reweight"),
    (lambda keys: keys[:, None, None, :].expand(-1, 2, -1, -1).clone().index_fill_(1, torch.tensor([1]), False),
     "differs between heads"),
])
def test_gna_attention_refuses_other_masks(make, words):
    params = make_params(MASK_GRID, 3, (1, 2))
    n, e = params.num_tokens, MASK_EXTRA
    keys = _key_mask([2, 4], n, e)
    q, k, v = _qkv(b=2, h=2, s=n + e, d=8)
    mask = make(keys)
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    with pytest.raises(RuntimeError, match=re.escape(words)):
        gna_attention(q, k, v, params.grid, params.kernel_size, params.stride, params.dilation, params.is_causal, e,
                      False, None, False, "reference", None, mask)


def _masked_sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_decide_accepts_a_mask_only_with_extra_key_mask():
    n = math.prod(MASK_GRID)
    q, k, v = _qkv(b=2, s=n + MASK_EXTRA)
    mask = _key_mask([2, 5], n, MASK_EXTRA)[:, None, None, :]
    plain = Rule(grid=MASK_GRID, kernel_size=3, extra_tokens=MASK_EXTRA, min_speedup=0)
    d = _decide(_masked_sdpa, [plain], q, k, v, mask)
    assert not d.rewrite and "attn_mask" in d.reason and "extra_key_mask" in d.reason
    d = _decide(_masked_sdpa, [plain, MASK_RULE], q, k, v, mask)
    assert d.rewrite and d.rule is MASK_RULE and "key-padding" in d.reason


def test_compiled_extra_key_mask_explain_rows_and_run_time_errors():
    from gna_flex.passes import explain

    n, e = math.prod(MASK_GRID), MASK_EXTRA
    q, k, v = _qkv(b=3, s=n + e)
    keys = _key_mask([1, 5, 3], n, e)
    torch._dynamo.reset()
    compiled = torch.compile(_masked_sdpa, backend="gna", options={"rules": [MASK_RULE], "inner": "eager"})
    out = compiled(q, k, v, keys[:, None, None, :])
    (row,) = explain(compiled)
    assert row.rewritten and "extra_key_mask" in row.rule and "key-padding mask over the extra tokens" in row.reason
    p = MASK_RULE.params
    torch.testing.assert_close(out, _expected_masked(q, k, v, p, e, False, keys).float(), atol=1e-5, rtol=1e-5)
    # same graph, a mask that hides a grid key: a clear run-time error, never a different result
    bad = keys.clone()
    bad[2, 7] = False
    with pytest.raises(RuntimeError, match=r"masks grid \(visual\) keys of batch element\(s\) \[2\]"):
        compiled(q, k, v, bad[:, None, None, :])
    torch._dynamo.reset()


def test_rewritten_attention_op_with_mask_registration_and_gradients():
    params = make_params((3, 5), (2, 3))
    n, e = params.num_tokens, 3
    keys = _key_mask([1, 3], n, e)
    q, k, v = (t.requires_grad_() for t in _qkv(b=2, h=2, s=n + e, d=8))
    mask = keys[:, None, None, :]
    args = (q, k, v, list(params.grid), list(params.kernel_size), list(params.stride), list(params.dilation),
            list(params.is_causal), e, False, None, False, "reference", None, mask)
    torch.library.opcheck(rewritten_attention, args)
    out = rewritten_attention(*args)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _expected_masked(qd, kd, vd, params, e, False, keys)
    ref_grads = torch.autograd.grad(ref.square().sum(), (qd, kd, vd))
    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_rewritten_attention_backward_matches_its_fake_layout(backend):
    # The rewrite hands the op views of tokens-major buffers ([B, S, heads, D]
    # transposed); Inductor asserts the gradients' strides against the fake's
    # empty_like(input), whatever layout the chosen path's autograd returns.
    params = make_params((4, 6), (3, 3), (1, 2))
    s = params.num_tokens + 2
    q, k, v = (torch.randn(1, s, 2, 8).transpose(1, 2) for _ in range(3))
    grad_out = torch.randn(1, s, 2, 8).transpose(1, 2)
    args = (q, k, v, list(params.grid), list(params.kernel_size), list(params.stride), list(params.dilation),
            list(params.is_causal), 2, False, None, False, backend)
    grads = rewritten_attention_backward(grad_out, *args)
    fakes = _rewritten_attention_backward_fake(grad_out, *args)
    for g, f, t in zip(grads, fakes, (q, k, v)):
        assert g.shape == f.shape and g.stride() == f.stride() == t.stride()
    contiguous = rewritten_attention_backward(grad_out.contiguous(), *(t.contiguous() for t in (q, k, v)), *args[3:])
    for g, c in zip(grads, contiguous):
        torch.testing.assert_close(g, c, atol=1e-5, rtol=1e-5)
