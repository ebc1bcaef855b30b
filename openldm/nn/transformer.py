"""The UNet's spatial transformer, in ldm's parameter names.

A spatial transformer treats each pixel of a feature map as a token: self-attention among pixels,
cross-attention from pixels to the text tokens (`context`), then a GEGLU feed-forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openldm.nn.attention import Backend, attention
from openldm.nn.blocks import GroupNorm32, checkpointed, zero_init


class CrossAttention(nn.Module):
    """Multi-head attention from `x` to `context` (to `x` itself when no context is given)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.backend: Backend = "sdpa"
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        # ldm's `to_out` is Sequential(Linear, Dropout); only the Linear holds weights, hence `to_out.0`.
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out[0](attention(q, k, v, self.heads, backend=self.backend))


class GEGLU(nn.Module):
    """A linear layer to twice the width, one half gating the other through GELU (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to 4x the width and back."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # ldm's net is (GEGLU, Dropout, Linear); the weightless Dropout (rate 0 in every SD model)
        # is kept as an Identity so that the output layer stays `net.2`.
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context, feed-forward; each residual.

    `self_attn=False` (ldm's `disable_self_attn`, the x4 upscaler's outer levels): `attn1` attends to
    the context too, so the block has two cross-attentions and no pixel-to-pixel attention.
    """

    def __init__(self, dim: int, heads: int, context_dim: int, self_attn: bool = True):
        super().__init__()
        self.gradient_checkpointing = False
        self.self_attn = self_attn
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, heads, None if self_attn else context_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return checkpointed(self.gradient_checkpointing, self._forward, x, context)

    def _forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), None if self.self_attn else context)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer blocks over the pixels of a feature map, added back to it.

    `proj_in`/`proj_out` are 1x1 convolutions on the map in SD1 and linear layers on the tokens in
    SD2 and SDXL (`use_linear`): the same arithmetic, stored with different weight shapes.
    """

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, use_linear: bool,
                 groups: int = 32, self_attn: bool = True):
        super().__init__()
        self.use_linear = use_linear
        # The originals use eps 1e-6 here, 1e-5 elsewhere.
        self.norm = GroupNorm32(channels, eps=1e-6, groups=groups)
        proj = nn.Linear if use_linear else lambda i, o: nn.Conv2d(i, o, 1)
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim, self_attn) for _ in range(depth)
        )
        self.proj_out = zero_init(proj(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (b, h*w, c): one token per pixel
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, c, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in
