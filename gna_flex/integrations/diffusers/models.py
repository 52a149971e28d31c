"""Per-model facts: where the visual tokens live and how many there are.

Each supported diffusers transformer is described by a :class:`ModelSpec`:
which attention modules are visual self-attention, where the text tokens sit
in their sequence, and how pixels map to the token grid (VAE compression,
patch size, packing). Token order inside the grid is always raster
(row-major) order of ``(T, H, W)`` (video) or ``(H, W)`` (image), which is how
all four models flatten their patch embeddings.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

__all__ = ["ModelSpec", "TokenLayout", "spec_for", "token_layout", "SUPPORTED"]


@dataclass(frozen=True)
class TokenLayout:
    """The sequence of one visual self-attention call.

    Attributes:
        grid: token grid ``(H, W)`` or ``(T, H, W)``, raster order.
        text_tokens: number of text tokens in the same sequence (0 for
            visual-only self-attention).
        text_position: ``"start"`` (text first, FLUX), ``"end"`` (text last,
            HunyuanVideo) or None (no text in self-attention).
        module: regular expression matching the full module path (relative to
            the transformer) of every visual self-attention module.
        text_key_mask: the model passes its self-attention a key-padding
            ``attn_mask`` over the text tokens (padded prompts, HunyuanVideo);
            its rules set ``extra_key_mask``.
    """

    grid: tuple[int, ...]
    text_tokens: int
    text_position: Optional[str]
    module: str
    text_key_mask: bool = False

    @property
    def grid_tokens(self) -> int:
        return math.prod(self.grid)


@dataclass(frozen=True)
class ModelSpec:
    """How one transformer class lays out its tokens.

    Attributes:
        class_name: the diffusers class (matched against the MRO by name, so
            subclasses are covered).
        module: regex of the visual self-attention modules' paths.
        text_position: see :class:`TokenLayout`.
        default_text_tokens: text length the model's pipeline produces by
            default (``max_sequence_length``); 0 when text is not in the
            self-attention sequence.
        vae_spatial, vae_temporal: default VAE compression factors of the
            model's pipeline (temporal None for image models).
        patch: ``(p_t, p_h, p_w)`` from the transformer config (``p_t`` is 1
            for image models); includes FLUX's 2x2 latent packing.
        live_grid: the token grid of one forward call, from its bound
            arguments.
        text_key_mask: see :class:`TokenLayout`.
    """

    class_name: str
    module: str
    text_position: Optional[str]
    default_text_tokens: int
    vae_spatial: int
    vae_temporal: Optional[int]
    patch: Callable[[Any], tuple[int, int, int]]
    live_grid: Callable[[nn.Module, dict], tuple[int, ...]]
    text_key_mask: bool = False


def _divide(size: int, factor: int, name: str, what: str) -> int:
    if size % factor:
        raise ValueError(
            f"{name}={size} is not a multiple of {factor} ({what}); it does not give a whole token grid. "
            f"Use a multiple of {factor}, e.g. {size - size % factor} or {size - size % factor + factor}."
        )
    return size // factor


def _video_grid(transformer: nn.Module, args: dict) -> tuple[int, int, int]:
    """Grid of a ``[B, C, F, H, W]`` latent input patchified by ``(p_t, p_h, p_w)``."""
    hidden = args["hidden_states"]
    if hidden.dim() != 5:
        raise ValueError(
            f"hidden_states must be a [B, C, frames, height, width] latent, got shape {tuple(hidden.shape)}"
        )
    p_t, p_h, p_w = spec_for(transformer).patch(transformer.config)
    _, _, f, h, w = hidden.shape
    return (
        _divide(int(f), p_t, "latent frames", "temporal patch size"),
        _divide(int(h), p_h, "latent height", "patch size"),
        _divide(int(w), p_w, "latent width", "patch size"),
    )


def _flux_grid(transformer: nn.Module, args: dict) -> tuple[int, int]:
    """FLUX's packed latents carry no shape; their ``img_ids`` hold (0, row, col) per token in raster order."""
    hidden, img_ids = args["hidden_states"], args.get("img_ids")
    if img_ids is None:
        raise ValueError("FluxTransformer2DModel: img_ids is needed to know the token grid, got None")
    if img_ids.dim() == 3:
        img_ids = img_ids[0]
    n = int(hidden.shape[1])
    if img_ids.shape[0] != n:
        raise ValueError(f"img_ids has {img_ids.shape[0]} rows but hidden_states has {n} image tokens")
    last = [int(v) for v in img_ids[-1].tolist()]  # one small host read per forward
    h, w = last[1] + 1, last[2] + 1
    if h * w != n:
        raise ValueError(
            f"FluxTransformer2DModel: img_ids end at row {h - 1}, column {w - 1}, which is not a raster grid of "
            f"{n} tokens (reference-image conditioning such as Kontext is not supported)"
        )
    return (h, w)


def _triple(value: Any) -> tuple[int, int, int]:
    t = tuple(int(v) for v in value)
    if len(t) != 3:
        raise ValueError(f"patch_size must have 3 entries (t, h, w), got {value!r}")
    return t  # type: ignore[return-value]


# Any leading path is allowed, so the patterns also match when the transformer sits inside another
# module that was compiled, or when a compiler spells the root differently.
_PREFIX = r"(?:.+\.)?"

SUPPORTED: dict[str, ModelSpec] = {
    spec.class_name: spec
    for spec in (
        ModelSpec(
            class_name="FluxTransformer2DModel",
            module=_PREFIX + r"(?:transformer_blocks|single_transformer_blocks)\.\d+\.attn",
            text_position="start",
            default_text_tokens=512,
            vae_spatial=8,
            vae_temporal=None,
            # the pipeline packs 2x2 latent pixels into one token before patch_size applies
            patch=lambda c: (1, 2 * int(c.patch_size), 2 * int(c.patch_size)),
            live_grid=_flux_grid,
        ),
        ModelSpec(
            class_name="HunyuanVideoTransformer3DModel",
            module=_PREFIX + r"(?:transformer_blocks|single_transformer_blocks)\.\d+\.attn",
            text_position="end",
            default_text_tokens=256,
            vae_spatial=8,
            vae_temporal=4,
            patch=lambda c: (int(c.patch_size_t), int(c.patch_size), int(c.patch_size)),
            live_grid=_video_grid,
            text_key_mask=True,  # its joint attention always masks padded text keys
        ),
        ModelSpec(
            class_name="CosmosTransformer3DModel",
            module=_PREFIX + r"transformer_blocks\.\d+\.attn1",
            text_position=None,
            default_text_tokens=0,
            vae_spatial=8,
            vae_temporal=8,
            patch=lambda c: _triple(c.patch_size),
            live_grid=_video_grid,
        ),
        ModelSpec(
            class_name="WanTransformer3DModel",
            module=_PREFIX + r"blocks\.\d+\.attn1",
            text_position=None,
            default_text_tokens=0,
            vae_spatial=8,
            vae_temporal=4,
            patch=lambda c: _triple(c.patch_size),
            live_grid=_video_grid,
        ),
    )
}


def spec_for(transformer: nn.Module) -> ModelSpec:
    """The :class:`ModelSpec` of a transformer instance (by class or base class name)."""
    for cls in type(transformer).__mro__:
        if cls.__name__ in SUPPORTED:
            return SUPPORTED[cls.__name__]
    raise TypeError(
        f"transformer must be one of {sorted(SUPPORTED)} (or a subclass), got {type(transformer).__name__}"
    )


def bind_forward(transformer: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The forward call's arguments by name (positional ones included)."""
    bound = inspect.signature(transformer.forward).bind_partial(*args, **kwargs)
    return dict(bound.arguments)


def token_layout(
    transformer: nn.Module,
    *,
    height: int,
    width: int,
    num_frames: Optional[int] = None,
    text_tokens: Optional[int] = None,
    vae_scale_factor_spatial: Optional[int] = None,
    vae_scale_factor_temporal: Optional[int] = None,
) -> TokenLayout:
    """Token grid and text segment of a transformer at a pixel size.

    Args:
        transformer: a supported diffusers transformer.
        height, width: output size in pixels, as passed to the pipeline.
        num_frames: video frames as passed to the pipeline (video models only;
            ``(num_frames - 1)`` must be a multiple of the VAE's temporal
            compression, as the causal video VAEs require).
        text_tokens: text length in the attention sequence; default the
            pipeline's ``max_sequence_length`` default (FLUX 512,
            HunyuanVideo 256). Ignored (must be None or 0) for models whose
            self-attention holds no text.
        vae_scale_factor_spatial, vae_scale_factor_temporal: override the
            pipeline's VAE compression factors.

    Raises:
        ValueError: a size that does not give a whole grid (naming the
            argument and the factor it must be a multiple of).
    """
    spec = spec_for(transformer)
    p_t, p_h, p_w = spec.patch(transformer.config)
    vs = vae_scale_factor_spatial or spec.vae_spatial
    grid_hw = (
        _divide(int(height), vs * p_h, "height", f"VAE factor {vs} x patch {p_h}"),
        _divide(int(width), vs * p_w, "width", f"VAE factor {vs} x patch {p_w}"),
    )
    if spec.vae_temporal is None:
        if num_frames not in (None, 1):
            raise ValueError(f"num_frames must be None for {spec.class_name} (an image model), got {num_frames}")
        grid: tuple[int, ...] = grid_hw
    else:
        if num_frames is None:
            raise ValueError(f"num_frames is required for {spec.class_name} (a video model)")
        vt = vae_scale_factor_temporal or spec.vae_temporal
        if num_frames < 1 or (num_frames - 1) % vt:
            raise ValueError(
                f"num_frames={num_frames} must be 1 + a multiple of {vt} (VAE temporal compression), "
                f"e.g. {max(1, num_frames - (num_frames - 1) % vt)}"
            )
        latent_frames = (num_frames - 1) // vt + 1
        grid = (_divide(latent_frames, p_t, "latent frames", f"temporal patch {p_t}"), *grid_hw)
    if spec.text_position is None:
        if text_tokens:
            raise ValueError(f"text_tokens must be None or 0 for {spec.class_name}: its self-attention holds no text")
        text = 0
    else:
        text = spec.default_text_tokens if text_tokens is None else int(text_tokens)
        if text < 0:
            raise ValueError(f"text_tokens must be >= 0, got {text}")
    return TokenLayout(grid=grid, text_tokens=text, text_position=spec.text_position, module=spec.module,
                       text_key_mask=spec.text_key_mask)


def live_layout(transformer: nn.Module, args: tuple, kwargs: dict) -> tuple[int, ...]:
    """Token grid of one forward call of ``transformer`` (see :attr:`ModelSpec.live_grid`)."""
    return spec_for(transformer).live_grid(transformer, bind_forward(transformer, args, kwargs))


def first_timestep(args: dict) -> Optional[float]:
    """The call's diffusion timestep as a float (first element), or None when absent."""
    t = args.get("timestep")
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0])
    return float(t)
