"""Discrete DDPM noise schedules, seen as the sigmas of the equivalent VE diffusion.

A discrete model trained at timesteps t = 0..T-1 with cumulative alphas `alphas_cumprod[t]` sees
x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps; dividing by sqrt(a_t) gives x0 + sigma_t eps with
sigma_t = sqrt((1 - a_t) / a_t), which is the form every sampler here works in (Karras et al. 2022).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]


def make_betas(
    kind: BetaSchedule, timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012
) -> torch.Tensor:
    """Betas in float64. `scaled_linear` is SD's (linear in sqrt(beta)); cosine is Nichol & Dhariwal 2021."""
    if kind == "linear":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = torch.arange(timesteps, dtype=torch.float64)
        betas = [
            min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), 0.999) for i in steps.tolist()
        ]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {kind!r}; choose linear, scaled_linear or squaredcos_cap_v2")


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last timestep has zero SNR (Lin et al. 2023, Alg. 1)."""
    sqrt_ab = alphas_cumprod.sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    return sqrt_ab**2


@dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """The T sigmas of a discrete model, ascending in t, with timestep <-> sigma conversion."""

    alphas_cumprod: torch.Tensor  # (T,) float64

    @classmethod
    def from_betas(cls, betas: torch.Tensor, zero_terminal_snr: bool = False) -> DiscreteSchedule:
        alphas_cumprod = torch.cumprod(1.0 - betas.double(), dim=0)
        if zero_terminal_snr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
            # An infinite sigma cannot be sampled from; keep it finite like other SD codebases do.
            alphas_cumprod[-1] = 4.8973451890853435e-08
        return cls(alphas_cumprod)

    @classmethod
    def from_sigmas(cls, sigmas: torch.Tensor) -> DiscreteSchedule:
        """The schedule whose VE sigmas are `sigmas` (ascending): alphas_cumprod = 1 / (1 + sigma^2)."""
        return cls(1 / (1 + sigmas.double() ** 2))

    @classmethod
    def stable_diffusion(cls, zero_terminal_snr: bool = False) -> DiscreteSchedule:
        """The schedule of every SD 1.x / 2.x / XL model (scaled_linear 0.00085 -> 0.012, 1000 steps)."""
        return cls.from_betas(make_betas("scaled_linear"), zero_terminal_snr)

    @property
    def sigmas(self) -> torch.Tensor:
        """sigma_t = sqrt((1 - a_t) / a_t), the VE noise level of timestep t."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at a (possibly fractional) timestep, interpolating log-sigma linearly."""
        log_sigmas = self.sigmas.log().to(t.device)
        t = t.double().clamp(0, len(log_sigmas) - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The fractional timestep whose sigma is `sigma` (inverse of `t_to_sigma`)."""
        log_sigmas = self.sigmas.log().to(sigma.device)
        log_sigma = sigma.double().clamp(min=1e-10).log()
        high = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
        low = high - 1
        w = ((log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])).clamp(0, 1)
        return low + w
