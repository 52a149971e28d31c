"""GNA for diffusers pipelines: FLUX, HunyuanVideo, Cosmos and Wan.

Two paths, same attention:

* **Processors** (no ``torch.compile`` needed)::

      from gna_flex.integrations import diffusers as gna
      gna.enable(pipe, kernel_size=(18, 24, 24), stride=(16, 8, 8), dense_steps=0.28)
      video = pipe(prompt, height=768, width=1280, num_frames=117).frames
      gna.disable(pipe)

  Installs GNA processors on the visual self-attention modules only (cross
  attention and text-only attention are untouched): visual queries attend to
  their window plus every text key in one softmax, text queries stay dense.
  The first ``dense_steps`` denoising steps run dense attention.

* **torch.compile**::

      rules = gna.rules_for(pipe.transformer, height=4096, width=4096, kernel_size=80, stride=16)
      pipe.transformer = torch.compile(pipe.transformer, backend="gna", options={"rules": rules})

Requires the ``diffusers`` extra (``pip install gna_flex[diffusers]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from .models import SUPPORTED, TokenLayout, bind_forward, first_timestep, spec_for, token_layout
from .processors import GNAAttnProcessor, GNAConfig, GNAState, gna_processor
from .schedule import DenseSteps, SchedulerTracker

__all__ = [
    "SUPPORTED", "TokenLayout", "GNAHandle", "token_layout", "rules_for", "enable", "disable", "is_enabled",
]

_HANDLE_ATTR = "_gna_flex_handle"


def rules_for(
    transformer: Any,
    *,
    height: int,
    width: int,
    num_frames: Optional[int] = None,
    kernel_size: Any,
    stride: Any = 1,
    dilation: Any = 1,
    text_tokens: Optional[int] = None,
    min_speedup: float = 1.1,
    backend: Optional[str] = None,
    vae_scale_factor_spatial: Optional[int] = None,
    vae_scale_factor_temporal: Optional[int] = None,
) -> list:
    """The :class:`gna_flex.passes.Rule` list for a model at an output size.

    Args:
        transformer: a supported transformer, or a pipeline (its
            ``transformer``; its VAE scale factors are used when present).
        height, width, num_frames: the pipeline's output size in pixels and
            frames (``num_frames`` for video models only).
        kernel_size, stride, dilation: GNA parameters on the token grid
            (``(H, W)`` or ``(T, H, W)``).
        text_tokens: text length in the self-attention sequence (default: the
            pipeline's default ``max_sequence_length``; see
            :func:`~gna_flex.integrations.diffusers.models.token_layout`).
        min_speedup, backend: passed to each Rule.

    Models that mask padded text keys in their self-attention (HunyuanVideo)
    get ``extra_key_mask=True``: the op checks at run time that the mask is a
    key-padding mask over the text tokens and gives each batch element's
    visual queries only its valid text keys, as the processors do.

    Raises:
        ValueError: the size does not give a whole token grid, or the GNA
            parameters do not fit it (naming the argument and axis).
    """
    from gna_flex.passes.rule import Rule

    pipe, transformer = _split(transformer)
    if pipe is not None:
        vae_scale_factor_spatial = vae_scale_factor_spatial or getattr(pipe, "vae_scale_factor_spatial", None)
        vae_scale_factor_temporal = vae_scale_factor_temporal or getattr(pipe, "vae_scale_factor_temporal", None)
    layout = token_layout(
        transformer, height=height, width=width, num_frames=num_frames, text_tokens=text_tokens,
        vae_scale_factor_spatial=vae_scale_factor_spatial, vae_scale_factor_temporal=vae_scale_factor_temporal,
    )
    return [Rule(
        grid=layout.grid, kernel_size=kernel_size, stride=stride, dilation=dilation, is_causal=False,
        extra_tokens=layout.text_tokens, extra_position=layout.text_position or "end", module=layout.module,
        min_speedup=min_speedup, backend=backend, extra_key_mask=layout.text_key_mask,
    )]


@dataclass(eq=False)
class GNAHandle:
    """What :func:`enable` installed; :func:`disable` undoes it.

    ``schedule`` exposes the step counter (``schedule.step``), ``reset()`` and
    ``set_override("dense" | "gna" | None)``.
    """

    schedule: DenseSteps
    states: list[GNAState] = field(default_factory=list)
    originals: list[tuple[nn.Module, Any]] = field(default_factory=list)
    hooks: list[Any] = field(default_factory=list)
    transformers: list[nn.Module] = field(default_factory=list)
    tracker: Optional[SchedulerTracker] = None


def _split(obj: Any) -> tuple[Optional[Any], nn.Module]:
    if isinstance(obj, nn.Module):
        return None, obj
    transformer = getattr(obj, "transformer", None)
    if not isinstance(transformer, nn.Module):
        raise TypeError(f"expected a diffusers pipeline or transformer, got {type(obj).__name__}")
    return obj, transformer


def _transformers(obj: Any) -> tuple[Optional[Any], list[nn.Module]]:
    pipe, first = _split(obj)
    found = [first]
    if pipe is not None:
        second = getattr(pipe, "transformer_2", None)  # Wan 2.2's low-noise expert
        if isinstance(second, nn.Module):
            found.append(second)
    return pipe, found


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "_orig_mod", module)  # a torch.compile'd module


def enable(
    pipe_or_transformer: Any,
    *,
    kernel_size: Any,
    stride: Any = 1,
    dilation: Any = 1,
    dense_steps: int | float = 0,
    num_inference_steps: Optional[int] = None,
    backend: Optional[str] = None,
) -> GNAHandle:
    """Install GNA processors on the visual self-attention of a pipeline or transformer.

    Args:
        pipe_or_transformer: a FLUX, HunyuanVideo, Cosmos or Wan pipeline (all
            its transformers, e.g. Wan 2.2's two experts), or one transformer.
        kernel_size, stride, dilation: GNA parameters on the token grid
            ``(H, W)`` / ``(T, H, W)`` (int or per axis). They are checked
            against each call's grid, which is read from the call's input.
        dense_steps: leading denoising steps that stay dense: an ``int``
            count or a ``float`` fraction in ``[0, 1]`` (rounded up).
            With a pipeline, steps are counted through its scheduler; with a
            bare transformer, from the timesteps it is called with (see
            :mod:`~gna_flex.integrations.diffusers.schedule`).
        num_inference_steps: number of steps, for a fractional ``dense_steps``
            with a bare transformer.
        backend: :func:`gna_flex.functional.na` backend (None: fused kernel
            when it can run, else flex).

    Returns:
        A :class:`GNAHandle` (also kept on the transformer for :func:`disable`).

    Raises:
        ValueError: GNA is already enabled on one of the transformers.
        TypeError: an unsupported model or processor.
    """
    pipe, transformers = _transformers(pipe_or_transformer)
    for t in transformers:
        if is_enabled(t):
            raise ValueError(f"GNA is already enabled on {type(_unwrap(t)).__name__}; call disable() first")
    schedule = DenseSteps(dense_steps, num_inference_steps)
    config = GNAConfig(kernel_size=kernel_size, stride=stride, dilation=dilation, backend=backend)
    handle = GNAHandle(schedule=schedule)
    try:
        for wrapped in transformers:
            _install(_unwrap(wrapped), config, schedule, handle, track_timesteps=pipe is None)
        if pipe is not None and getattr(pipe, "scheduler", None) is not None:
            handle.tracker = SchedulerTracker(pipe.scheduler, schedule)
    except Exception:
        _remove(handle)
        raise
    for t in handle.transformers:
        setattr(t, _HANDLE_ATTR, handle)
    return handle


def _install(transformer: nn.Module, config: GNAConfig, schedule: DenseSteps, handle: GNAHandle,
             track_timesteps: bool) -> None:
    spec = spec_for(transformer)
    state = GNAState(spec, config, schedule)
    targets = [(name, m) for name, m in transformer.named_modules()
               if _fullmatch(spec.module, name) and hasattr(m, "processor")]
    if not targets:
        raise TypeError(f"{spec.class_name}: found no attention module matching {spec.module!r}")
    handle.transformers.append(transformer)
    handle.states.append(state)
    for _, module in targets:
        original = module.processor
        module.set_processor(gna_processor(original, state))
        handle.originals.append((module, original))

    import torch

    @torch.compiler.disable  # host reads (grid, timestep) stay out of compiled graphs
    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = bind_forward(module, args, kwargs)
        state.grid = spec.live_grid(module, bound)
        state.mask_flags = None
        if track_timesteps:
            schedule.observe_timestep(first_timestep(bound))
        state.dense = schedule.dense

    handle.hooks.append(transformer.register_forward_pre_hook(pre_hook, with_kwargs=True))


def _fullmatch(pattern: str, name: str) -> bool:
    import re

    return re.fullmatch(pattern, name) is not None


def _remove(handle: GNAHandle) -> None:
    for hook in handle.hooks:
        hook.remove()
    for module, original in reversed(handle.originals):
        module.set_processor(original)
    if handle.tracker is not None:
        handle.tracker.remove()
    for t in handle.transformers:
        if getattr(t, _HANDLE_ATTR, None) is handle:
            delattr(t, _HANDLE_ATTR)
    handle.hooks.clear()
    handle.originals.clear()
    handle.tracker = None


def disable(pipe_or_transformer: Any) -> None:
    """Restore the original processors (the same objects), hooks and scheduler methods.

    Raises:
        ValueError: GNA is not enabled on it.
    """
    _, transformers = _transformers(pipe_or_transformer)
    handles = [getattr(_unwrap(t), _HANDLE_ATTR, None) for t in transformers]
    if all(h is None for h in handles):
        raise ValueError(f"GNA is not enabled on {type(_unwrap(transformers[0])).__name__}")
    for h in dict.fromkeys(h for h in handles if h is not None):
        _remove(h)


def is_enabled(pipe_or_transformer: Any) -> bool:
    """Whether :func:`enable` is in effect on (any transformer of) it."""
    _, transformers = _transformers(pipe_or_transformer)
    return any(getattr(_unwrap(t), _HANDLE_ATTR, None) is not None for t in transformers)


# re-exported for users who build processors themselves
GNAAttnProcessor = GNAAttnProcessor
