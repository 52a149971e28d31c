"""gna_flex.integrations.diffusers on tiny FLUX, HunyuanVideo, Cosmos and Wan models (CPU, random weights)."""

from __future__ import annotations

import importlib
import math
import re
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    CosmosTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    WanTransformer3DModel,
)

from gna_flex.integrations import diffusers as gna  # noqa: E402
from gna_flex.reference import dense_mask  # noqa: E402
from gna_flex.spec import make_params  # noqa: E402

# Video latents: 3 frames of 8x12 -> token grid 3x4x6 (patch 1x2x2). FLUX: 4x6 packed tokens.
FRAMES, LAT_H, LAT_W = 3, 8, 12
VIDEO_GRID = (3, 4, 6)
FLUX_GRID = (4, 6)
TEXT = 5


def _flux() -> torch.nn.Module:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
    )


def _hunyuan() -> torch.nn.Module:
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
    )


def _wan() -> torch.nn.Module:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    )


def _cosmos() -> torch.nn.Module:
    return CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=1, mlp_ratio=2.0,
        text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2),
        concat_padding_mask=False, extra_pos_embed_type="learnable",
    )


def _flux_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(-1, 3)


def _inputs(name: str, t: float = 500.0, batch: int = 2) -> dict:
    video = torch.randn(batch, 4, FRAMES, LAT_H, LAT_W)
    ts = torch.full((batch,), t)
    if name == "flux":
        h, w = FLUX_GRID
        return dict(hidden_states=torch.randn(batch, h * w, 8), encoder_hidden_states=torch.randn(batch, TEXT, 32),
                    pooled_projections=torch.randn(batch, 16), timestep=ts / 1000, img_ids=_flux_ids(h, w),
                    txt_ids=torch.zeros(TEXT, 3))
    if name == "hunyuan":
        # batch element 0 has 3 valid text tokens, element 1 all 5: padded keys must stay masked
        mask = torch.ones(batch, TEXT, dtype=torch.long)
        mask[0, 3:] = 0
        return dict(hidden_states=video, timestep=ts, encoder_hidden_states=torch.randn(batch, TEXT, 16),
                    encoder_attention_mask=mask, pooled_projections=torch.randn(batch, 8),
                    guidance=torch.full((batch,), 3000.0))
    if name == "wan":
        return dict(hidden_states=video, timestep=ts, encoder_hidden_states=torch.randn(batch, 7, 16))
    return dict(hidden_states=video, timestep=ts, encoder_hidden_states=torch.randn(batch, 7, 16),
                fps=24, padding_mask=None)


MODELS = {"flux": _flux, "hunyuan": _hunyuan, "wan": _wan, "cosmos": _cosmos}
GRIDS = {"flux": FLUX_GRID, "hunyuan": VIDEO_GRID, "wan": VIDEO_GRID, "cosmos": VIDEO_GRID}
# (kernel_size, stride, dilation): strided, blocked, dilated and plain windows across the models
SMALL = {
    "flux": ((3, 3), (1, 2), 1),
    "hunyuan": ((2, 3, 3), (1, 2, 1), 1),
    "wan": ((3, 2, 4), 1, (1, 2, 1)),
    "cosmos": ((2, 2, 3), (2, 2, 3), 1),
}
MODULES = {
    "flux": "diffusers.models.transformers.transformer_flux",
    "hunyuan": "diffusers.models.transformers.transformer_hunyuan_video",
    "wan": "diffusers.models.transformers.transformer_wan",
    "cosmos": "diffusers.models.transformers.transformer_cosmos",
}
TEXT_FIRST = {"flux": True, "hunyuan": False, "wan": None, "cosmos": None}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().eval()


def _run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("backend", ["reference", None])
def test_full_window_equals_unmodified_model(name, backend):
    model, inputs = _model(name), _inputs(name)
    dense = _run(model, inputs)
    gna.enable(model, kernel_size=GRIDS[name], backend=backend)
    out = _run(model, inputs)
    gna.disable(model)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


def _reference_dispatch(name: str, original, kernel_size, stride, dilation):
    """Hand-written GNA model: dense SDPA under the full sequence mask built from gna_flex.reference.dense_mask."""
    grid = GRIDS[name]
    n = math.prod(grid)
    params = make_params(grid, kernel_size, stride, dilation)

    def dispatch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        s = query.shape[1]
        if key.shape[1] != s:  # cross-attention: unchanged
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kwargs)
        e = s - n
        mask = dense_mask(params, e)  # grid tokens first, then the e text tokens
        if TEXT_FIRST[name]:
            order = torch.cat([torch.arange(n, s), torch.arange(n)])  # model position -> mask index
            mask = mask[order][:, order]
        mask = mask[None, None]
        if attn_mask is not None:
            mask = mask & attn_mask
        q, k, v = (x.transpose(1, 2).double() for x in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).to(query.dtype)

    return dispatch


@pytest.mark.parametrize("name", list(MODELS))
def test_small_window_equals_reference_model(name, monkeypatch):
    kernel_size, stride, dilation = SMALL[name]
    model, inputs = _model(name), _inputs(name)
    dense = _run(model, inputs)
    gna.enable(model, kernel_size=kernel_size, stride=stride, dilation=dilation)
    out = _run(model, inputs)
    gna.disable(model)
    module = importlib.import_module(MODULES[name])
    monkeypatch.setattr(module, "dispatch_attention_fn",
                        _reference_dispatch(name, module.dispatch_attention_fn, kernel_size, stride, dilation))
    expected = _run(model, inputs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - dense).abs().max() > 1e-3  # the window really changed the result


def test_hunyuan_masked_text_keys_stay_masked():
    model, inputs = _model("hunyuan"), _inputs("hunyuan")
    gna.enable(model, kernel_size=(2, 3, 3))
    out = _run(model, inputs)
    # changing what the padded text positions hold must not change the visual output
    inputs["encoder_hidden_states"][0, 3:] = torch.randn(2, 16) * 10
    again = _run(model, inputs)
    gna.disable(model)
    torch.testing.assert_close(again[0], out[0], atol=1e-5, rtol=1e-5)


def _hunyuan_processor():
    model = _model("hunyuan")
    handle = gna.enable(model, kernel_size=(2, 3, 3), backend="reference")
    processor = model.transformer_blocks[0].attn.processor
    handle.states[0].grid = VIDEO_GRID  # as the forward pre-hook sets it
    return model, processor


def test_processor_reads_bool_and_additive_key_padding_masks_alike():
    model, processor = _hunyuan_processor()
    n = math.prod(VIDEO_GRID)
    q, k, v = (torch.randn(2, n + TEXT, 2, 16) for _ in range(3))
    keys = torch.ones(2, n + TEXT, dtype=torch.bool)
    keys[0, n + 2:] = False
    additive = torch.zeros(keys.shape).masked_fill(~keys, -math.inf)
    out_bool = processor.attend(q, k, v, attn_mask=keys[:, None, None, :])
    out_2d = processor.attend(q, k, v, attn_mask=keys)  # diffusers' [B, S] form
    out_float = processor.attend(q, k, v, attn_mask=additive[:, None, None, :].expand(-1, 1, n + TEXT, -1))
    gna.disable(model)
    torch.testing.assert_close(out_2d, out_bool)
    torch.testing.assert_close(out_float, out_bool, atol=1e-6, rtol=1e-6)
    # the padded text keys of element 0 play no part in its output
    k2, v2 = k.clone(), v.clone()
    k2[0, n + 2:], v2[0, n + 2:] = torch.randn(3, 2, 16) * 10, torch.randn(3, 2, 16) * 10
    model, processor = _hunyuan_processor()
    again = processor.attend(q, k2, v2, attn_mask=keys)
    gna.disable(model)
    torch.testing.assert_close(again[0], out_bool[0])


def test_processor_refuses_a_mask_over_visual_keys():
    model, processor = _hunyuan_processor()
    n = math.prod(VIDEO_GRID)
    q, k, v = (torch.randn(2, n + TEXT, 2, 16) for _ in range(3))
    keys = torch.ones(2, n + TEXT, dtype=torch.bool)
    keys[1, 4] = False
    with pytest.raises(RuntimeError, match=r"masks grid \(visual\) keys of batch element\(s\) \[1\]"):
        processor.attend(q, k, v, attn_mask=keys)
    gna.disable(model)


@pytest.mark.parametrize("name", list(MODELS))
def test_enable_disable_round_trip(name):
    model, inputs = _model(name), _inputs(name)
    before = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    dense = _run(model, inputs)
    handle = gna.enable(model, kernel_size=SMALL[name][0])
    assert gna.is_enabled(model)
    swapped = [n for n, m in model.named_modules() if hasattr(m, "processor") and m.processor is not before[n]]
    assert swapped and all(gna.SUPPORTED[type(model).__name__].module for n in swapped)
    if name in ("wan", "cosmos"):  # cross-attention untouched
        assert all(n.endswith("attn1") for n in swapped)
    if name == "hunyuan":  # the text-only token refiner untouched
        assert not any("context_embedder" in n for n in swapped)
    with pytest.raises(ValueError, match="already enabled"):
        gna.enable(model, kernel_size=2)
    gna.disable(model)
    assert not gna.is_enabled(model) and not handle.originals
    assert all(m.processor is before[n] for n, m in model.named_modules() if hasattr(m, "processor"))
    assert not model._forward_pre_hooks
    assert torch.equal(_run(model, inputs), dense)
    with pytest.raises(ValueError, match="not enabled"):
        gna.disable(model)


# --- token grids from pixel sizes --------------------------------------------------------------------------


def test_token_layout_per_model():
    flux = gna.token_layout(_model("flux"), height=4096, width=4096)
    assert (flux.grid, flux.text_tokens, flux.text_position) == ((256, 256), 512, "start")
    hy = gna.token_layout(_model("hunyuan"), height=768, width=1280, num_frames=117)
    assert (hy.grid, hy.text_tokens, hy.text_position) == ((30, 48, 80), 256, "end")
    wan = gna.token_layout(_model("wan"), height=480, width=832, num_frames=81)
    assert (wan.grid, wan.text_tokens, wan.text_position) == ((21, 30, 52), 0, None)
    cosmos = gna.token_layout(_model("cosmos"), height=704, width=1280, num_frames=121)
    assert (cosmos.grid, cosmos.text_tokens) == ((16, 44, 80), 0)
    assert gna.token_layout(_model("hunyuan"), height=48, width=80, num_frames=1, text_tokens=7).grid == (1, 3, 5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=4100, width=4096), "height=4100 is not a multiple of 16"),
    (dict(height=4096, width=1000), "width=1000 is not a multiple of 16"),
    (dict(height=512, width=512, num_frames=5), "num_frames must be None"),
])
def test_flux_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gna.token_layout(_model("flux"), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=768, width=1280, num_frames=118), r"num_frames=118 must be 1 \+ a multiple of 4.*117"),
    (dict(height=768, width=1280), "num_frames is required"),
    (dict(height=776, width=1280, num_frames=117), "height=776"),
    (dict(height=768, width=1280, num_frames=117, text_tokens=3), "text_tokens must be None or 0"),
])
def test_wan_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gna.token_layout(_model("wan"), **kwargs)


def test_rules_for():
    Rule = pytest.importorskip("gna_flex.passes.rule").Rule
    (rule,) = gna.rules_for(_model("hunyuan"), height=768, width=1280, num_frames=117,
                            kernel_size=(18, 24, 24), stride=(16, 8, 8))
    assert isinstance(rule, Rule)
    assert rule.params.grid == (30, 48, 80) and rule.extra_tokens == 256 and rule.extra_position == "end"
    assert rule.seq_len == 30 * 48 * 80 + 256
    assert rule.matches_module("single_transformer_blocks.3.attn") and rule.matches_module("transformer_blocks.0.attn")
    assert not rule.matches_module("context_embedder.token_refiner.refiner_blocks.0.attn")
    (flux,) = gna.rules_for(_model("flux"), height=4096, width=4096, kernel_size=80, stride=16, text_tokens=77)
    assert flux.params.grid == (256, 256) and flux.extra_tokens == 77 and flux.extra_position == "start"
    pipe = SimpleNamespace(transformer=_model("cosmos"), vae_scale_factor_spatial=8, vae_scale_factor_temporal=4)
    (cosmos,) = gna.rules_for(pipe, height=64, width=96, num_frames=9, kernel_size=2)
    assert cosmos.params.grid == (3, 4, 6) and cosmos.extra_tokens == 0
    assert cosmos.matches_module("transformer_blocks.0.attn1")
    assert not cosmos.matches_module("transformer_blocks.0.attn2")
    with pytest.raises(ValueError, match="kernel_size"):
        gna.rules_for(_model("flux"), height=512, width=512, kernel_size=80)


@pytest.mark.parametrize("lat_w, match", [(13, "latent width=13 is not a multiple of 2"), (12, None)])
def test_live_grid_from_input(lat_w, match):
    model = _model("wan")
    inputs = _inputs("wan")
    inputs["hidden_states"] = torch.randn(2, 4, FRAMES, LAT_H, lat_w)
    handle = gna.enable(model, kernel_size=2)
    try:
        if match:
            with pytest.raises(ValueError, match=match):
                _run(model, inputs)
        else:
            _run(model, inputs)
            assert handle.states[0].grid == (3, 4, 6)
    finally:
        gna.disable(model)


def test_kernel_larger_than_grid_is_a_clear_error():
    model = _model("cosmos")
    gna.enable(model, kernel_size=(2, 5, 3))
    with pytest.raises(ValueError, match="kernel_size"):
        _run(model, _inputs("cosmos"))
    gna.disable(model)


def test_unsupported_model():
    with pytest.raises(TypeError, match="transformer must be one of"):
        gna.enable(torch.nn.Linear(2, 2), kernel_size=2)


# --- dense first steps ---------------------------------------------------------------------------------------


def _modes(model, handle):
    seen = []
    hook = model.register_forward_hook(lambda *a: seen.append("dense" if handle.states[0].dense else "gna"))
    return seen, hook


@pytest.mark.parametrize("dense_steps, expected", [(2, 2), (0.5, 3), (0, 0), (1.0, 5)])
def test_dense_steps_follow_the_pipeline_scheduler(dense_steps, expected):
    model = _model("wan")
    scheduler = FlowMatchEulerDiscreteScheduler()
    pipe = SimpleNamespace(transformer=model, scheduler=scheduler)
    handle = gna.enable(pipe, kernel_size=(2, 2, 3), dense_steps=dense_steps, backend="reference")
    seen, hook = _modes(model, handle)
    for _ in range(2):  # two generations: the second starts dense again
        scheduler.set_timesteps(5)
        latents = torch.randn(1, 4, FRAMES, LAT_H, LAT_W)
        for t in scheduler.timesteps:
            inputs = dict(_inputs("wan", batch=1), hidden_states=latents, timestep=t[None])
            cond = _run(model, inputs)
            _run(model, inputs)  # a second (guidance) pass in the same step
            latents = scheduler.step(cond, t, latents).prev_sample
    hook.remove()
    per_step = seen[::2]
    assert seen[::2] == seen[1::2]
    assert per_step == (["dense"] * expected + ["gna"] * (5 - expected)) * 2
    gna.disable(pipe)
    assert "step" not in scheduler.__dict__ and "set_timesteps" not in scheduler.__dict__


def test_pipeline_with_two_transformers():
    first, second = _model("wan"), _model("wan")
    pipe = SimpleNamespace(transformer=first, transformer_2=second, scheduler=FlowMatchEulerDiscreteScheduler())
    inputs = _inputs("wan")
    dense = [_run(t, inputs) for t in (first, second)]
    handle = gna.enable(pipe, kernel_size=(2, 2, 3), dense_steps=1)
    assert gna.is_enabled(first) and gna.is_enabled(second) and len(handle.states) == 2
    pipe.scheduler.set_timesteps(3)
    torch.testing.assert_close(_run(second, inputs), dense[1], atol=1e-5, rtol=1e-5)  # step 0: dense
    pipe.scheduler.step(dense[0][:1], pipe.scheduler.timesteps[0], torch.randn_like(dense[0][:1]))
    assert (_run(first, inputs) - dense[0]).abs().max() > 1e-3  # step 1: GNA in both experts
    assert (_run(second, inputs) - dense[1]).abs().max() > 1e-3
    gna.disable(pipe)
    assert not gna.is_enabled(first) and not gna.is_enabled(second)
    assert all(torch.equal(_run(t, inputs), d) for t, d in zip((first, second), dense))


def test_dense_steps_from_timesteps_of_a_bare_transformer():
    model = _model("cosmos")
    handle = gna.enable(model, kernel_size=2, dense_steps=2, backend="reference")
    seen, hook = _modes(model, handle)
    for t in [900.0, 900.0, 700.0, 500.0, 500.0, 300.0, 950.0, 800.0, 100.0]:
        _run(model, _inputs("cosmos", t=t, batch=1))
    hook.remove()
    gna.disable(model)
    assert seen == ["dense", "dense", "dense", "gna", "gna", "gna", "dense", "dense", "gna"]


def test_dense_steps_fraction_needs_the_step_count():
    model = _model("wan")
    gna.enable(model, kernel_size=2, dense_steps=0.25)
    with pytest.raises(ValueError, match="number of steps is unknown"):
        _run(model, _inputs("wan"))
    gna.disable(model)
    handle = gna.enable(model, kernel_size=2, dense_steps=0.25, num_inference_steps=8)
    assert handle.schedule.num_dense() == 2
    gna.disable(model)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises((TypeError, ValueError), match="dense_steps"):
            gna.enable(model, kernel_size=2, dense_steps=bad)
    assert not gna.is_enabled(model)


def test_switching_modes_compiles_one_graph_per_mode():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = _model("wan")
    inputs = _inputs("wan", batch=1)
    eager_dense = [_run(model, dict(inputs, timestep=torch.tensor([t]))) for t in (900.0, 700.0)]
    gna.enable(model, kernel_size=(2, 2, 3), dense_steps=2, backend="reference")
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    frames = []
    outs = []
    for t in [900.0, 800.0, 700.0, 600.0, 500.0, 950.0, 850.0, 750.0]:
        with torch.no_grad():
            outs.append(compiled(**dict(inputs, timestep=torch.tensor([t])), return_dict=False)[0])
        frames.append(counter.frame_count)
    gna.disable(model)
    torch._dynamo.reset()
    # no new graph once each mode has been seen, including the next generation's dense steps
    assert frames[1] == frames[0] and frames[4] == frames[2] and frames[7] == frames[4]
    assert frames[2] > frames[1]
    torch.testing.assert_close(outs[0], eager_dense[0], atol=1e-5, rtol=1e-5)
    assert (outs[2] - eager_dense[1]).abs().max() > 1e-3
    gna.enable(model, kernel_size=(2, 2, 3), backend="reference")
    torch.testing.assert_close(outs[2], _run(model, dict(inputs, timestep=torch.tensor([700.0]))), atol=1e-5, rtol=1e-5)
    gna.disable(model)


# --- compile path ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kernel_size, stride, dilation", [
    ("flux", (3, 3), (1, 2), 1),
    ("hunyuan", (2, 3, 3), (1, 2, 1), 1),
    ("wan", (3, 2, 4), (1, 2, 1), 1),
    ("cosmos", (2, 2, 3), (2, 2, 3), 1),
])
def test_compile_path_agrees_with_processor_path(name, kernel_size, stride, dilation):
    pytest.importorskip("gna_flex.backend", reason="the 'gna' torch.compile backend has not landed")
    model, inputs = _model(name), _inputs(name, batch=3)
    if name == "hunyuan":  # a different text padding length per batch element: 2, 5 and 4 valid text tokens
        inputs["encoder_attention_mask"] = torch.tensor([[1, 1, 0, 0, 0], [1] * 5, [1, 1, 1, 1, 0]])
    gna.enable(model, kernel_size=kernel_size, stride=stride, dilation=dilation, backend="reference")
    expected = _run(model, inputs)
    gna.disable(model)
    temporal = 8 if name == "cosmos" else 4  # VAE temporal compression of the model's pipeline
    size = dict(height=FLUX_GRID[0] * 16, width=FLUX_GRID[1] * 16) if name == "flux" else \
        dict(height=LAT_H * 8, width=LAT_W * 8, num_frames=(FRAMES - 1) * temporal + 1)
    rules = gna.rules_for(model, **size, kernel_size=kernel_size, stride=stride, dilation=dilation,
                          text_tokens=TEXT if TEXT_FIRST[name] is not None else None, min_speedup=0,
                          backend="reference")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="gna", options={"rules": rules, "inner": "eager"})
    out = _run(compiled, inputs)
    from gna_flex.passes import explain

    rows = explain(compiled)
    torch._dynamo.reset()
    visual = [r for r in rows if r.kind == "sdpa" and re.fullmatch(rules[0].module, r.module)]
    assert visual and all(r.rewritten for r in visual), str(rows)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - _run(model, inputs)).abs().max() > 1e-3  # GNA really ran: the dense model differs


# --- benchmark script ----------------------------------------------------------------------------------------


def test_bench_diffusers_dry_run(tmp_path, monkeypatch):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_diffusers.py"
    spec = importlib.util.spec_from_file_location("bench_diffusers", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_diffusers", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "diffusers-cpu.json"
    args = ["--dry-run", "--reps", "1", "--warmup", "0", "--backend", "reference", "--out", str(out)]
    assert bench.main(args + ["--models", "flux"]) == 0
    assert bench.main(args + ["--models", "hunyuan"]) == 0
    result = json.loads(out.read_text())
    assert result["card"] == "cpu-dry-run" and result["torch"] == torch.__version__ and result["commit"]
    assert set(result["models"]) == {"flux", "hunyuan"}  # the second run kept the first model's entry
    for name, row in result["models"].items():
        assert row["outputs_finite"] and row["gna_backends"] == ["reference"]
        assert row["speedup"] > 0 and 0 < row["attention_share_dense"] <= 1 and 0 < row["attention_share_gna"] <= 1
        assert row["gna_attention_ms"] > 0 and row["attention_flop_bound"] > 1
    assert "dense_nomask_ms" in result["models"]["hunyuan"]
