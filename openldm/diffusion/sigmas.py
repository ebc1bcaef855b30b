"""Sigma schedules: `get_sigmas(name, n, schedule, **opts)` -> n+1 descending sigmas ending in 0.

Every scheduler is a function `(n, schedule, **opts) -> Tensor` registered in `SCHEDULERS`, so a UI or a
pipeline picks one by name. Timestep-based ones read the model's own discrete sigmas from the
`DiscreteSchedule`; the continuous ones (karras, exponential, ...) span [sigma_min, sigma_max] of it
unless told otherwise. Sigmas are computed in float64 and returned as float32 on the CPU.
Also here: the img2img helpers `img2img_sigmas` and `noise_latent`, and the refiner's `switch_step`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from openldm.diffusion.samplers import append_dims
from openldm.diffusion.schedules import DiscreteSchedule

SigmaFn = Callable[..., torch.Tensor]

# Align Your Steps 10-step schedules (Sabour, Fidler & Kreis 2024, "Align Your Steps: Optimizing
# Sampling Schedules in Diffusion Models", arXiv:2404.14507), as published on NVIDIA's AYS project page.
# The 11 numbers bound 10 steps; the final 0.029 (= sigma_min) is replaced by 0, as diffusers and
# ComfyUI do, so that sampling ends on the clean image.
AYS_TABLES: dict[str, tuple[float, ...]] = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}

# The table each family samples with; none was published for SD2, which shares SD1's schedule.
AYS_FAMILY_TABLE = {"sd1": "sd15", "sd2": "sd15", "sdxl": "sdxl", "sdxl_refiner": "sdxl", "x4": "sd15"}


def schedule_options(name: str, family: str) -> dict[str, str]:
    """What a schedule needs to know about the model: AYS takes its family's table."""
    return {"model": AYS_FAMILY_TABLE[family]} if name == "ays" else {}


def _finish(sigmas: torch.Tensor) -> torch.Tensor:
    """Append the final 0 and hand back float32."""
    return torch.cat([sigmas.double(), sigmas.new_zeros(1, dtype=torch.float64)]).float()


def _check_steps(n: int, limit: int | None = None) -> None:
    if n < 1 or (limit is not None and n > limit):
        raise ValueError(f"number of steps must be in [1, {limit or 'inf'}], got {n}")


def _range(
    schedule: DiscreteSchedule, sigma_min: float | None, sigma_max: float | None
) -> tuple[float, float]:
    """The continuous schedules' end points, defaulting to the model's own."""
    lo = schedule.sigma_min if sigma_min is None else sigma_min
    hi = schedule.sigma_max if sigma_max is None else sigma_max
    return lo, hi


def _at_timesteps(t: torch.Tensor, schedule: DiscreteSchedule) -> torch.Tensor:
    """Sigmas at (fractional) timesteps, log-linear between trained ones, plus the final 0."""
    return _finish(schedule.t_to_sigma(t.double()))


# --- uniform in timestep ------------------------------------------------------------------


def normal(n: int, schedule: DiscreteSchedule) -> torch.Tensor:
    """n timesteps evenly from T-1 to 0 (k-diffusion `DiscreteSchedule.get_sigmas`; A1111 "uniform")."""
    _check_steps(n)
    T = len(schedule.alphas_cumprod)
    return _at_timesteps(torch.linspace(T - 1, 0, n, dtype=torch.float64), schedule)


def simple(n: int, schedule: DiscreteSchedule) -> torch.Tensor:
    """ComfyUI's "simple": trained timesteps T-1 - floor(i T / n), i = 0..n-1."""
    _check_steps(n, len(schedule.alphas_cumprod))
    T = len(schedule.alphas_cumprod)
    t = torch.tensor([T - 1 - math.floor(i * T / n) for i in range(n)], dtype=torch.float64)
    return _at_timesteps(t, schedule)


def sgm_uniform(n: int, schedule: DiscreteSchedule) -> torch.Tensor:
    """n+1 timesteps evenly from T-1 to 0 with the last dropped (Stability sgm's discretization)."""
    _check_steps(n)
    T = len(schedule.alphas_cumprod)
    return _at_timesteps(torch.linspace(T - 1, 0, n + 1, dtype=torch.float64)[:-1], schedule)


def leading(n: int, schedule: DiscreteSchedule, steps_offset: int = 1) -> torch.Tensor:
    """diffusers "leading" spacing: t = i * (T // n) + steps_offset (SD1/SDXL configs use offset 1)."""
    T = len(schedule.alphas_cumprod)
    _check_steps(n, T)
    t = torch.arange(n - 1, -1, -1, dtype=torch.float64) * (T // n) + steps_offset
    return _at_timesteps(t, schedule)


def ddim_uniform(n: int, schedule: DiscreteSchedule) -> torch.Tensor:
    """ldm's DDIM "uniform" timesteps i (T // n) + 1, exactly n (ldm adds one if n does not divide T)."""
    return leading(n, schedule, steps_offset=1)


def trailing(n: int, schedule: DiscreteSchedule) -> torch.Tensor:
    """diffusers "trailing" spacing: t = round(T - i T / n) - 1, from T-1 down (Lin et al. 2023, Table 2)."""
    T = len(schedule.alphas_cumprod)
    _check_steps(n, T)
    t = (T - torch.arange(n, dtype=torch.float64) * (T / n)).round() - 1
    return _at_timesteps(t, schedule)


def linspace(n: int, schedule: DiscreteSchedule) -> torch.Tensor:
    """diffusers "linspace" spacing: t evenly from T-1 to 0, sigma interpolated linearly (not in log).

    As in diffusers, t is rounded to float32 and n = 1 gives t = 0 (linspace(0, T-1, 1) = [0]).
    """
    _check_steps(n)
    sigmas = schedule.sigmas
    t = torch.linspace(0, len(sigmas) - 1, n, dtype=torch.float64).float().double().flip(0)
    low = t.floor().long()
    high = t.ceil().long()
    return _finish(torch.lerp(sigmas[low], sigmas[high], t - low))


# --- continuous in sigma ------------------------------------------------------------------


def karras(
    n: int, schedule: DiscreteSchedule, sigma_min: float | None = None, sigma_max: float | None = None,
    rho: float = 7.0,
) -> torch.Tensor:
    """Evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5)."""
    _check_steps(n)
    lo, hi = _range(schedule, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return _finish((hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho)


def exponential(
    n: int, schedule: DiscreteSchedule, sigma_min: float | None = None, sigma_max: float | None = None
) -> torch.Tensor:
    """Evenly spaced in log sigma."""
    _check_steps(n)
    lo, hi = _range(schedule, sigma_min, sigma_max)
    return _finish(torch.linspace(math.log(hi), math.log(lo), n, dtype=torch.float64).exp())


def polyexponential(
    n: int, schedule: DiscreteSchedule, sigma_min: float | None = None, sigma_max: float | None = None,
    rho: float = 1.0,
) -> torch.Tensor:
    """log sigma a polynomial of degree rho in the step ramp (k-diffusion's; rho = 1 is exponential)."""
    _check_steps(n)
    lo, hi = _range(schedule, sigma_min, sigma_max)
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    return _finish((ramp * (math.log(hi) - math.log(lo)) + math.log(lo)).exp())


def kl_optimal(
    n: int, schedule: DiscreteSchedule, sigma_min: float | None = None, sigma_max: float | None = None
) -> torch.Tensor:
    """Evenly spaced in arctan(sigma), the KL-optimal schedule of Sabour et al. 2024 (arXiv:2404.14507)."""
    _check_steps(n)
    lo, hi = _range(schedule, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return _finish((ramp * math.atan(lo) + (1 - ramp) * math.atan(hi)).tan())


def beta(n: int, schedule: DiscreteSchedule, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Timesteps at Beta(alpha, beta) quantiles (Lee et al. 2024, "Beta Sampling is All You Need").

    ComfyUI's "beta" rounds t to trained timesteps and drops repeats, which can return fewer than n
    steps; we keep the exact fractional quantiles so that every n gives n distinct steps.
    """
    _check_steps(n)
    T = len(schedule.alphas_cumprod)
    q = 1 - torch.arange(n, dtype=torch.float64) / n
    return _at_timesteps(beta_ppf(q, alpha, beta) * (T - 1), schedule)


def linear_quadratic(
    n: int, schedule: DiscreteSchedule, threshold_noise: float = 0.025, linear_steps: int | None = None
) -> torch.Tensor:
    """ComfyUI's "linear_quadratic" (from Genmo's Mochi): sigma_max times 1 - u, u rising linearly to
    `threshold_noise` over the first half of the steps, then quadratically to 1 (the final 0)."""
    _check_steps(n)
    if n == 1:
        return _finish(torch.tensor([schedule.sigma_max], dtype=torch.float64))
    linear = n // 2 if linear_steps is None else linear_steps
    quadratic = n - linear
    diff = linear - threshold_noise * n
    quad_coef = diff / (linear * quadratic**2)
    lin_coef = threshold_noise / linear - 2 * diff / quadratic**2
    i = torch.arange(n, dtype=torch.float64)
    u = torch.where(
        i < linear, i * threshold_noise / linear, quad_coef * i**2 + lin_coef * i + quad_coef * linear**2
    )
    return _finish((1 - u) * schedule.sigma_max)


def ays(n: int, schedule: DiscreteSchedule, model: Literal["sd15", "sdxl"] = "sd15") -> torch.Tensor:
    """Align Your Steps: the published 10-step table, log-linearly resampled to n steps (`AYS_TABLES`)."""
    _check_steps(n)
    if model not in AYS_TABLES:
        raise ValueError(f"no Align Your Steps table for {model!r}; known: {', '.join(AYS_TABLES)}")
    log_table = torch.tensor(AYS_TABLES[model], dtype=torch.float64).log()
    pos = torch.linspace(0, len(log_table) - 1, n + 1, dtype=torch.float64)
    low = pos.floor().long().clamp(max=len(log_table) - 2)
    sigmas = torch.lerp(log_table[low], log_table[low + 1], pos - low).exp()
    return _finish(sigmas[:-1])


SCHEDULERS: dict[str, SigmaFn] = {
    "normal": normal, "uniform": normal, "simple": simple, "sgm_uniform": sgm_uniform,
    "ddim_uniform": ddim_uniform, "leading": leading, "trailing": trailing, "linspace": linspace,
    "karras": karras, "exponential": exponential, "polyexponential": polyexponential,
    "kl_optimal": kl_optimal, "beta": beta, "linear_quadratic": linear_quadratic, "ays": ays,
}


def get_sigmas(name: str, n: int, schedule: DiscreteSchedule, **opts: float | str) -> torch.Tensor:
    """n+1 sigmas for n steps from the scheduler called `name` (see `SCHEDULERS`)."""
    try:
        fn = SCHEDULERS[name]
    except KeyError:
        raise KeyError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}") from None
    return fn(n, schedule, **opts)


# --- the Beta quantile function, so that scipy is not a run-time dependency -------------------


def _beta_cf(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, iters: int = 300) -> torch.Tensor:
    """The continued fraction of I_x(a, b) (Abramowitz & Stegun 26.5.8) by the modified Lentz method."""
    tiny = 1e-300
    f = torch.full_like(x, tiny)
    c, d = f.clone(), torch.zeros_like(x)
    for j in range(iters):  # numerators: 1, then d_1, d_2, ... of A&S 26.5.8
        m = j // 2
        if j == 0:
            num = torch.ones_like(x)
        elif j % 2:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1 + num * d
        d = 1 / torch.where(d.abs() < tiny, torch.full_like(d, tiny), d)
        c = 1 + num / c
        c = torch.where(c.abs() < tiny, torch.full_like(c, tiny), c)
        f = f * c * d
        if j > 0 and bool(((c * d - 1).abs() < 1e-15).all()):
            break
    return f


def beta_cdf(x: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """The regularized incomplete beta function I_x(a, b), float64, using I_x(a,b) = 1 - I_{1-x}(b,a)."""
    x = x.double().clamp(0, 1)
    flip = x > (a + 1) / (a + b + 2)  # where the fraction converges slowly, use the mirrored one
    xs = torch.where(flip, 1 - x, x)
    aa = torch.where(flip, torch.full_like(x, b), torch.full_like(x, a))
    bb = torch.where(flip, torch.full_like(x, a), torch.full_like(x, b))
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    front = torch.exp(aa * xs.clamp(min=1e-300).log() + bb * torch.log1p(-xs) - log_beta) / aa
    inner = (front * _beta_cf(xs, aa, bb)).where(xs > 0, torch.zeros_like(xs))
    return torch.where(flip, 1 - inner, inner)


def beta_ppf(q: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """The Beta(a, b) quantile function: bisection on `beta_cdf` to 2^-28, then bracketed Newton steps."""
    q = q.double()
    lo, hi = torch.zeros_like(q), torch.ones_like(q)
    for _ in range(28):
        mid = (lo + hi) / 2
        below = beta_cdf(mid, a, b) < q
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    x = (lo + hi) / 2
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    for _ in range(4):
        pdf = torch.exp((a - 1) * x.log() + (b - 1) * torch.log1p(-x) - log_beta)
        x = (x - (beta_cdf(x, a, b) - q) / pdf).clamp(lo, hi)
    return torch.where(q >= 1, torch.ones_like(q), torch.where(q <= 0, torch.zeros_like(q), x))


# --- img2img -------------------------------------------------------------------------------


def img2img_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of `sigmas` that img2img runs: its last int(n * strength) steps (diffusers' rule).

    strength 0 gives `sigmas[-1:]` (no steps, the input comes back); strength 1 the full schedule.
    """
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    n = len(sigmas) - 1
    steps = min(int(n * strength), n)
    return sigmas[n - steps:]


def switch_step(sigmas: torch.Tensor, schedule: DiscreteSchedule, fraction: float) -> int:
    """How many steps of `sigmas` a base model runs before a refiner takes over (diffusers' `denoising_end`).

    The base keeps the steps that start at timestep t >= round((1 - fraction) T): the switch is a noise
    level, not a step count, so it falls in the same place for every schedule. Fraction 1 keeps all.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"refiner switch must be in [0, 1], got {fraction}")
    total = len(schedule.sigmas)
    cutoff = int(round(total - fraction * total))
    t = schedule.sigma_to_t(sigmas[:-1].cpu())
    return int((t >= cutoff - 1e-6).sum())  # timesteps come back from sigmas within float error


def noise_latent(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x0 + sigma noise: a clean latent brought to noise level sigma (VE form; sigma scalar or (batch,))."""
    sigma = torch.as_tensor(sigma, device=x0.device, dtype=x0.dtype)
    return x0 + append_dims(sigma, x0.ndim) * noise
