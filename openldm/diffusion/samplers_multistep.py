"""Multistep exponential-integrator samplers (UniPC, DEIS, iPNDM) and Restart sampling, over a denoiser.

All work in VE form (x = x0 + sigma eps) with sigmas decreasing to 0, like `samplers.py`. UniPC and DEIS
reproduce diffusers' `UniPCMultistepScheduler` and `DEISMultistepScheduler` given the sigmas of their
timesteps, iPNDM diffusers' `IPNDMScheduler` given its sigmas (tests/test_samplers_multistep.py).
Step coefficients are computed in float64 from the sigmas, whatever the dtype of x.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from openldm.diffusion.samplers import (
    Callback,
    Denoiser,
    NoiseSampler,
    _denoise,
    _heun_update,
    _report,
    default_noise_sampler,
    to_d,
)
from openldm.diffusion.samplers_discrete import adams_bashforth

History = list[tuple[torch.Tensor, float]]  # (denoised or eps, sigma), newest first

# UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), data prediction, in
# lambda = -log sigma. A predictor of order p uses the p newest denoised values; the corrector (UniC)
# re-does the step once the denoised value at its end is known, raising the order by one.


def _unipc_rhs(hh: float, n: int, variant: str) -> tuple[float, list[float]]:
    """B(h) and g_k = k! hh phi_{k+1}(hh) / B(h), k = 1..n, with hh = -h (Zhao et al. 2023)."""
    b_h = hh if variant == "bh1" else math.expm1(hh)
    g, h_phi, factorial = [], math.expm1(hh) / hh - 1, 1.0  # h_phi = hh phi_2(hh)
    for k in range(1, n + 1):
        g.append(h_phi * factorial / b_h)
        factorial *= k + 1
        h_phi = h_phi / hh - 1 / factorial  # phi_{k+1}(z) = (phi_k(z) - 1/k!) / z
    return b_h, g


def _unipc_step(
    x: torch.Tensor, sigma_next: float, history: History, variant: str, new: torch.Tensor | None = None
) -> torch.Tensor:
    """UniP from x at history[0]'s sigma to sigma_next (order len(history)); with `new`, the denoised
    value at sigma_next, UniC of the same order instead."""
    denoised, sigma = history[0]
    if sigma_next == 0:  # only first order reaches 0 (lambda = inf): the step is the plain denoise
        return denoised
    h = math.log(sigma / sigma_next)
    rs = [math.log(sigma / s) / h for _, s in history[1:]]
    ds = [(d - denoised) / r for (d, _), r in zip(history[1:], rs)]
    if new is not None:
        rs, ds = [*rs, 1.0], [*ds, new - denoised]
    x = (sigma_next / sigma) * x - math.expm1(-h) * denoised
    if not rs:
        return x
    b_h, g = _unipc_rhs(-h, len(rs), variant)
    rhos = [0.5] if len(rs) == 1 else np.linalg.solve(np.vander(rs, increasing=True).T, g).tolist()
    return x - b_h * sum(rho * d for rho, d in zip(rhos, ds))


@torch.no_grad()
def sample_unipc(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
    order: int = 2, variant: Literal["bh1", "bh2"] = "bh2", disable_corrector: Sequence[int] = (),
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023) with data prediction: UniP-`order` steps, each corrected by UniC.

    As in diffusers, the first steps warm up from order 1, the last `order - 1` steps lower their order
    (the step to sigma = 0 is a plain denoise), and the denoised value at the uncorrected point is
    reused after correcting it. `disable_corrector` lists the steps i whose result is left uncorrected.
    The callback sees x before its correction, with the denoised value computed there. With the
    corrector the global order is `order + 1`.
    """
    if order not in (1, 2, 3) or variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC needs order 1, 2 or 3 and variant bh1 or bh2, got {order}, {variant!r}")
    history: History = []
    n, x_start, last_order = len(sigmas) - 1, x, 0
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = _denoise(denoiser, x, sigmas[i])
        _report(callback, i, x, sigmas[i], denoised)
        if history and i - 1 not in disable_corrector:
            x = _unipc_step(x_start, sigma, history[:last_order], variant, new=denoised)
        history = [(denoised, sigma), *history][:order]
        x_start, last_order = x, min(order, n - i, len(history))
        x = _unipc_step(x, sigma_next, history[:last_order], variant)
    return x


# DEIS (Zhang & Chen 2022, "Fast Sampling of Diffusion Models with Exponential Integrator"): in VE form
# the exponential integrator is x_next = x + integral of eps d(rho) with rho = sigma; eps is extrapolated
# by the polynomial in log rho through the newest `order` values (diffusers' "logrho" DEIS).


def _integral_exp_poly(coeffs: list[float], rho: float, rho_0: float) -> float:
    """F(rho) = rho sum_k (-1)^k p^(k)(log(rho / rho_0)) for p with `coeffs` (lowest first): the
    antiderivative of p(log(rho / rho_0)) in rho, with F(0) = 0 (its limit)."""
    if rho == 0:
        return 0.0
    w, total, sign = math.log(rho / rho_0), 0.0, 1.0
    while coeffs:
        total += sign * sum(c * w**k for k, c in enumerate(coeffs))
        coeffs, sign = [k * c for k, c in enumerate(coeffs)][1:], -sign  # the derivative
    return rho * total


def _lagrange_basis(nodes: list[float], j: int) -> list[float]:
    """Coefficients (lowest first) of the Lagrange polynomial that is 1 at nodes[j], 0 at the others."""
    coeffs = [1.0]
    for k, node in enumerate(nodes):
        if k != j:
            scale = nodes[j] - node
            coeffs = [(a - node * b) / scale for a, b in zip([0.0, *coeffs], [*coeffs, 0.0])]
    return coeffs


def _deis_coefficients(sigmas: list[float], sigma_next: float) -> list[float]:
    """The integrals from sigmas[0] to sigma_next of the Lagrange basis in log sigma through `sigmas`."""
    start = sigmas[0]
    ws = [math.log(s / start) for s in sigmas]  # nodes, centred on the step start
    return [
        _integral_exp_poly(basis, sigma_next, start) - _integral_exp_poly(basis, start, start)
        for basis in (_lagrange_basis(ws, j) for j in range(len(ws)))
    ]


@torch.no_grad()
def sample_deis(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
    order: int = 3, lower_order_final: bool = True,
) -> torch.Tensor:
    """Multistep DEIS (Zhang & Chen 2022) with eps extrapolated in log sigma, order 1..3.

    Orders warm up from 1. With `lower_order_final`, runs of fewer than 15 steps end with orders 2 and 1,
    a stabilisation from DPM-Solver that diffusers applies. A step to sigma = 0 is first order (the plain
    denoise), as in the other samplers: a polynomial in log sigma is not extrapolated down to log 0.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"DEIS order must be 1, 2 or 3, got {order}")
    n, history = len(sigmas) - 1, []  # history: (eps, sigma), newest first
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = _denoise(denoiser, x, sigmas[i])
        _report(callback, i, x, sigmas[i], denoised)
        history = [(to_d(x, sigmas[i], denoised), sigma), *history][:order]
        this_order = min(order, n - i) if lower_order_final and n < 15 else order
        this_order = 1 if sigma_next == 0 else this_order
        used = history[:this_order]
        coeffs = _deis_coefficients([s for _, s in used], sigma_next)
        x = x + sum(c * eps for c, (eps, _) in zip(coeffs, used))
    return x


@torch.no_grad()
def sample_ipndm(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
    order: int = 4,
) -> torch.Tensor:
    """Improved PNDM (Zhang & Chen 2022): PLMS without its pseudo-Heun start.

    Equal-step Adams-Bashforth of orders 1, 2, 3, then `order` on eps, with DDIM transfers
    (x + eps (sigma_next - sigma) in VE form): one evaluation per step.
    """
    if order not in (1, 2, 3, 4):
        raise ValueError(f"iPNDM order must be 1..4, got {order}")
    history: list[torch.Tensor] = []  # eps, newest first
    for i in range(len(sigmas) - 1):
        denoised = _denoise(denoiser, x, sigmas[i])
        _report(callback, i, x, sigmas[i], denoised)
        history = [to_d(x, sigmas[i], denoised), *history][:order]
        x = x + adams_bashforth(history) * (sigmas[i + 1] - sigmas[i])
    return x


# Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes").


@dataclass(frozen=True)
class RestartInterval:
    """On reaching `sigma_min`, jump `repeats` times up to `sigma_max` with fresh noise, each time
    followed by `steps` Heun steps back down (Karras-spaced, rho = 7, as in the paper)."""

    sigma_min: float
    sigma_max: float
    steps: int = 10
    repeats: int = 2


DEFAULT_RESTARTS = (RestartInterval(sigma_min=0.1, sigma_max=2.0),)


def _karras_between(n: int, sigma_lo: float, sigma_hi: float, like: torch.Tensor) -> torch.Tensor:
    """n + 1 sigmas from sigma_hi to sigma_lo spaced in sigma^(1/7), both ends exact."""
    ramp = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    sigmas = (sigma_hi ** (1 / 7) + ramp * (sigma_lo ** (1 / 7) - sigma_hi ** (1 / 7))) ** 7
    sigmas[0], sigmas[-1] = sigma_hi, sigma_lo
    return sigmas.to(like)


def restart_plan(
    sigmas: torch.Tensor, restarts: Sequence[RestartInterval]
) -> dict[int, list[RestartInterval]]:
    """Where each restart happens: index j of the sampling sigma nearest sigma_min (0 < j < n)."""
    plan: dict[int, list[RestartInterval]] = {}
    if restarts and len(sigmas) < 3:
        raise ValueError("restarts need a sampling sigma between the first and the last")
    log_sigmas = sigmas[1:-1].double().log()
    for restart in restarts:
        j = 1 + int((log_sigmas - math.log(restart.sigma_min)).abs().argmin())
        if not restart.sigma_max > float(sigmas[j]) or restart.steps < 1:
            raise ValueError(f"{restart} is empty once sigma_min is snapped to sigma {float(sigmas[j]):.4g}")
        plan.setdefault(j, []).append(restart)
    return plan


def _heun_steps(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None, i: int
) -> tuple[torch.Tensor, int]:
    """Heun steps along `sigmas`, reported from step number i; returns x and the next step number."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = _denoise(denoiser, x, sigma)
        _report(callback, i, x, sigma, denoised)
        x, i = _heun_update(denoiser, x, denoised, sigma, sigma_next), i + 1
    return x, i


@torch.no_grad()
def sample_restart(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
    restarts: Sequence[RestartInterval] = DEFAULT_RESTARTS, s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """Restart sampling (Xu et al. 2023): Heun ODE steps, plus restart intervals that add noise back.

    Each restart draws `noise_sampler(sigma_max, sigma_min)`; repeats need independent draws (a
    Brownian-tree sampler would repeat one). The callback sees every Heun step, restart ones included,
    numbered in order: len(sigmas) - 1 + sum of steps * repeats in all.
    """
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    plan, step = restart_plan(sigmas, restarts), 0
    for i in range(len(sigmas) - 1):
        x, step = _heun_steps(denoiser, x, sigmas[i:i + 2], callback, step)
        for restart in plan.get(i + 1, ()):
            sub = _karras_between(restart.steps, float(sigmas[i + 1]), restart.sigma_max, sigmas)
            for _ in range(restart.repeats):
                noise = noise_sampler(sub[0], sub[-1]) * s_noise * (sub[0] ** 2 - sub[-1] ** 2) ** 0.5
                x, step = _heun_steps(denoiser, x + noise, sub, callback, step)
    return x
