"""The discrete-time samplers of DDPM-family codebases (DDIM, PLMS, DDPM, LCM), in VE form over a denoiser.

A discrete scheduler steps x_vp = sqrt(a_t) x0 + sqrt(1 - a_t) eps between trained timesteps. Dividing by
sqrt(a_t) gives x = x0 + sigma_t eps (see `schedules.py`), and each scheduler becomes a function of the
sigmas alone: pass the sigmas of the scheduler's timesteps (`sigmas.py`: leading, trailing, linspace, ...)
and these samplers reproduce diffusers' `DDIMScheduler`, `PNDMScheduler` (PLMS), `DDPMScheduler` and
`LCMScheduler` (tests/test_samplers_discrete.py: float64 max abs error under 1e-13).

Ending: diffusers' `set_alpha_to_one=False` (the SD 1.x config of DDIM and PNDM) makes the last step
land on alphas_cumprod[0] instead of a clean sample; sigmas ending with `schedule.sigma_min` instead of 0
reproduce it, and the result is then x at that noise level.
"""

from __future__ import annotations

import torch

from openldm.diffusion.samplers import (
    Callback,
    Denoiser,
    NoiseSampler,
    _denoise,
    _report,
    default_noise_sampler,
    sample_euler_ancestral,
    to_d,
)


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
    eta: float = 0.0, s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): in VE form it is exactly Euler ancestral with this eta.

    DDIM's sigma_t(eta)^2 = eta^2 (1 - a_prev) / (1 - a) (1 - a / a_prev) divided by a_prev is
    `ancestral_step`'s sigma_up^2, and the deterministic part x0 + sigma_down eps is an Euler step to
    sigma_down. eta = 0 is the deterministic DDIM (first order), eta = 1 is DDPM's posterior sampling.
    """
    return sample_euler_ancestral(
        denoiser, x, sigmas, callback=callback, eta=eta, s_noise=s_noise, noise_sampler=noise_sampler
    )


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior q(x_prev | x_t, x0) (Ho et al. 2020, eq. 6-7).

    Between any two timesteps the posterior with the "fixed small" variance (diffusers' default) is
    DDIM with eta = 1 (Song et al. 2021, sec. 4.1), so this is `sample_ddim(eta=1)`. The last step to
    sigma = 0 returns the denoised sample without noise (diffusers adds noise of std 1e-10 there).
    """
    return sample_ddim(denoiser, x, sigmas, callback=callback, eta=1.0, noise_sampler=noise_sampler)


# Pseudo linear multistep (PLMS of Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on
# Manifolds"): Adams-Bashforth on eps, each step transferred with DDIM's formula. In VE form the
# transfer is x + eps (sigma_next - sigma), and eps = to_d(x, sigma, D).

ADAMS_BASHFORTH = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)  # equal-step Adams-Bashforth weights of orders 1..4, newest value first


def adams_bashforth(history: list[torch.Tensor]) -> torch.Tensor:
    """The equal-step Adams-Bashforth combination of up to 4 values, newest first."""
    weights = ADAMS_BASHFORTH[len(history) - 1]
    return sum(w * value for w, value in zip(weights, history))


@torch.no_grad()
def sample_plms(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None
) -> torch.Tensor:
    """PLMS (Liu et al. 2022, PNDM): 4th-order Adams-Bashforth on eps, with DDIM transfers.

    As in ldm and diffusers (`PNDMScheduler(skip_prk_steps=True)`), the first step is a pseudo-Heun
    step (eps averaged with one evaluated at its DDIM prediction), then AB2, AB3 and AB4 over the eps
    of the step starts: n steps cost n + 1 evaluations. eps is extrapolated, whatever the model predicts;
    diffusers' PNDM extrapolates the raw v of a v-model instead (ldm converts to eps first, as here).
    """
    history: list[torch.Tensor] = []  # eps at the step starts, newest first
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoiser, x, sigma)
        _report(callback, i, x, sigma, denoised)
        eps = to_d(x, sigma, denoised)
        if history:
            eps_step = adams_bashforth([eps, *history][:4])
        elif sigma_next > 0:  # pseudo-Heun: average with eps at the DDIM prediction
            x_pred = x + eps * (sigma_next - sigma)
            eps_step = (eps + to_d(x_pred, sigma_next, _denoise(denoiser, x_pred, sigma_next))) / 2
        else:
            eps_step = eps
        history = [eps, *history][:3]
        x = x + eps_step * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_lcm(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """Consistency-model multistep sampling (Song et al. 2023, Alg. 1; Luo et al. 2023, LCM).

    Each step maps x to a clean sample and re-noises it to the next sigma with fresh noise. The denoiser
    must be the consistency function f(x, sigma) (for LCM: with its c_skip/c_out boundary scalings).
    """
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoiser, x, sigma)
        _report(callback, i, x, sigma, denoised)
        x = denoised
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * sigma_next
    return x
