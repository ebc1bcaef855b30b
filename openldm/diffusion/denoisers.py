"""Denoisers: a trained network seen as `denoiser(x, sigma) -> denoised`, in the VE form x = x0 + sigma eps.

Every prediction type is one set of preconditioning scalings (Karras et al. 2022, "Elucidating the
Design Space of Diffusion-Based Generative Models", Table 1, with sigma_data = 1):

    denoised = c_skip(sigma) * x + c_out(sigma) * model(c_in(sigma) * x, c_noise(sigma))

`c_in * x = (x0 + sigma eps) / sqrt(sigma^2 + 1)` is exactly the DDPM/VP input sqrt(a) x0 + sqrt(1-a) eps,
so a network trained by ldm/sgm/diffusers runs unchanged; `c_noise` is its (fractional) timestep.
Classifier-free guidance is itself a denoiser wrapping a conditional one (STYLE.md principle 7).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from openldm.diffusion.samplers import Denoiser, Step, append_dims
from openldm.diffusion.schedules import DiscreteSchedule

PredictionType = Literal["eps", "v", "x0"]
Cond = Mapping[str, Any]


@dataclass(frozen=True)
class Scalings:
    """EDM preconditioning for one prediction type, each of shape (batch,) (Karras et al. 2022, Table 1)."""

    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor


def get_scalings(prediction: PredictionType, sigma: torch.Tensor) -> Scalings:
    """c_skip, c_out, c_in with sigma_data = 1 so that denoised = c_skip x + c_out model(c_in x)."""
    c_in = 1 / (sigma**2 + 1).sqrt()
    if prediction == "eps":  # x0 = x - sigma eps
        return Scalings(torch.ones_like(sigma), -sigma, c_in)
    if prediction == "v":  # v = alpha eps - sigma_vp x0 (Salimans & Ho 2022) => x0 = alpha^2 x - sigma_vp v
        return Scalings(1 / (sigma**2 + 1), -sigma / (sigma**2 + 1).sqrt(), c_in)
    if prediction == "x0":
        return Scalings(torch.zeros_like(sigma), torch.ones_like(sigma), c_in)
    raise ValueError(f"unknown prediction type {prediction!r}; choose eps, v or x0")


def get_target(
    prediction: PredictionType, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """What the network should output for x = x0 + sigma noise, in closed form (no division by c_out)."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        alpha = append_dims((sigma**2 + 1).rsqrt(), x0.ndim).to(x0.dtype)
        return alpha * noise - append_dims(sigma, x0.ndim).to(x0.dtype) * alpha * x0
    raise ValueError(f"unknown prediction type {prediction!r}; choose eps, v or x0")


def min_snr_weights(
    sigma: torch.Tensor, gamma: float = 5.0, prediction: PredictionType = "eps"
) -> torch.Tensor:
    """Min-SNR-gamma loss weights per sample (Hang et al. 2023), SNR = 1 / sigma^2, written to stay finite.

    eps: min(SNR, gamma) / SNR = min(1, gamma sigma^2); v: min(SNR, gamma) / (SNR + 1); x0: min(SNR, gamma).
    """
    sigma = sigma.double()
    if prediction == "eps":
        weights = (gamma * sigma**2).clamp(max=1)
    elif prediction == "v":
        weights = (gamma * sigma**2).clamp(max=1) / (sigma**2 + 1)
    elif prediction == "x0":
        weights = sigma.pow(-2).clamp(max=gamma)
    else:
        raise ValueError(f"unknown prediction type {prediction!r}; choose eps, v or x0")
    return weights.float()


class DiscreteDenoiser(nn.Module):
    """A discrete-time network `model(x_in, t, **cond)` as a denoiser `(x, sigma, **cond) -> denoised`.

    The timestep is the fractional `schedule.sigma_to_t(sigma)`, kept in float32 whatever x's dtype
    (t = 999 does not survive float16). `quantize=True` rounds it to the nearest trained timestep.
    """

    def __init__(
        self, model: nn.Module | Callable[..., torch.Tensor], schedule: DiscreteSchedule,
        prediction: PredictionType = "eps", quantize: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.schedule = schedule
        self.prediction = prediction
        self.quantize = quantize
        get_scalings(prediction, torch.ones(1))  # fail early on an unknown prediction type

    def scalings(self, sigma: torch.Tensor) -> Scalings:
        """The preconditioning at `sigma` (batch,)."""
        return get_scalings(self.prediction, sigma)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """c_noise: the model's timestep for each sigma, as float32."""
        t = self.schedule.sigma_to_t(sigma)
        return (t.round() if self.quantize else t).float()

    def _apply(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, Scalings]:
        s = self.scalings(sigma)
        c_in = append_dims(s.c_in, x.ndim).to(x.dtype)
        return self.model(x * c_in, self.timestep(sigma), **cond), s

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        """denoised = c_skip x + c_out model(c_in x, t)."""
        sigma = _per_sample(sigma, x)
        out, s = self._apply(x, sigma, cond)
        c_skip, c_out = (append_dims(c, x.ndim).to(x.dtype) for c in (s.c_skip, s.c_out))
        return x * c_skip + out * c_out

    def loss(
        self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, *,
        weighting: torch.Tensor | None = None, reduce: bool = True, **cond: Any,
    ) -> torch.Tensor:
        """MSE in the network's output space at x = x0 + sigma noise; per-sample (batch,) if not `reduce`."""
        sigma = _per_sample(sigma, x0)
        x = x0 + append_dims(sigma, x0.ndim).to(x0.dtype) * noise
        out, _ = self._apply(x, sigma, cond)
        target = get_target(self.prediction, x0, noise, sigma)
        per_sample = (out.float() - target.float()).pow(2).flatten(1).mean(1)
        if weighting is not None:
            per_sample = per_sample * weighting.to(per_sample)
        return per_sample.mean() if reduce else per_sample


def _per_sample(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Sigma as a (batch,) tensor on x's device (a scalar is broadcast)."""
    sigma = torch.as_tensor(sigma, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def bind(denoiser: Callable[..., torch.Tensor], **cond: Any) -> Denoiser:
    """Fix the conditioning of `denoiser(x, sigma, **cond)`, giving the `(x, sigma)` form samplers take."""
    return functools.partial(denoiser, **cond)


def _batchable(cond: Cond, uncond: Cond) -> bool:
    """Whether cond and uncond can share one forward: same keys, and tensors of one shape per key."""
    if cond.keys() != uncond.keys():
        return False
    for key, c in cond.items():
        u = uncond[key]
        if isinstance(c, torch.Tensor) != isinstance(u, torch.Tensor):
            return False
        if isinstance(c, torch.Tensor) and c.shape != u.shape:
            return False
        if not isinstance(c, torch.Tensor) and c is not u and c != u:
            return False
    return True


def _cat_cond(uncond: Cond, cond: Cond) -> dict[str, Any]:
    """Concatenate tensor conditioning along the batch (uncond first, as diffusers does)."""
    return {k: torch.cat([uncond[k], c]) if isinstance(c, torch.Tensor) else c for k, c in cond.items()}


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022) as a denoiser: uncond + scale (cond - uncond).

    `cond`/`uncond` are dicts of the keyword conditioning of `inner` (SD1/2: {"context"}; SDXL:
    {"context", "y"}); both run in one batched forward when their shapes agree. `rescale` is phi of
    Lin et al. 2023, sec. 3.4, computed in the network's output space (eps or v, found through
    `inner.scalings`) exactly as diffusers' `guidance_rescale` does, so images match diffusers.
    """

    def __init__(
        self, inner: Callable[..., torch.Tensor], cond: Cond, uncond: Cond | None = None,
        scale: float = 7.5, rescale: float = 0.0,
    ) -> None:
        if scale != 1 and uncond is None:
            raise ValueError("classifier-free guidance with scale != 1 needs `uncond`")
        if rescale and not hasattr(inner, "scalings"):
            raise TypeError("guidance rescale needs an inner denoiser with `scalings(sigma)`")
        self.inner, self.cond, self.uncond = inner, cond, uncond
        self.scale, self.rescale = scale, rescale

    def _denoise_both(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(denoised_uncond, denoised_cond), batched into one forward when possible."""
        if not _batchable(self.cond, self.uncond):
            return self.inner(x, sigma, **self.uncond), self.inner(x, sigma, **self.cond)
        both = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), **_cat_cond(self.uncond, self.cond))
        return both.chunk(2)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The guided denoised estimate at `sigma` (batch,)."""
        sigma = _per_sample(sigma, x)
        if self.scale == 1:
            return self.inner(x, sigma, **self.cond)
        uncond, cond = self._denoise_both(x, sigma)
        denoised = uncond + self.scale * (cond - uncond)
        if not self.rescale:
            return denoised
        return self._rescaled(x, sigma, cond, denoised)

    def _rescaled(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, guided: torch.Tensor
    ) -> torch.Tensor:
        """Lin et al. 2023 eq. 15-16 on the network output (denoised - c_skip x) / c_out.

        The per-sample c_out cancels in the std ratio, so working on denoised - c_skip x is exact.
        """
        c_skip = append_dims(self.inner.scalings(sigma).c_skip, x.ndim).to(x.dtype)
        out_cond, out_cfg = cond - c_skip * x, guided - c_skip * x
        dims = list(range(1, x.ndim))
        factor = out_cond.std(dim=dims, keepdim=True) / out_cfg.std(dim=dims, keepdim=True)
        out = out_cfg * (self.rescale * factor + (1 - self.rescale))
        return c_skip * x + out


class StepTracker:
    """Counts sampling steps through the sampler's callback; denoisers read `step` from it."""

    def __init__(self, callback: Callable[[Step], None] | None = None, first: int = 0):
        self.step = self.first = first  # a refiner's sampler starts counting where the base stopped
        self.callback = callback

    def __call__(self, info: Step) -> None:
        self.step = self.first + info.i + 1
        if self.callback is not None:
            self.callback(info)


SIGMA_RTOL = 1e-4  # samplers recompute a schedule's sigmas (exp of log, t of sigma) within float error


def step_index(sigmas: Sequence[float], sigma: float) -> int:
    """The 0-based step of a schedule (`sigmas` descending to 0) that starts at or above noise level `sigma`.

    A pure function of the noise level: a sub-step's model call (Heun's corrector at the next sigma,
    DPM2's midpoint, an adaptive or restarting sampler's own levels) belongs to the step whose interval
    holds it, however often the sampler calls back. Levels above the first are step 0.
    """
    threshold = sigma * (1 - SIGMA_RTOL)
    started = sum(1 for level in sigmas[:-1] if level >= threshold)
    return max(started - 1, 0)


class ScheduledDenoiser:
    """Switches between denoisers (one per prompt text) by the step that the evaluated sigma falls in.

    `ends[k]` is the last step (0-based) of denoiser k, as A1111's schedules count; `sigmas` is the whole
    run's schedule (a refiner's part is its tail, so steps count on through the hand-off).
    """

    def __init__(self, ends: Sequence[int], denoisers: Sequence[Denoiser], sigmas: torch.Tensor):
        self.ends, self.denoisers = list(ends), list(denoisers)
        self.sigmas = [float(s) for s in sigmas]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        step = step_index(self.sigmas, float(torch.as_tensor(sigma).max()))
        index = next((k for k, end in enumerate(self.ends) if end >= step), len(self.ends) - 1)
        return self.denoisers[index](x, sigma)


class MaskedDenoiser:
    """Inpainting with any model: outside the mask the clean estimate is the original latent."""

    def __init__(self, inner: Denoiser, original: torch.Tensor, keep: torch.Tensor):
        self.inner, self.original, self.keep = inner, original, keep

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.keep * self.original + (1 - self.keep) * self.inner(x, sigma)
