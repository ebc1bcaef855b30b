"""The DPM-Solver family over a denoiser: DPM-Solver fast/adaptive and the DPM-Solver++ samplers.

DPM-Solver (Lu et al. 2022) integrates the probability-flow ODE in t = -log sigma with the model's eps;
DPM-Solver++ (Lu et al. 2022b) does it over the data prediction, which is what guided sampling wants.
Same conventions as `samplers.py` (sigmas decreasing to 0, noise drawn where k-diffusion draws it);
split out of it to keep each file readable. One deliberate difference from k-diffusion: DPM-Solver
fast/adaptive draw no noise when eta = 0. On a discrete schedule, 2M, 2M SDE (midpoint and heun) and 3M
SDE at eta = 0 are diffusers' `DPMSolverMultistepScheduler` and DPM++ SDE its `DPMSolverSDEScheduler`
(tests/test_samplers_diffusers.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from openldm.diffusion.samplers import (
    Callback,
    Denoiser,
    NoiseSampler,
    _denoise,
    _euler_update,
    _report,
    _sample_ancestral,
    ancestral_step,
    default_noise_sampler,
)

# DPM-Solver++(2S) ancestral: the ancestral loop of `samplers.py` with a DPM-Solver++ midpoint step.


def _dpmpp_1(
    x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_to: torch.Tensor
) -> torch.Tensor:
    """First-order DPM-Solver++ (= DDIM) step in log sigma; to sigma_to = 0 it returns `denoised`."""
    h = sigma.log() - sigma_to.log()
    return (sigma_to / sigma) * x - (-h).expm1() * denoised


def _dpmpp_2s_update(
    denoiser: Denoiser, x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_to: torch.Tensor
) -> torch.Tensor:
    """DPM-Solver++(2S) with its stage at the log-sigma midpoint (Lu et al. 2022b, Alg. 1, r = 1/2)."""
    if sigma_to == 0:
        return _euler_update(denoiser, x, denoised, sigma, sigma_to)
    sigma_mid = sigma.log().lerp(sigma_to.log(), 0.5).exp()
    x_mid = _dpmpp_1(x, denoised, sigma, sigma_mid)
    return _dpmpp_1(x, _denoise(denoiser, x_mid, sigma_mid), sigma, sigma_to)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
    eta: float = 1.0, s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022b)."""
    return _sample_ancestral(_dpmpp_2s_update, denoiser, x, sigmas, callback, eta, s_noise, noise_sampler)


# DPM-Solver in time t = -log sigma, with model eps = (x - denoised) / sigma (Lu et al. 2022).


def _dpm_eps(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    sigma = t.neg().exp()
    return (x - _denoise(denoiser, x, sigma)) / sigma


def _dpm_step(
    denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, eps: torch.Tensor, order: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A DPM-Solver-`order` step and the embedded step of one order lower (Lu et al. 2022).

    Order 2 uses r1 = 1/2; order 3 uses r1 = 1/3, r2 = 2/3 and embeds DPM-Solver-2 with r1 = 1/3.
    """
    h = t_next - t
    sigma_next = t_next.neg().exp()
    x_1 = x - sigma_next * h.expm1() * eps
    if order == 1:
        return x_1, x_1
    r1 = 1 / 2 if order == 2 else 1 / 3
    s1 = t + r1 * h
    u1 = x - s1.neg().exp() * (r1 * h).expm1() * eps
    eps_1 = _dpm_eps(denoiser, u1, s1)
    x_2 = x_1 - sigma_next / (2 * r1) * h.expm1() * (eps_1 - eps)
    if order == 2:
        return x_1, x_2
    r2 = 2 / 3
    s2 = t + r2 * h
    phi = (r2 * h).expm1()
    u2 = x - s2.neg().exp() * phi * eps - s2.neg().exp() * (r2 / r1) * (phi / (r2 * h) - 1) * (eps_1 - eps)
    eps_2 = _dpm_eps(denoiser, u2, s2)
    return x_2, x_1 - sigma_next / r2 * (h.expm1() / h - 1) * (eps_2 - eps)


def _dpm_ancestral(
    t: torch.Tensor, t_next: torch.Tensor, t_end: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Where the deterministic part of a step from t to t_next ends, and the std of the noise added after."""
    if not eta:
        return t_next, 0.0
    sigma_down, _ = ancestral_step(t.neg().exp(), t_next.neg().exp(), eta)
    t_down = torch.minimum(t_end, -sigma_down.log())
    return t_down, (t_next.neg().exp() ** 2 - t_down.neg().exp() ** 2).clamp(min=0) ** 0.5


def _dpm_times(x: torch.Tensor, sigma_min: float, sigma_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    t = -torch.tensor([sigma_max, sigma_min], dtype=x.dtype, device=x.device).log()
    return t[0], t[1]


def _dpm_fast_orders(nfe: int) -> list[int]:
    """DPM-Solver-fast's floor(nfe / 3) + 1 steps, third order but the last one or two (Lu et al. 2022)."""
    if nfe < 1:
        raise ValueError(f"dpm_fast needs at least one model evaluation, got n={nfe}")
    m = nfe // 3 + 1
    return [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]


@torch.no_grad()
def sample_dpm_fast(
    denoiser: Denoiser, x: torch.Tensor, sigma_min: float, sigma_max: float, n: int, *,
    callback: Callback | None = None, eta: float = 0.0, s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """DPM-Solver-fast: `n` model evaluations on steps uniform in log sigma (Lu et al. 2022).

    Ends at sigma_min, without a final denoise. With eta > 0 each step is made ancestral.
    """
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    t_start, t_end = _dpm_times(x, sigma_min, sigma_max)
    orders = _dpm_fast_orders(n)
    ts = torch.linspace(float(t_start), float(t_end), len(orders) + 1, dtype=x.dtype, device=x.device)
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        t_down, sigma_up = _dpm_ancestral(t, t_next, t_end, eta)
        eps = _dpm_eps(denoiser, x, t)
        _report(callback, i, x, t.neg().exp(), x - t.neg().exp() * eps)
        x = _dpm_step(denoiser, x, t, t_down, eps, order)[1]
        if eta:
            x = x + sigma_up * s_noise * noise_sampler(t.neg().exp(), t_next.neg().exp())
    return x


@dataclass
class AdaptiveInfo:
    """Counters of a `dpm_solver_adaptive` run: attempted steps, model evaluations, accepts, rejects."""

    steps: int = 0
    nfe: int = 0
    n_accept: int = 0
    n_reject: int = 0


@dataclass
class _PIDController:
    """Step size control by a digital PID filter (Söderlind 2003) with limiter 1 + atan(f - 1)."""

    h: float
    betas: tuple[float, float, float]
    accept_safety: float
    inv_errors: list[float] = field(default_factory=list)  # newest first

    @classmethod
    def make(cls, h: float, p: float, i: float, d: float, order: float, safety: float) -> _PIDController:
        return cls(h, ((p + i + d) / order, -(p + 2 * d) / order, d / order), safety)

    def propose(self, error: float, eps: float = 1e-8) -> bool:
        """Rescale h from the new error; say whether the step that had this error is accepted."""
        inv_error = 1 / (error + eps)
        self.inv_errors = [inv_error, *(self.inv_errors or [inv_error] * 3)[1:]]
        factor = math.prod(e**b for e, b in zip(self.inv_errors, self.betas))
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.inv_errors = [inv_error, *self.inv_errors[:2]]
        self.h *= factor
        return accept


@torch.no_grad()
def dpm_solver_adaptive(
    denoiser: Denoiser, x: torch.Tensor, sigma_min: float, sigma_max: float, *,
    callback: Callback | None = None, order: int = 3, rtol: float = 0.05, atol: float = 0.0078,
    h_init: float = 0.05, pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0,
    accept_safety: float = 0.81, eta: float = 0.0, s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> tuple[torch.Tensor, AdaptiveInfo]:
    """DPM-Solver-12 / -23 with embedded error estimates and PID step size control (Lu et al. 2022)."""
    if order not in (2, 3):
        raise ValueError(f"dpm_adaptive order must be 2 or 3, got {order}")
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s, t_end = _dpm_times(x, sigma_min, sigma_max)
    pid = _PIDController.make(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    info, x_prev = AdaptiveInfo(), x
    while s < t_end - 1e-5:
        t = torch.minimum(t_end, s + pid.h)
        t_down, sigma_up = _dpm_ancestral(s, t, t_end, eta)
        eps = _dpm_eps(denoiser, x, s)
        x_low, x_high = _dpm_step(denoiser, x, s, t_down, eps, order)
        scale = (rtol * torch.maximum(x_low.abs(), x_prev.abs())).clamp(min=atol)
        error = torch.linalg.vector_norm((x_low - x_high) / scale) / x.numel() ** 0.5
        info.steps, info.nfe = info.steps + 1, info.nfe + order
        if not pid.propose(float(error)):
            info.n_reject += 1
            continue
        _report(callback, info.n_accept, x, s.neg().exp(), x - s.neg().exp() * eps)
        x, x_prev = x_high, x_low
        if eta:
            x = x + sigma_up * s_noise * noise_sampler(s.neg().exp(), t.neg().exp())
        s, info.n_accept = t, info.n_accept + 1
    return x, info


@torch.no_grad()
def sample_dpm_adaptive(
    denoiser: Denoiser, x: torch.Tensor, sigma_min: float, sigma_max: float, *,
    callback: Callback | None = None, order: int = 3, rtol: float = 0.05, atol: float = 0.0078,
    h_init: float = 0.05, pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0,
    accept_safety: float = 0.81, eta: float = 0.0, s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """Adaptive DPM-Solver from sigma_max to sigma_min; `dpm_solver_adaptive` also returns its counters."""
    return dpm_solver_adaptive(
        denoiser, x, sigma_min, sigma_max, callback=callback, order=order, rtol=rtol, atol=atol,
        h_init=h_init, pcoeff=pcoeff, icoeff=icoeff, dcoeff=dcoeff, accept_safety=accept_safety,
        eta=eta, s_noise=s_noise, noise_sampler=noise_sampler,
    )[0]


# DPM-Solver++ (Lu et al. 2022b): exponential integrators in log sigma over the data prediction.


@torch.no_grad()
def sample_dpmpp_sde(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
    eta: float = 1.0, s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None, r: float = 1 / 2,
) -> torch.Tensor:
    """Stochastic DPM-Solver++ with an ancestral stage at log-sigma fraction r of each step.

    Draws noise twice per step, over (sigma, sigma_stage) and over (sigma, sigma_next): with a
    Brownian-tree noise sampler the two are the consistent increments of one path.
    """
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoiser, x, sigma)
        _report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            x = _euler_update(denoiser, x, denoised, sigma, sigma_next)
            continue
        sigma_stage = sigma.log().lerp(sigma_next.log(), r).exp()
        sigma_down, sigma_up = ancestral_step(sigma, sigma_stage, eta)
        x_stage = _dpmpp_1(x, denoised, sigma, sigma_down)
        x_stage = x_stage + noise_sampler(sigma, sigma_stage) * s_noise * sigma_up
        denoised_stage = _denoise(denoiser, x_stage, sigma_stage)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        denoised_mix = (1 - 1 / (2 * r)) * denoised + 1 / (2 * r) * denoised_stage
        x = _dpmpp_1(x, denoised_mix, sigma, sigma_down)
        x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None
) -> torch.Tensor:
    """DPM-Solver++(2M): second order from the previous step's denoised (Lu et al. 2022b, Alg. 2)."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoiser, x, sigma)
        _report(callback, i, x, sigma, denoised)
        h = sigma.log() - sigma_next.log()
        denoised_d = denoised
        if old_denoised is not None and sigma_next > 0:
            c = h / (2 * h_last)  # 1 / (2 r) with r = h_last / h
            denoised_d = (1 + c) * denoised - c * old_denoised
        x = _dpmpp_1(x, denoised_d, sigma, sigma_next)
        old_denoised, h_last = denoised, h
    return x


def _phi_1(h: torch.Tensor) -> torch.Tensor:
    """phi_1(h) = 1 - e^-h, the weight of `denoised` in an exponential-integrator step of length h."""
    return -(-h).expm1()


def _phi_2(h: torch.Tensor) -> torch.Tensor:
    """phi_2(h) = 1 - (1 - e^-h) / h, the weight of the first divided difference."""
    return 1 - _phi_1(h) / h


def _sde_step(
    x: torch.Tensor, denoised: torch.Tensor, h: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order SDE-DPM-Solver++ over a log-sigma step h, noise fraction eta; also returns h (1 + eta)."""
    h_eta = h * (1 + eta)
    return (-h_eta).exp() * x + _phi_1(h_eta) * denoised, h_eta


def _sde_noise_std(sigma_next: torch.Tensor, h: torch.Tensor, eta: float) -> torch.Tensor:
    """Std of the fresh noise that keeps the marginal at sigma_next after `_sde_step`."""
    return sigma_next * _phi_1(2 * eta * h).sqrt()


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
    eta: float = 1.0, s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
    solver_type: str = "midpoint",
) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b); eta = 0 is an ODE; `solver_type` picks the 2nd-order term."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoiser, x, sigma)
        _report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            return denoised
        h = sigma.log() - sigma_next.log()
        x, h_eta = _sde_step(x, denoised, h, eta)
        if old_denoised is not None:
            weight = _phi_2(h_eta) if solver_type == "heun" else _phi_1(h_eta) / 2
            x = x + weight * (h / h_last) * (denoised - old_denoised)
        if eta:
            x = x + noise_sampler(sigma, sigma_next) * _sde_noise_std(sigma_next, h, eta) * s_noise
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
    eta: float = 1.0, s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """SDE-DPM-Solver++(3M): from the two previous denoised (Lu et al. 2022b); eta = 0 is an ODE.

    The second-difference term keeps k-diffusion's weight (as in the DPM-Solver code), half the Taylor
    coefficient: its local error is O(h^3), so it converges at second order, not third.
    """
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    history: list[tuple[torch.Tensor, torch.Tensor]] = []  # (denoised, h) of earlier steps, newest first
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoiser, x, sigma)
        _report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            return denoised
        h = sigma.log() - sigma_next.log()
        x, h_eta = _sde_step(x, denoised, h, eta)
        if len(history) >= 2:
            (denoised_1, h_1), (denoised_2, h_2) = history[:2]
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_2 = _phi_2(h_eta)
            x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
        elif history:
            denoised_1, h_1 = history[0]
            x = x + _phi_2(h_eta) * (denoised - denoised_1) * (h / h_1)
        if eta:
            x = x + noise_sampler(sigma, sigma_next) * _sde_noise_std(sigma_next, h, eta) * s_noise
        history = [(denoised, h), *history[:1]]
    return x
