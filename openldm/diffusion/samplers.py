"""Samplers: plain functions `sample_x(denoiser, x, sigmas, *, ...) -> x` over a denoiser.

A denoiser is any callable `denoiser(x, sigma) -> denoised` where `sigma` has shape (batch,); the
conditioning is bound inside it (see `denoisers.py`). `sigmas` is a 1-D tensor of n+1 noise levels
ending in 0. `x` starts at noise scaled by `sigmas[0]` (VE form, Karras et al. 2022).
Samplers never look inside the model; the caller owns progress bars through `callback`.

Stochastic samplers draw noise as `noise_sampler(sigma, sigma_next)` (default: `default_noise_sampler(x)`)
at the same places and as many times as k-diffusion's samplers do, so one noise sampler gives one
trajectory in both. One deliberate difference: DPM-2 ancestral adds its noise even when sigma_down = 0.

diffusers' Euler, Euler ancestral, Heun, KDPM2 (ancestral) and LMS schedulers compute the same steps on
the sigmas of their timesteps (tests/test_samplers_diffusers.py).

This module holds the shared primitives and the Euler, Heun, DPM-2, ancestral and LMS samplers; the
DPM-Solver family is in `dpm_solver.py`, the discrete-time and multistep samplers in `samplers_discrete.py`
and `samplers_multistep.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
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


def _denoise(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Call the denoiser at one noise level for the whole batch."""
    return denoiser(x, sigma * x.new_ones([x.shape[0]]))


def _report(
    callback: Callback | None, i: int, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor,
    sigma_hat: torch.Tensor | None = None,
) -> None:
    if callback is not None:
        callback(Step(i, x, sigma, sigma if sigma_hat is None else sigma_hat, denoised))


# Euler, Heun and DPM-2 with "churn" (Karras et al. 2022, Algorithm 2).

StepFn = Callable[[Denoiser, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _euler_update(
    denoiser: Denoiser, x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_to: torch.Tensor
) -> torch.Tensor:
    """One Euler step of the probability-flow ODE in sigma; to sigma_to = 0 it returns `denoised`."""
    return x + to_d(x, sigma, denoised) * (sigma_to - sigma)


def _heun_update(
    denoiser: Denoiser, x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_to: torch.Tensor
) -> torch.Tensor:
    """Heun's method (trapezoidal corrector); the last step to sigma = 0 stays Euler (Karras et al. 2022)."""
    d = to_d(x, sigma, denoised)
    x_euler = x + d * (sigma_to - sigma)
    if sigma_to == 0:
        return x_euler
    d_2 = to_d(x_euler, sigma_to, _denoise(denoiser, x_euler, sigma_to))
    return x + (d + d_2) / 2 * (sigma_to - sigma)


def _dpm_2_update(
    denoiser: Denoiser, x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_to: torch.Tensor
) -> torch.Tensor:
    """Midpoint method with the midpoint taken in log sigma, as in DPM-Solver-2 (Lu et al. 2022)."""
    if sigma_to == 0:
        return _euler_update(denoiser, x, denoised, sigma, sigma_to)
    sigma_mid = sigma.log().lerp(sigma_to.log(), 0.5).exp()
    x_mid = x + to_d(x, sigma, denoised) * (sigma_mid - sigma)
    d_mid = to_d(x_mid, sigma_mid, _denoise(denoiser, x_mid, sigma_mid))
    return x + d_mid * (sigma_to - sigma)


def _churn(
    x: torch.Tensor, sigma: torch.Tensor, n_steps: int, noise: Callable[[], torch.Tensor],
    s_churn: float, s_tmin: float, s_tmax: float, s_noise: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raise x from sigma to sigma_hat = (1 + gamma) sigma with fresh noise (Karras et al. 2022, Alg. 2)."""
    gamma = min(s_churn / n_steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + noise() * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


def _sample_churned(
    update: StepFn, denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None,
    noise_sampler: NoiseSampler | None, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float,
) -> torch.Tensor:
    """The loop shared by Euler, Heun and DPM-2: optional churn, denoise, report, one ODE step.

    Churn noise is `noise_sampler(sigmas[i], sigmas[i + 1])`, drawn only on steps whose gamma is > 0.
    """
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    n_steps = len(sigmas) - 1
    for i in range(n_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        noise = partial(noise_sampler, sigma, sigma_next)
        x, sigma_hat = _churn(x, sigma, n_steps, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = _denoise(denoiser, x, sigma_hat)
        _report(callback, i, x, sigma, denoised, sigma_hat)
        x = update(denoiser, x, denoised, sigma_hat, sigma_next)
    return x


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """Euler steps with optional churn (Karras et al. 2022, Algorithm 2 with Euler steps)."""
    return _sample_churned(
        _euler_update, denoiser, x, sigmas, callback, noise_sampler, s_churn, s_tmin, s_tmax, s_noise
    )


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """Heun steps with optional churn (Karras et al. 2022, Algorithm 2)."""
    return _sample_churned(
        _heun_update, denoiser, x, sigmas, callback, noise_sampler, s_churn, s_tmin, s_tmax, s_noise
    )


@torch.no_grad()
def sample_dpm_2(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """Karras et al. 2022 Algorithm 2 with DPM-Solver-2 midpoint steps (Lu et al. 2022)."""
    return _sample_churned(
        _dpm_2_update, denoiser, x, sigmas, callback, noise_sampler, s_churn, s_tmin, s_tmax, s_noise
    )


# Ancestral samplers: a deterministic step down to sigma_down, then fresh noise up to sigma_next.


def _sample_ancestral(
    update: StepFn, denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None,
    eta: float, s_noise: float, noise_sampler: NoiseSampler | None,
) -> torch.Tensor:
    """The loop shared by the ancestral samplers: `update` to sigma_down, then noise of std sigma_up."""
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoiser, x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        _report(callback, i, x, sigma, denoised)
        x = update(denoiser, x, denoised, sigma, sigma_down)
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
    eta: float = 1.0, s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """Ancestral sampling with Euler steps (Ho et al. 2020's ancestral sampler in VE form)."""
    return _sample_ancestral(_euler_update, denoiser, x, sigmas, callback, eta, s_noise, noise_sampler)


@torch.no_grad()
def sample_dpm_2_ancestral(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
    eta: float = 1.0, s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """Ancestral sampling with DPM-Solver-2 midpoint steps (Lu et al. 2022)."""
    return _sample_ancestral(_dpm_2_update, denoiser, x, sigmas, callback, eta, s_noise, noise_sampler)


# Linear multistep.


def _lms_coefficients(sigmas: list[float], i: int, order: int) -> list[float]:
    """Integrals over [sigma_i, sigma_i+1] of the Lagrange basis through sigma_i, sigma_i-1, ...

    The basis has degree order - 1, so `order`-point Gauss-Legendre quadrature integrates it exactly.
    """
    nodes, weights = np.polynomial.legendre.leggauss(order)
    a, b = sigmas[i], sigmas[i + 1]
    tau, weights = (b - a) / 2 * nodes + (a + b) / 2, (b - a) / 2 * weights
    knots = [sigmas[i - k] for k in range(order)]
    coeffs = []
    for j in range(order):
        basis = np.ones_like(tau)
        for k in range(order):
            if k != j:
                basis *= (tau - knots[k]) / (knots[j] - knots[k])
        coeffs.append(float((weights * basis).sum()))
    return coeffs


@torch.no_grad()
def sample_lms(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
    order: int = 4,
) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth on the uneven sigma grid) over the last `order` derivatives."""
    sigmas_list = sigmas.tolist()
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = _denoise(denoiser, x, sigmas[i])
        ds = [to_d(x, sigmas[i], denoised), *ds][:order]  # newest first
        _report(callback, i, x, sigmas[i], denoised)
        coeffs = _lms_coefficients(sigmas_list, i, len(ds))
        x = x + sum(c * d for c, d in zip(coeffs, ds))
    return x
