"""Sinusoidal embeddings of scalars: diffusion timesteps, and SDXL's image sizes and crop offsets."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """Embed each number of `t` as `[cos, sin]` of geometric frequencies (ldm's order, cos first).

    Frequencies run from 1 down to 1/max_period over dim/2 channels (Vaswani et al. 2017). Works on
    any shape, adding a trailing `dim` axis: (batch,) -> (batch, dim); SDXL's (batch, n) size
    conditions -> (batch, n, dim), which `.flatten(1)` turns into sgm's concatenated embedding.
    The result is float32 whatever the input dtype, so large sizes keep their precision.
    """
    half = dim // 2
    # (-log(max_period) * k) / half, in this order, is bit-identical to ldm's and diffusers' float32.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb
