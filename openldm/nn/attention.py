"""The one attention function every model uses."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["sdpa", "math"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    backend: Backend = "sdpa",
) -> torch.Tensor:
    """Multi-head attention over (batch, tokens, heads * dim) inputs; returns the same layout.

    `sdpa` lets PyTorch pick a fused kernel; `math` is the explicit softmax(QK^T/sqrt(d))V,
    kept as a readable reference and for debugging numerics.
    """
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    if backend == "sdpa":
        # The CPU's fused (flash) kernel needs a unit stride in the last dim; given transposed
        # inputs (the VAE's 1x1-conv q, k, v) SDPA silently falls back to the math path, which
        # holds about 2.3 tokens^2 floats per head: 2.3 GiB for a 1024 px SD decode.
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    elif backend == "math":
        weights = (q @ k.transpose(-2, -1)) * d**-0.5
        if causal:
            keep = torch.ones(n, k.shape[2], dtype=torch.bool, device=q.device).tril()
            weights = weights.masked_fill(~keep, float("-inf"))
        if mask is not None:
            boolean = mask.dtype == torch.bool
            weights = weights.masked_fill(~mask, float("-inf")) if boolean else weights + mask
        out = weights.softmax(dim=-1) @ v
    else:
        raise ValueError(f"unknown attention backend {backend!r}; choose 'sdpa' or 'math'")
    return out.transpose(1, 2).reshape(b, n, inner)
