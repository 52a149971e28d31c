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

* visual queries: :func:`gna_flex.functional.na` over their window, plus all
  (unmasked) text keys as ``additional_keys`` in the same softmax;
* text queries: the model's own dense attention over all keys, with the
  model's mask, exactly as before;

then puts the outputs back in the model's token order.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

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
        # (mask, host flags) of the current forward: every layer gets the same mask tensor, so it is
        # read to the host once per forward, not once per layer
        self.mask_flags: Optional[tuple[Tensor, Tensor]] = None


def _key_padding_mask(attn_mask: Tensor, batch: int, seq: int) -> Tensor:
    """A ``[B|1, 1, 1, S]`` (or ``[B|1, S]``) boolean key mask as ``[B, S]``."""
    if attn_mask.dtype != torch.bool:
        raise TypeError(
            f"GNA attention supports a boolean key padding mask, got attn_mask of dtype {attn_mask.dtype}"
        )
    m = attn_mask
    if m.dim() == 4 and m.shape[1] == 1 and m.shape[2] == 1:
        m = m[:, 0, 0]
    if m.dim() != 2 or m.shape[-1] != seq or m.shape[0] not in (1, batch):
        raise ValueError(
            f"GNA attention supports a key padding mask of shape [B, 1, 1, S] or [B, S] with S={seq}, "
            f"got attn_mask of shape {tuple(attn_mask.shape)}"
        )
    return m.expand(batch, seq)


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
            cached = state.mask_flags
            if cached is not None and cached[0] is attn_mask:
                flags = cached[1]
            else:
                keys = _key_padding_mask(attn_mask, b, s)
                visual_ok = keys[:, vis].all(dim=1, keepdim=True)
                flags = torch.cat([visual_ok, keys[:, txt]], dim=1).cpu()  # one host read for the whole mask
                state.mask_flags = (attn_mask, flags)
            if not bool(flags[:, 0].all()):
                raise ValueError("GNA attention cannot mask visual keys; attn_mask masks some grid tokens")
            if not bool(flags[:, 1:].all()):
                text_mask = flags[:, 1:]
        out_vis = self._grid_attention(q_vis, k_vis, v_vis, k_txt, v_txt, text_mask, scale)
        out_vis = out_vis.flatten(1, len(grid))
        if not text:
            return out_vis
        out_txt = dense(query[:, txt]).to(out_vis.dtype)  # the key mask broadcasts over these queries
        parts = (out_txt, out_vis) if position == "start" else (out_vis, out_txt)
        return torch.cat(parts, dim=1)

    def _grid_attention(
        self, q: Tensor, k: Tensor, v: Tensor, k_txt: Tensor, v_txt: Tensor, text_mask: Optional[Tensor],
        scale: Optional[float],
    ) -> Tensor:
        """GNA of ``[B, *grid, heads, D]`` queries over their window plus the unmasked text keys.

        ``text_mask`` (``[B, E]`` bool on the host, or None for all-valid)
        selects each batch element's text keys; elements with the same mask
        share one call.
        """
        from gna_flex import functional

        cfg = self.state.config

        def run(qq: Tensor, kk: Tensor, vv: Tensor, ak: Optional[Tensor], av: Optional[Tensor]) -> Tensor:
            if ak is not None and ak.shape[1] == 0:
                ak = av = None
            return functional.na(qq, kk, vv, cfg.kernel_size, cfg.stride, cfg.dilation, scale=scale,
                                 additional_keys=ak, additional_values=av, backend=cfg.backend)

        if text_mask is None:
            return run(q, k, v, k_txt, v_txt)
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        groups: dict[tuple[bool, ...], list[int]] = {}
        for i, row in enumerate(text_mask.tolist()):
            groups.setdefault(tuple(row), []).append(i)
        for row, members in groups.items():
            idx = torch.tensor(members, device=q.device)
            cols = torch.tensor([j for j, keep in enumerate(row) if keep], device=q.device, dtype=torch.long)
            ak = k_txt.index_select(0, idx).index_select(1, cols)
            av = v_txt.index_select(0, idx).index_select(1, cols)
            res = run(q.index_select(0, idx), k.index_select(0, idx), v.index_select(0, idx), ak, av)
            out.index_copy_(0, idx, res.to(out.dtype))
        return out


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
