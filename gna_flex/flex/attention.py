"""The flex path: GNA through ``flex_attention`` on ``[B, *grid, heads, D]`` tensors.

:func:`flex_na` permutes q/k/v into tile-major order (:mod:`gna_flex.layout`),
appends the extra keys/values and pads the KV sequence to whole blocks, runs
``flex_attention`` (compiled on CUDA, eager on the CPU) under the analytic
``BlockMask`` of :mod:`gna_flex.flex.block_masks`, and permutes the output
(and logsumexp) back. :func:`default_kernel_options` holds the flex kernel
options it uses on CUDA.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention

from ..checks import check_inputs_for
from ..layout import default_tile, permute, unpermute
from ..spec import GNAParams
from .block_masks import DEFAULT_BLOCK_SIZE, _block_sizes, block_mask, has_partial_blocks, kernel_block_mask
from .masks import _spec_from_params

__all__ = ["flex_na", "tile_major_inputs", "tile_major_output", "default_kernel_options", "rows_guaranteed_safe",
           "flash_available"]

_COMPILED_FLEX: Optional[Callable] = None
# torch >= 2.9 returns the logsumexp through AuxRequest; return_lse is deprecated there.
_HAS_AUX = "return_aux" in inspect.signature(flex_attention).parameters


@functools.cache
def _flash_lse_scaled_twice() -> bool:
    """Whether this torch scales the FLASH backend's logsumexp by ln 2 as if it were base 2.

    FlashAttention-4 returns a natural-log LSE; torch 2.11's flex_attention
    multiplies every backend's LSE by ln 2 (right for its Triton kernels,
    which keep base-2 statistics). Later torch tells the two apart
    (``stats_are_log2``); :func:`flex_na` divides the ln 2 back out where
    torch does not.
    """
    import torch.nn.attention.flex_attention as fa

    try:
        return "stats_are_log2" not in inspect.getsource(fa)
    except (OSError, TypeError):  # no source shipped: assume the old behaviour
        return True


def _is_flash(kernel_options: Optional[dict]) -> bool:
    return (kernel_options or {}).get("BACKEND") == "FLASH"


@functools.cache
def _flash_installed() -> bool:
    """flash-attn-4's CuTe package is importable (looked up once per process)."""
    try:
        return importlib.util.find_spec("flash_attn") is not None and importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):
        return False


def flash_available(device=None) -> bool:
    """Whether torch's ``BACKEND="FLASH"`` flex kernels can run on ``device``.

    They are FlashAttention-4's CuTe-DSL kernels (package ``flash-attn-4``,
    ``pip install "flash-attn-4[cu13]"``), run by compiled ``flex_attention``
    on Hopper (sm90) and Blackwell (sm100) GPUs.
    """
    return torch.cuda.is_available() and _flash_installed() and torch.cuda.get_device_capability(device)[0] in (9, 10)


def _lse_request() -> dict:
    if _HAS_AUX:
        from torch.nn.attention.flex_attention import AuxRequest

        return {"return_aux": AuxRequest(lse=True)}
    return {"return_lse": True}


def _compiled_flex() -> Callable:
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        # dynamic=False: shapes are fixed per grid and block masks are cached,
        # so static shapes give the best kernels and never re-trace per config
        # (the mask parameters are tensors).
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return _COMPILED_FLEX


def _recompile_headroom():
    """Raise Dynamo's per-function recompile limit while the compiled flex runs.

    Every grid shape, dtype and kernel-option set is one compiled entry of
    flex_attention's code object (configs of one grid share an entry: their
    parameters are tensors). Past the default limit of 8 Dynamo silently runs
    flex eagerly, which materialises the S x S score matrix (hundreds of GiB
    for a video grid); a model with more attention shapes than that must
    keep compiling instead.
    """
    import torch._dynamo.config as dynamo_config

    limits = {}
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            limits[name] = max(getattr(dynamo_config, name), 256)
            break
    return dynamo_config.patch(**limits)


def _flash_pays(dtype: torch.dtype, head_dim: int, block_size: tuple[int, int],
                capability: Optional[tuple[int, int]], has_partial: bool, ndim: Optional[int]) -> bool:
    """Where the FLASH backend measured faster than gna_flex's Triton options (H100, head dim 128).

    ``benchmarks/results/flex-flash-h100.json``: 1.3x-1.4x on every perfectly
    block-sparse benchmark mask and 1.1x-1.3x on the 1-D / 2-D stride-1
    masks, but 0.75x on the 3-D stride-1 mask with (128, 128) blocks, whose
    partial blocks evaluate the mask_mod per element. Other cards, head dims
    and block sizes stay on Triton until measured.
    """
    return (
        capability is not None and capability[0] == 9
        and dtype in (torch.float16, torch.bfloat16) and head_dim == 128
        and block_size[0] == 128 and block_size[1] in (64, 128)
        and (not has_partial or (ndim is not None and ndim <= 2))
        and not torch.are_deterministic_algorithms_enabled()  # FA4's block-sparse backward is not deterministic
    )


def rows_guaranteed_safe(padded_rows: bool, has_partial: bool) -> bool:
    """Whether the Triton flex kernel may drop its guard for fully masked rows (``ROWS_GUARANTEED_SAFE``).

    Only when the mask has no partial block and no query row is padding. The
    guard covers rows whose running maximum is still -inf after a block; with
    partial blocks (visited first) a query's first block can hold none of its
    window, and without the guard that row turns into NaN.
    """
    return not padded_rows and not has_partial


def default_kernel_options(
    dtype: torch.dtype,
    head_dim: int,
    padded_rows: bool,
    block_size: tuple[int, int] = (DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE),
    capability: Optional[tuple[int, int]] = None,
    has_partial: bool = True,
    ndim: Optional[int] = None,
    flash: Optional[bool] = None,
) -> dict:
    """Flex kernel options used by :func:`flex_na` on CUDA when none are given.

    Args:
        dtype, head_dim: of q/k/v.
        padded_rows: some query rows are padding (tile-major order of a grid
            that is not a tile multiple).
        block_size: sparse ``(Q, KV)`` block size of the mask.
        capability: the GPU's compute capability (default: the current device's).
        has_partial: the mask has partial blocks (:func:`~gna_flex.flex.block_masks.has_partial_blocks`).
        ndim: number of grid axes (1, 2 or 3), for the backend choice.
        flash: ``True`` / ``False`` to force torch's FLASH backend on or off;
            ``None`` picks it where it measured faster (below) and
            :func:`flash_available`.

    * **FLASH** (``{"BACKEND": "FLASH"}``, FlashAttention-4's CuTe-DSL kernels
      through compiled flex_attention; needs the ``flash-attn-4`` package):
      on sm90, 16-bit, head dim 128, Q blocks of 128 and KV blocks of 128 or
      64, for masks without partial blocks or on 1-D / 2-D grids. Measured on
      an H100 (``benchmarks/results/flex-flash-h100.json``, kernel alone):
      30x48x80 / s16x8x8 22.1 ms vs 29.7 ms with the Triton options below,
      256x256 / s16x16 8.2 vs 10.7 ms, 32768 / s256 1.40 vs 1.90 ms, 2-D and
      1-D stride 1 16.5 vs 19.5 and 1.74 vs 2.12 ms; 3-D stride 1 with
      (128, 128) blocks 144 vs 108 ms, so 3-D masks with partial blocks stay
      on Triton.
    * **Triton** otherwise. On sm90, 16-bit, head dim 128, sparse blocks that
      are multiples of (128, 128): ``BLOCK_M=128, BLOCK_N=128, num_warps=8,
      USE_TMA=True`` with 3 stages when the mask has no partial block (its
      kernel runs the mask_mod-free twin,
      :func:`~gna_flex.flex.block_masks.kernel_block_mask`) and 2 stages
      otherwise (3 stages plus the exact mask_mod's scratch exceed shared
      memory on 3-D grids). With (128, 64) blocks: ``BLOCK_N=64,
      num_stages=3`` (torch's own sm90 pick). A 128-row Q tile is exactly one
      sparse Q block, so a Q program never straddles two KV lists. Measured
      on an H100 (``benchmarks/results/flex-opts-h100.json``,
      ``flex-sel-h100.json``): on 30x48x80 / s16x8x8, 29.3 ms with 3 stages,
      31.3 ms with 2, 34.4 ms with torch's pick; 2-D 256x256 / s16x16 and
      1-D 32768 / s256 gain 6% and 9% from the third stage. torch turns TMA
      off by itself where the strides do not allow it. These options carry
      the ``fwd_`` prefix: the backward keeps torch's own choices.
      ``ROWS_GUARANTEED_SAFE`` where :func:`rows_guaranteed_safe` allows it
      (no partial block, no padding row).
    """
    opts: dict = {}
    if capability is None and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability()
    if flash is None:
        flash = _flash_pays(dtype, head_dim, block_size, capability, has_partial, ndim) and _flash_installed()
    elif flash and not (_flash_installed() and capability is not None and capability[0] in (9, 10)):
        raise ValueError("flash=True needs torch's FLASH flex backend: the flash-attn-4 package "
                         "(pip install \"flash-attn-4[cu13]\") and an sm90/sm100 GPU")
    if flash:
        return {"BACKEND": "FLASH"}
    if capability == (9, 0) and dtype in (torch.float16, torch.bfloat16) and head_dim == 128 and block_size[0] % 128 == 0:
        if block_size[1] % 128 == 0:
            fwd = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2 if has_partial else 3, USE_TMA=True)
        elif block_size[1] % 64 == 0:
            fwd = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
        else:
            fwd = {}
        opts.update({f"fwd_{k}": v for k, v in fwd.items()})
    if rows_guaranteed_safe(padded_rows, has_partial):
        opts["ROWS_GUARANTEED_SAFE"] = True
    return opts


def _run_flex(fn, q, k, v, bm, scale, gqa, kernel_options, return_lse) -> tuple[Tensor, Optional[Tensor]]:
    """``fn`` (flex_attention, compiled or not) on ``[B, heads, S, D]``; returns ``(out, lse or None)``."""
    kwargs = dict(block_mask=bm, scale=scale, enable_gqa=gqa, kernel_options=kernel_options)
    if return_lse:
        kwargs.update(_lse_request())
    with warnings.catch_warnings():
        # Eager flex on CPU warns that it materialises the score matrix: that is the point of the CPU path.
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        res = fn(q, k, v, **kwargs)
    if not return_lse:
        return res, None
    return (res[0], res[1].lse) if _HAS_AUX else res


class _CpuFlexAttention(torch.autograd.Function):
    """Eager flex on the CPU with a backward.

    torch's FlexAttention refuses inputs that require grad on the CPU. The
    forward here is eager flex itself; the backward is the standard attention
    backward evaluated densely under the same mask_mod (the eager CPU forward
    materialises the score matrix too), so CPU autograd of the flex path
    computes the exact gradient of the exact function.
    """

    @staticmethod
    def forward(ctx, q, k, v, bm, scale, gqa):
        out, lse = _run_flex(flex_attention, q.detach(), k.detach(), v.detach(), bm, scale, gqa, None, True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.bm, ctx.scale = bm, scale
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        b, hq, sq, dim = q.shape
        hkv, skv = k.shape[1], k.shape[2]
        group = hq // hkv
        scale = dim ** -0.5 if ctx.scale is None else ctx.scale
        z = torch.zeros((), dtype=torch.int32)
        mask = ctx.bm.mask_mod(z, z, torch.arange(sq, dtype=torch.int32)[:, None],
                               torch.arange(skv, dtype=torch.int32)[None, :])
        kx = k.repeat_interleave(group, 1) if group > 1 else k
        vx = v.repeat_interleave(group, 1) if group > 1 else v
        s = (q.float() @ kx.float().transpose(-1, -2)) * scale
        lse_f = torch.where(torch.isfinite(lse), lse, 0).float()[..., None]
        p = torch.where(mask, torch.exp(s - lse_f), 0)
        d_out = torch.zeros_like(out, dtype=torch.float32) if d_out is None else d_out.float()
        dv = p.transpose(-1, -2) @ d_out
        dp = d_out @ vx.float().transpose(-1, -2)
        delta = (d_out * out.float()).sum(-1, keepdim=True)
        if d_lse is not None:
            delta = delta - d_lse.float()[..., None]
        ds = p * (dp - delta)
        dq = (ds @ kx.float()) * scale
        dk = (ds.transpose(-1, -2) @ q.float()) * scale
        if group > 1:
            dk = dk.unflatten(1, (hkv, group)).sum(2)
            dv = dv.unflatten(1, (hkv, group)).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def tile_major_inputs(query: Tensor, key: Tensor, value: Tensor, grid, tile, kv_len: int,
                      additional_keys: Optional[Tensor] = None, additional_values: Optional[Tensor] = None):
    """The flex path's inputs: ``[B, *grid, heads, D]`` -> tile-major ``[B, heads, S, D]`` views.

    Returns ``(qt, kt, vt, layout)``: ``qt [B, heads, S_pad, D]``, ``kt`` /
    ``vt [B, heads_kv, kv_len, D]`` with the extra keys/values right after
    the ``S_pad`` grid tokens and zeros up to ``kv_len``. The copies keep
    NATTEN's heads-last order (``[B, S, heads, D]`` in memory): each tile row
    moves as one contiguous ``heads * D`` run, and flex reads the views
    through their strides (its output follows the query's stride order).
    """
    qt, layout = permute(query, grid, tile)
    sg = layout.num_tokens
    kt, _ = permute(key, grid, tile, extra=kv_len - sg)
    vt, _ = permute(value, grid, tile, extra=kv_len - sg)
    if additional_keys is not None:
        extra = additional_keys.shape[1]
        kt[:, sg : sg + extra] = additional_keys
        vt[:, sg : sg + extra] = additional_values
    return qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2), layout


def tile_major_output(out: Tensor, layout) -> Tensor:
    """flex's ``out [B, heads, S_pad, Dv]`` (tile-major) -> contiguous ``[B, *grid, heads, Dv]``."""
    # unpermute returns a view when the order is unchanged (e.g. 1-D without
    # padding); callers get NATTEN's contiguous layout either way.
    return unpermute(out.transpose(1, 2), layout).contiguous()


def flex_na(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    params: GNAParams,
    *,
    scale: Optional[float] = None,
    additional_keys: Optional[Tensor] = None,
    additional_values: Optional[Tensor] = None,
    return_lse: bool = False,
    tile=None,
    block_size=None,
    kernel_options: Optional[dict] = None,
    compile: Optional[bool] = None,
    mask_impl: Optional[str] = None,
):
    """Neighborhood attention through FlexAttention in tile-major order.

    Args:
        query: ``[B, *grid, heads, D]``.
        key, value: ``[B, *grid, heads_kv, D]`` / ``[B, *grid, heads_kv, Dv]``;
            ``heads_kv`` divides ``heads`` (GQA).
        params: :class:`GNAParams` of the grid.
        scale: softmax scale (default ``D ** -0.5``).
        additional_keys, additional_values: ``[B, E, heads_kv, D]`` extra
            keys/values every grid query attends to, in one softmax with its
            window.
        return_lse: also return the logsumexp ``[B, *grid, heads]`` (fp32,
            natural log).
        tile: tile of the tile-major order (default :func:`gna_flex.layout.default_tile`
            for the Q block size).
        block_size: sparse block size, int or ``(Q, KV)``; default 128.
        kernel_options: flex kernel options (default :func:`default_kernel_options`
            on CUDA; pass ``{}`` for torch's heuristics).
        compile: use the compiled flex_attention (default: on CUDA only; eager
            flex on CPU evaluates the whole score matrix, fine for small tests).
        mask_impl: mask_mod implementation, ``"tables"`` or ``"arith"``
            (:func:`~gna_flex.flex.masks.mask_mod`); ``None`` for
            :data:`~gna_flex.flex.masks.DEFAULT_MASK_IMPL`.

    Returns:
        ``out [B, *grid, heads, Dv]`` (and ``lse`` if asked). Autograd works
        through flex's own backward on CUDA. torch's FlexAttention has no
        CPU backward; on the CPU, inputs that require grad go through eager
        flex with a dense backward under the same mask_mod (``_CpuFlexAttention``).
    """
    check_inputs_for(query, key, value, params, additional_keys, additional_values)
    bq, bk = _block_sizes(DEFAULT_BLOCK_SIZE if block_size is None else block_size)
    grid = params.grid
    if tile is None:
        tile = default_tile(grid, bq)
    extra = 0 if additional_keys is None else additional_keys.shape[1]
    spec = _spec_from_params(params, tile, extra)
    sg = spec.grid_tokens
    # Pad the KV sequence to a whole number of KV blocks, so the kernel can use
    # its divisible fast path; the trailing tokens are invalid in the mask.
    kv_len = -(-(sg + extra) // bk) * bk
    qt, kt, vt, layout = tile_major_inputs(query, key, value, grid, tile, kv_len, additional_keys, additional_values)
    bm = block_mask(params, None, tile=tile, extra_tokens=extra, block_size=(bq, bk), device=query.device,
                    q_len=sg, kv_len=kv_len, mask_impl=mask_impl)
    if compile is None:
        compile = query.device.type == "cuda"
    if kernel_options is None:
        kernel_options = (
            default_kernel_options(query.dtype, query.shape[-1], layout.is_padded, (bq, bk),
                                   torch.cuda.get_device_capability(query.device), has_partial_blocks(bm),
                                   ndim=params.ndim)
            if query.device.type == "cuda"
            else None
        )
    gqa = query.shape[-2] != key.shape[-2]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (qt, kt, vt))
    if query.device.type == "cpu" and needs_grad:
        out, lse = _CpuFlexAttention.apply(qt, kt, vt, bm, scale, gqa)
    elif compile:
        with _recompile_headroom():
            out, lse = _run_flex(_compiled_flex(), qt, kt, vt, kernel_block_mask(bm, kernel_options), scale, gqa,
                                 kernel_options or None, return_lse)
    else:
        out, lse = _run_flex(flex_attention, qt, kt, vt, bm, scale, gqa, kernel_options or None, return_lse)
    out = tile_major_output(out, layout)
    if not return_lse:
        return out
    if compile and _is_flash(kernel_options) and _flash_lse_scaled_twice():
        lse = lse / math.log(2.0)
    return out, unpermute(lse.transpose(1, 2), layout).float().contiguous()
