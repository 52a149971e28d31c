"""GNA attention processors that reuse each model's own processor code.

A diffusers attention processor projects q/k/v, applies its norms and RoPE,
calls ``dispatch_attention_fn(query, key, value, ...)`` with
``[B, S, heads, D]`` tensors, then projects the output. :class:`GNAAttnProcessor`
runs the model's own ``__call__`` unchanged, except that the name
``dispatch_attention_fn`` resolves to :meth:`GNAAttnProcessor.attend`: the
function is rebuilt from the original code object over a copy of its module's
globals, so the diffusers module itself is never patched and every other
processor is untouched.

:meth:`attend` splits the sequence into the visual grid (raster order) and the
text segment, and computes

* visual queries: :func:`gna_flex.functional.na` over their window, plus
  their batch element's unmasked text keys as ``additional_keys`` in the same
  softmax;
* text queries: the model's own dense attention over all keys, with the
  model's mask, exactly as before;

then puts the outputs back in the model's token order.

The mask is read by :mod:`gna_flex.passes.key_padding`, the same code the
``gna`` compile backend's op uses: only a key-padding mask over the text
tokens is accepted (anything else raises RuntimeError).
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from gna_flex.passes.key_padding import mask_rows, per_batch_extra_keys, valid_extra_keys

from .models import ModelSpec
from .schedule import DenseSteps

__all__ = ["GNAConfig", "GNAState", "GNAAttnProcessor", "gna_processor"]

_DISPATCH = "dispatch_attention_fn"


@dataclass
class GNAConfig:
    """GNA parameters of the visual self-attention (see :func:`gna_flex.functional.na`)."""

    kernel_size: Any
    stride: Any = 1
    dilation: Any = 1
    backend: Optional[str] = None


class GNAState:
    """Per-transformer state shared by its GNA processors.

    ``grid`` is set by the transformer's forward pre-hook for every call;
    ``schedule`` says whether the current step is dense.
    """

    def __init__(self, spec: ModelSpec, config: GNAConfig, schedule: DenseSteps) -> None:
        self.spec = spec
        self.config = config
        self.schedule = schedule
        self.grid: Optional[tuple[int, ...]] = None
        self.dense: bool = False  # set by the forward pre-hook before any attention runs
        # (mask, valid text keys) of the current forward: every layer gets the same mask tensor, so it
        # is read to the host once per forward, not once per layer
        self.mask_flags: Optional[tuple[Tensor, Optional[Tensor]]] = None


def _sdpa_mask(attn_mask: Tensor, batch: int, seq: int) -> Tensor:
    """diffusers' ``[B, S]`` key mask as SDPA's ``[B, 1, 1, S]`` (as its native backend does); others unchanged."""
    if attn_mask.dim() == 2 and attn_mask.shape[0] == batch and attn_mask.shape[1] == seq:
        return attn_mask[:, None, None, :]
    return attn_mask


class GNAAttnProcessor:
    """Wraps one visual self-attention processor; see the module docstring.

    Args:
        original: the processor the model had (kept, restored by ``disable``).
        state: the transformer's shared :class:`GNAState`.
    """

    def __init__(self, original: Any, state: GNAState) -> None:
        func = type(original).__call__
        if _DISPATCH not in func.__code__.co_names:
            raise TypeError(
                f"{type(original).__name__} does not route attention through {_DISPATCH}; "
                "gna_flex cannot swap its attention"
            )
        self.original = original
        self.state = state
        self.dense_attention: Callable[..., Tensor] = func.__globals__[_DISPATCH]
        module_globals = dict(func.__globals__)
        # Without __name__, torch.compile keys these globals by the dict itself, not by the diffusers
        # module, so the swapped name never leaks into other processors' traces (relative imports
        # inside the function use __package__, which stays).
        module_globals.pop("__name__", None)
        # looked up at call time, so that wrappers set on the instance (e.g. benchmark timers) apply
        module_globals[_DISPATCH] = lambda *args, **kwargs: self.attend(*args, **kwargs)
        call = types.FunctionType(func.__code__, module_globals, func.__name__, func.__defaults__, func.__closure__)
        call.__kwdefaults__ = func.__kwdefaults__
        self._call = call

    def __getattr__(self, name: str) -> Any:
        # diffusers reads processor attributes such as _attention_backend
        if name in ("original", "state", "_call"):
            raise AttributeError(name)
        return getattr(self.original, name)

    def attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Optional[Tensor] = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: Optional[float] = None,
        enable_gqa: bool = False,
        attention_kwargs: Optional[dict] = None,
        **kwargs: Any,
    ) -> Tensor:
        """Drop-in for ``dispatch_attention_fn`` on ``[B, S, heads, D]`` tensors."""

        def dense(q: Tensor) -> Tensor:
            return self.dense_attention(
                q, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                enable_gqa=enable_gqa, attention_kwargs=attention_kwargs, **kwargs,
            )

        state = self.state
        if state.dense:
            return dense(query)
        grid = state.grid
        if grid is None:
            raise RuntimeError("GNA processor called outside a transformer forward: the token grid is unknown")
        b, s = query.shape[0], query.shape[1]
        n = 1
        for g in grid:
            n *= g
        if key.shape[1] != s:
            raise ValueError(f"GNA processors are for self-attention: query has {s} tokens, key has {key.shape[1]}")
        if is_causal or dropout_p:
            raise ValueError(f"GNA attention supports is_causal=False and dropout_p=0, got {is_causal}, {dropout_p}")
        if kwargs.get("parallel_config") is not None:
            raise ValueError("GNA processors do not support diffusers context parallelism (parallel_config)")
        text = s - n
        position = state.spec.text_position
        if text < 0 or (text and position is None):
            raise ValueError(
                f"{state.spec.class_name}: attention sequence of {s} tokens does not hold the {n}-token grid "
                f"{'x'.join(map(str, grid))}" + ("" if position else " and nothing else")
            )
        vis, txt = (slice(text, s), slice(0, text)) if position == "start" else (slice(0, n), slice(n, s))
        q_vis = query[:, vis].unflatten(1, grid)
        k_vis, v_vis = key[:, vis].unflatten(1, grid), value[:, vis].unflatten(1, grid)
        k_txt, v_txt = key[:, txt], value[:, txt]
        text_mask = None
        if attn_mask is not None:
            given, attn_mask = attn_mask, _sdpa_mask(attn_mask, b, s)
            cached = state.mask_flags
            if cached is not None and cached[0] is given:
                text_mask = cached[1]
            else:
                text_mask = valid_extra_keys(attn_mask, b, query.shape[2], s, s, vis, txt)
                state.mask_flags = (given, text_mask)
        out_vis = self._grid_attention(q_vis, k_vis, v_vis, k_txt, v_txt, text_mask, scale)
        out_vis = out_vis.flatten(1, len(grid))
        if not text:
            return out_vis
        if attn_mask is not None:
            attn_mask = mask_rows(attn_mask, txt, s)  # a full [.., S, S] mask: the text queries' rows
        out_txt = dense(query[:, txt]).to(out_vis.dtype)
        parts = (out_txt, out_vis) if position == "start" else (out_vis, out_txt)
        return torch.cat(parts, dim=1)

    def _grid_attention(
        self, q: Tensor, k: Tensor, v: Tensor, k_txt: Tensor, v_txt: Tensor, text_mask: Optional[Tensor],
        scale: Optional[float],
    ) -> Tensor:
        """GNA of ``[B, *grid, heads, D]`` queries over their window plus the unmasked text keys.

        ``text_mask`` (``[B, E]`` bool on the host, or None for all-valid)
        selects each batch element's text keys; elements with the same mask
        share one call (:func:`gna_flex.passes.key_padding.per_batch_extra_keys`).
        """
        from gna_flex import functional

        cfg = self.state.config

        def run(qq: Tensor, kk: Tensor, vv: Tensor, ak: Optional[Tensor], av: Optional[Tensor]) -> Tensor:
            return functional.na(qq, kk, vv, cfg.kernel_size, cfg.stride, cfg.dilation, scale=scale,
                                 additional_keys=ak, additional_values=av, backend=cfg.backend)

        return per_batch_extra_keys(run, q, k, v, k_txt, v_txt, text_mask)


@functools.lru_cache(maxsize=None)
def _processor_class(original_cls: type) -> type:
    """A GNAAttnProcessor subclass whose ``__call__`` has ``original_cls.__call__``'s signature.

    diffusers inspects the processor's ``__call__`` signature to decide which
    keyword arguments (e.g. ``image_rotary_emb``) to pass.
    """

    @functools.wraps(original_cls.__call__)
    def __call__(self: GNAAttnProcessor, *args: Any, **kwargs: Any) -> Any:
        return self._call(self.original, *args, **kwargs)

    return type(f"GNA{original_cls.__name__}", (GNAAttnProcessor,), {"__call__": __call__})


def gna_processor(original: Any, state: GNAState) -> GNAAttnProcessor:
    """A GNA processor wrapping ``original`` (see :class:`GNAAttnProcessor`)."""
    return _processor_class(type(original))(original, state)
