"""A small DiT-like video model for tests and benchmarks of the gna backend.

Patch embedding turns a video ``[B, C, T, H, W]`` into a ``T' x H' x W'``
token grid (raster order); each block runs joint self-attention over the grid
tokens with the text tokens concatenated (after the grid, or before it with
``text_first=True``) through ``F.scaled_dot_product_attention``, then a
cross-attention from the grid tokens to a separate context (also SDPA, and
never GNA: its keys are the context), then an MLP.

``set_gna_reference(...)`` switches the self-attentions to dense fp32
attention under the exact GNA mask of :func:`gna_flex.reference.dense_mask`
(the oracle): the expected output of a correctly rewritten model.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gna_flex.reference import dense_mask
from gna_flex.spec import make_params


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch: tuple[int, int, int]):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, video: Tensor) -> Tensor:
        """``[B, C, T, H, W]`` -> ``[B, T' * H' * W', dim]`` (raster order)."""
        return self.proj(video).flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.reference_mask: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        b, s, dim = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.reference_mask is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=self.reference_mask.to(q.device)
            ).to(q.dtype)
        return self.proj(out.transpose(1, 2).reshape(b, s, dim))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, s, dim = x.shape
        d = dim // self.heads
        q = self.q(x).view(b, s, self.heads, d).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, s, dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, text_first: bool = False):
        super().__init__()
        self.text_first = text_first
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, text: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        n = x.shape[1]
        h = torch.cat([text, x] if self.text_first else [x, text], dim=1)
        h = h + self.attn(self.norm1(h))
        text, x = (h[:, :-n], h[:, -n:]) if self.text_first else (h[:, n:], h[:, :n])
        x = x + self.cross(self.norm2(x), context)
        x = x + self.mlp(self.norm3(x))
        return x, text


class TinyDiT(nn.Module):
    """Patch embedding, ``depth`` blocks, a linear head over the grid tokens.

    ``forward(video [B, C, T, H, W], text [B, E, text_dim], context [B, M, text_dim])``
    returns ``[B, T' * H' * W', out_channels]``.
    """

    def __init__(self, in_channels: int = 4, dim: int = 32, heads: int = 2, depth: int = 2,
                 patch: tuple[int, int, int] = (1, 2, 2), text_dim: int = 24, out_channels: int = 8,
                 text_first: bool = False):
        super().__init__()
        self.text_first = text_first
        self.embed = PatchEmbed(in_channels, dim, patch)
        self.text_proj = nn.Linear(text_dim, dim)
        self.context_proj = nn.Linear(text_dim, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, text_first) for _ in range(depth))
        self.head = nn.Linear(dim, out_channels)

    def forward(self, video: Tensor, text: Tensor, context: Tensor) -> Tensor:
        x = self.embed(video)
        t = self.text_proj(text)
        c = self.context_proj(context)
        for block in self.blocks:
            x, t = block(x, t, c)
        return self.head(x)

    def set_gna_reference(self, grid, kernel_size, stride=1, dilation=1, is_causal=False, extra_tokens: int = 0,
                          device=None) -> None:
        """Make every self-attention dense fp32 attention under the GNA mask (the oracle)."""
        params = make_params(grid, kernel_size, stride, dilation, is_causal)
        mask = dense_mask(params, extra_tokens, device=device)
        if self.text_first and extra_tokens:
            # Extra tokens first: move them from the end to the front on both axes.
            order = torch.cat([torch.arange(params.num_tokens, params.num_tokens + extra_tokens),
                               torch.arange(params.num_tokens)]).to(mask.device)
            mask = mask[order][:, order]
        for block in self.blocks:
            block.attn.reference_mask = mask

    def clear_gna_reference(self) -> None:
        for block in self.blocks:
            block.attn.reference_mask = None


def make_inputs(batch: int, in_channels: int, video: tuple[int, int, int], text_tokens: int, context_tokens: int,
                text_dim: int, *, dtype=torch.float32, device=None, requires_grad: bool = False,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Random ``(video, text, context)`` inputs for :class:`TinyDiT`."""
    def rand(*shape):
        t = torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    return (rand(batch, in_channels, *video), rand(batch, text_tokens, text_dim), rand(batch, context_tokens, text_dim))


def grid_of(video: tuple[int, int, int], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(v // p for v, p in zip(video, patch))


__all__ = ["TinyDiT", "make_inputs", "grid_of"]
