"""Samplers: plain functions `sample_x(denoiser, x, sigmas, *, ...) -> x` over a denoiser.

A denoiser is any callable `denoiser(x, sigma) -> denoised` where `sigma` has shape (batch,); the
conditioning is bound inside it (see `denoisers.py`). `sigmas` is a 1-D tensor of n+1 noise levels
ending in 0. `x` starts at noise scaled by `sigmas[0]` (VE form, Karras et al. 2022).
Samplers never look inside the model; the caller owns progress bars through `callback`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (sigma, sigma_next) -> noise


@dataclass(frozen=True)
class Step:
    """What a sampler reports to its callback after each step."""

    i: int
    x: torch.Tensor
    sigma: torch.Tensor
    sigma_hat: torch.Tensor
    denoised: torch.Tensor


Callback = Callable[[Step], None]


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dimensions so a per-sample value broadcasts over x."""
    return x[(...,) + (None,) * (ndim - x.ndim)]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative dx/dsigma."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def ancestral_step(
    sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a step to `sigma_to` into a deterministic part to `sigma_down` and fresh noise `sigma_up`."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(
        sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    )
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def default_noise_sampler(x: torch.Tensor, generator: torch.Generator | None = None) -> NoiseSampler:
    """Fresh Gaussian noise shaped like x at every call (pipelines pass a seeded one instead)."""
    return lambda sigma, sigma_next: torch.randn(
        x.shape, generator=generator, dtype=x.dtype, device=x.device
    )
