"""End-to-end tests of the "gna" torch.compile backend on a small DiT-like model (CPU).

Rules in these tests set ``min_speedup=0``: the simulator's CPU ("default")
constants predict no payoff for toy sizes, which is the right answer there,
and ``backend="reference"`` where gradients are needed (FlexAttention has no
CPU backward) or where the inner compiler is AOT-based and speed matters.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import flex_attention

from gna_flex import flex
from gna_flex.backend import check_options, gna_backend
from gna_flex.passes import Rule, explain

from _dit import TinyDiT, grid_of, make_inputs

VIDEO = (3, 12, 16)
PATCH = (1, 2, 2)
GRID = grid_of(VIDEO, PATCH)  # (3, 6, 8): 144 grid tokens
TEXT = 8
CONTEXT = 5
KERNEL = (2, 3, 4)
STRIDE = (1, 2, 2)
DEPTH = 2
ATOL = 1e-4  # fp32 against the fp32 reference (DESIGN.md)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _model(text_first: bool = False) -> TinyDiT:
    return TinyDiT(in_channels=4, dim=32, heads=2, depth=DEPTH, patch=PATCH, text_dim=24, text_first=text_first)


def _inputs(requires_grad: bool = False):
    return make_inputs(2, 4, VIDEO, TEXT, CONTEXT, 24, requires_grad=requires_grad)


def _rule(**kw) -> Rule:
    base = dict(grid=GRID, kernel_size=KERNEL, stride=STRIDE, extra_tokens=TEXT, module=r"blocks\.\d+\.attn",
                min_speedup=0.0, backend="reference")
    base.update(kw)
    return Rule(**base)


def _reference_output(model: TinyDiT, inputs, extra_tokens=TEXT):
    model.set_gna_reference(GRID, KERNEL, STRIDE, extra_tokens=extra_tokens)
    try:
        return model(*inputs)
    finally:
        model.clear_gna_reference()


# --------------------------------------------------------------------------- registration


def test_entry_point_registers_gna():
    from torch._dynamo.backends.registry import list_backends, lookup_backend

    assert "gna" in list_backends()
    assert lookup_backend("gna") is gna_backend
    assert lookup_backend("gna") is gna_backend  # a second lookup does not re-register


def test_compile_by_name_rewrites():
    model, inputs = _model(), _inputs()
    compiled = torch.compile(model, backend="gna", options={"rules": [_rule()], "inner": "eager"})
    out = compiled(*inputs)
    torch.testing.assert_close(out, _reference_output(model, inputs), atol=ATOL, rtol=0)
    assert explain(compiled).num_rewritten == DEPTH


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("inner", ["aot_eager", "eager"])
@pytest.mark.parametrize("text_first", [False, True])
def test_rule_rewrites_self_attention_and_matches_reference(inner, text_first):
    model, inputs = _model(text_first), _inputs()
    rule = _rule(extra_position="start" if text_first else "end")
    compiled = torch.compile(model, backend=gna_backend, options={"rules": [rule], "inner": inner})
    out = compiled(*inputs)
    torch.testing.assert_close(out, _reference_output(model, inputs), atol=ATOL, rtol=0)
    rows = explain(compiled)
    assert len(rows) == 2 * DEPTH
    assert rows.num_rewritten == DEPTH
    assert {r.module for r in rows if r.rewritten} == {f"blocks.{i}.attn" for i in range(DEPTH)}


def test_inductor_inner_and_default_backend_path():
    # backend=None: gna_flex picks its own path (flex on CPU), under Inductor.
    model, inputs = _model(), _inputs()
    compiled = torch.compile(model, backend=gna_backend, options={"rules": [_rule(backend=None)]})
    with torch.no_grad():
        out = compiled(*inputs)
        expected = _reference_output(model, inputs)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    assert explain(compiled).num_rewritten == DEPTH


def test_no_rules_leaves_model_untouched():
    model, inputs = _model(), _inputs()
    plain = torch.compile(model, backend="aot_eager")(*inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=gna_backend, options={"inner": "aot_eager"})
    out = compiled(*inputs)
    assert torch.equal(out, plain)
    rows = explain(compiled)
    assert len(rows) == 2 * DEPTH and rows.num_rewritten == 0
    assert all(r.reason == "no rules given" for r in rows)


def test_rule_with_wrong_length_rewrites_nothing():
    model, inputs = _model(), _inputs()
    plain = torch.compile(model, backend="aot_eager")(*inputs)
    torch._dynamo.reset()
    rule = _rule(extra_tokens=TEXT + 1)
    compiled = torch.compile(model, backend=gna_backend, options={"rules": [rule], "inner": "aot_eager"})
    out = compiled(*inputs)
    assert torch.equal(out, plain)
    rows = explain(compiled)
    assert rows.num_rewritten == 0
    attn = [r for r in rows if r.module.endswith(".attn")]
    assert len(attn) == DEPTH and all("length 152" in r.reason for r in attn)


def test_min_speedup_is_respected():
    model, inputs = _model(), _inputs()
    compiled = torch.compile(model, backend=gna_backend,
                             options={"rules": [_rule(min_speedup=1e6)], "inner": "aot_eager"})
    compiled(*inputs)
    rows = [r for r in explain(compiled) if r.module.endswith(".attn")]
    assert len(rows) == DEPTH
    assert all(not r.rewritten and "min_speedup" in r.reason and r.predicted_speedup > 0 for r in rows)


# --------------------------------------------------------------------------- training


def test_gradients_flow_and_match_reference():
    model, inputs = _model(), _inputs(requires_grad=True)
    compiled = torch.compile(model, backend=gna_backend, options={"rules": [_rule()], "inner": "aot_eager"})
    target = torch.randn(2, 144, 8)
    loss = (compiled(*inputs) - target).square().mean()
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    got_inputs = [t.grad.clone() for t in inputs]
    assert explain(compiled).num_rewritten == DEPTH

    model.zero_grad()
    for t in inputs:
        t.grad = None
    ref_loss = (_reference_output(model, inputs) - target).square().mean()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=0)
    for name, p in model.named_parameters():
        assert got[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], p.grad, atol=ATOL, rtol=1e-3, msg=name)
    for g, t in zip(got_inputs, inputs):
        torch.testing.assert_close(g, t.grad, atol=ATOL, rtol=1e-3)


# --------------------------------------------------------------------------- no recompiles


def test_twenty_calls_compile_once():
    model = _model()
    compiled = torch.compile(model, backend=gna_backend, options={"rules": [_rule()], "inner": "eager"})
    for _ in range(20):
        out = compiled(*_inputs())
        assert out.shape == (2, 144, 8)
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0
    assert {r.graph for r in explain(compiled)} == {0}


# --------------------------------------------------------------------------- explain


def test_explain_rows():
    model, inputs = _model(), _inputs()
    compiled = torch.compile(model, backend=gna_backend, options={"rules": [_rule()], "inner": "eager"})
    assert len(explain(compiled)) == 0  # nothing compiled yet
    compiled(*inputs)
    rows = explain(compiled)
    modules = [r.module for r in rows]
    assert modules == ["blocks.0.attn", "blocks.0.cross", "blocks.1.attn", "blocks.1.cross"]
    for r in rows:
        assert r.kind == "sdpa" and r.dtype == "float32" and r.graph == 0
        if r.module.endswith(".attn"):
            assert r.rewritten and r.module_type == "SelfAttention"
            assert r.shapes == "q 2x2x152x16, k 2x2x152x16, v 2x2x152x16"
            assert r.rule.startswith("0: grid=3x6x8 kernel=2x3x4 stride=1x2x2 extra=8@end")
            assert r.predicted_speedup > 0 and r.path == "flex"
        else:
            assert not r.rewritten and "cross-attention" in r.reason and r.rule == ""
            assert r.shapes == "q 2x2x144x16, k 2x2x5x16, v 2x2x5x16"
    text = str(rows)
    assert "blocks.0.attn" in text and "2 of 4 attention calls rewritten to GNA" in text
    # Another compiled copy of the same model keeps its own rows.
    other = torch.compile(model, backend=gna_backend, options={"inner": "eager"})
    assert len(explain(other)) == 0


def test_explain_rejects_uncompiled():
    with pytest.raises(TypeError, match="torch.compile"):
        explain(_model())


# --------------------------------------------------------------------------- flex block masks


class FlexAttention(torch.nn.Module):
    def forward(self, q, k, v, block_mask):
        return flex_attention(q, k, v, block_mask=block_mask)


@pytest.mark.parametrize("q_extra", [True, False])
def test_flex_block_mask_model_is_rewritten_without_options(q_extra):
    grid, extra = (4, 6, 8), 8
    n = 4 * 6 * 8
    q_len = n + extra if q_extra else n
    bm = flex.block_mask(grid, (2, 3, 4), (1, 2, 2), extra_tokens=extra, q_len=q_len)
    q = torch.randn(2, 2, q_len, 16)
    k, v = torch.randn(2, 2, n + extra, 16), torch.randn(2, 2, n + extra, 16)
    model = FlexAttention()
    compiled = torch.compile(model, backend="gna")
    with torch.no_grad():
        out = compiled(q, k, v, bm)
        expected = model(q, k, v, bm)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    rows = explain(compiled)
    assert len(rows) == 1 and rows[0].kind == "flex"
    assert rows[0].rewritten, rows[0].reason


def test_flex_tile_major_block_mask_is_rewritten():
    grid, tile, extra = (3, 6, 8), (2, 4, 4), 8
    bm = flex.block_mask(grid, (2, 3, 4), (1, 2, 2), tile=tile, extra_tokens=extra)
    s = flex.mask_spec(grid, (2, 3, 4), tile=tile, extra_tokens=extra).valid_tokens
    q, k, v = (torch.randn(2, 2, s, 16) for _ in range(3))
    model = FlexAttention()
    compiled = torch.compile(model, backend=gna_backend, options={"inner": "aot_eager"})
    with torch.no_grad():
        out = compiled(q, k, v, bm)
        expected = model(q, k, v, bm)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    rows = explain(compiled)
    assert len(rows) == 1 and rows[0].rewritten and "tile-major" in rows[0].reason


class TileMajorFlexBlock(torch.nn.Module):
    """Native ``[B, *grid, heads, D]`` q/k/v, permuted tile-major by the model itself around flex_attention."""

    def __init__(self, grid, tile, heads=2, head_dim=8):
        super().__init__()
        from gna_flex import layout

        self.grid, self.tile = grid, tile
        self.layout = layout.make_tile_layout(grid, tile)
        self.proj = torch.nn.Linear(heads * head_dim, 16)

    def forward(self, q, k, v, block_mask):
        from gna_flex import layout

        qt, kt, vt = (layout.permute(t, self.grid, self.tile)[0].transpose(1, 2) for t in (q, k, v))
        out = flex_attention(qt, kt, vt, block_mask=block_mask).transpose(1, 2)
        out = layout.unpermute(out, self.layout, flat=True)  # [B, N, heads, D]
        return self.proj(out.flatten(2))


@pytest.mark.parametrize("inner", ["inductor", "aot_eager"])
def test_flex_tile_major_permutation_chains_are_folded(inner, monkeypatch):
    import sys

    from gna_flex.passes.fold import _kind

    backend_module = sys.modules["gna_flex.backend"]  # the package's `backend` attribute is the function

    graphs = []

    def capturing_pass(gm, example_inputs, rules):
        rows = backend_module_pass(gm, example_inputs, rules)
        graphs.append(gm)
        return rows

    backend_module_pass = backend_module.gna_pass
    monkeypatch.setattr(backend_module, "gna_pass", capturing_pass)
    grid, tile = (4, 6, 8), (2, 3, 4)
    bm = flex.block_mask(grid, (2, 3, 4), (1, 2, 2), tile=tile)
    model = TileMajorFlexBlock(grid, tile)
    compiled = torch.compile(model, backend=gna_backend, options={"inner": inner})
    for _ in range(3):
        q, k, v = (torch.randn(2, *grid, 2, 8) for _ in range(3))
        with torch.no_grad():
            out = compiled(q, k, v, bm)
            expected = model(q, k, v, bm)
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    # (eager flex_attention compiles internally, so count the gna pass runs rather than dynamo graphs)
    assert sum(counters["recompiles"].values()) == 0
    rows = explain(compiled)
    assert len(rows) == 1 and rows[0].rewritten and rows[0].permutation_folded is True, rows[0].reason
    (gm,) = graphs
    targets = [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert targets.count(torch.ops.gna_flex.rewritten_attention.default) == 1
    assert torch.ops.higher_order.flex_attention not in targets
    # 3 inputs x (reshape, permute, reshape, transpose) and the output's transpose, reshape, permute,
    # reshape, flatten: all gone; left are one permute + flatten per input and the output's unflatten +
    # permute + reshape (views of the native tensors).
    moves = [n for n in gm.graph.nodes if _kind(n) in ("reshape", "permute")]
    assert len(moves) == 3 * 2 + 3, [n.format_node() for n in moves]


def test_flex_with_foreign_block_mask_is_untouched():
    from torch.nn.attention.flex_attention import create_block_mask

    bm = create_block_mask(lambda b, h, q, k: (q - k).abs() < 40, None, None, 192, 192, device="cpu")
    q, k, v = (torch.randn(1, 2, 192, 16) for _ in range(3))
    compiled = torch.compile(FlexAttention(), backend=gna_backend, options={"inner": "eager"})
    with torch.no_grad():
        out = compiled(q, k, v, bm)
    torch.testing.assert_close(out, FlexAttention()(q, k, v, bm), atol=ATOL, rtol=0)
    rows = explain(compiled)
    assert len(rows) == 1 and not rows[0].rewritten and "gna_flex.block_mask" in rows[0].reason


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "options, exc, words",
    [
        ({"rule": [_rule()]}, ValueError, ["unknown option", "'rule'", "known keys"]),
        ({"rules": _rule()}, TypeError, ["options['rules']", "single Rule"]),
        ({"rules": {"grid": GRID}}, TypeError, ["options['rules']", "dict"]),
        ({"rules": [_rule(), {"grid": GRID}]}, TypeError, ["options['rules'][1]", "gna_flex.Rule"]),
        ({"inner": "tvm"}, ValueError, ["options['inner']", "inductor", "'tvm'"]),
        ({"inner": 3}, TypeError, ["options['inner']", "string"]),
    ],
)
def test_bad_options_raise_at_compile_time(options, exc, words):
    with pytest.raises(exc) as direct:
        check_options(options)
    compiled = torch.compile(_model(), backend="gna", options=options)
    with pytest.raises(BackendCompilerFailed) as info:
        compiled(*_inputs())
    inner = info.value.inner_exception
    assert isinstance(inner, exc)
    for w in words:
        assert w in str(inner) and w in str(direct.value)


def test_impossible_rule_raises_naming_field():
    with pytest.raises(ValueError, match=r"kernel_size\[2\].*axis 2"):
        _rule(kernel_size=(2, 3, 9))
    with pytest.raises(ValueError, match=r"grid\[1\].*axis 1"):
        _rule(grid=(3, 0, 8))
    # A rule corrupted after construction is caught at compile time, naming the option.
    rule = _rule()
    object.__setattr__(rule, "kernel_size", (2, 3, 99))
    with pytest.raises(ValueError, match=r"options\['rules'\]\[0\].*kernel_size\[2\]"):
        check_options({"rules": [rule]})
    compiled = torch.compile(_model(), backend="gna", options={"rules": [rule], "inner": "eager"})
    with pytest.raises(BackendCompilerFailed, match=r"options\['rules'\]\[0\]"):
        compiled(*_inputs())


# --------------------------------------------------------------------------- the GPU benchmark's dry run


def test_bench_backend_dry_run(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_backend

    out = tmp_path / "backend.json"
    assert bench_backend.main(["--dry-run", "--depth", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("card", "torch", "commit", "stack_inductor_ms", "stack_gna_ms", "stack_speedup", "dense_sdpa_ms",
                "gna_attention_ms", "attention_speedup", "explain"):
        assert key in result, key
    assert result["card"] == "cpu" and result["rewritten"] == 1 and "error" not in result
    assert result["spot_check_max_abs_err"] <= 1e-4
