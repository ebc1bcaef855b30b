"""Steps every pipeline shares: seeds and noise, per-step prompts, masked denoising."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from openldm.diffusion.noise import BatchNoise
from openldm.diffusion.samplers import Denoiser, Step, append_dims
from openldm.prompts import extract_networks, prompt_schedule


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation per sample, from a (t=0) to b (t=1): variation seeds keep unit variance."""
    a_flat, b_flat = a.flatten(1).double(), b.flatten(1).double()
    cos = (a_flat * b_flat).sum(1) / (a_flat.norm(dim=1) * b_flat.norm(dim=1))
    omega = torch.acos(cos.clamp(-1, 1))
    so = torch.sin(omega)
    linear = so.abs() < 1e-6
    wa = torch.where(linear, torch.full_like(so, 1 - t), torch.sin((1 - t) * omega) / so)
    wb = torch.where(linear, torch.full_like(so, t), torch.sin(t * omega) / so)
    out = append_dims(wa, a.ndim) * a.double() + append_dims(wb, a.ndim) * b.double()
    return out.to(a.dtype)


def starting_noise(
    noise: BatchNoise, subseeds: Sequence[int] | None, subseed_strength: float, shape: Sequence[int]
) -> torch.Tensor:
    """The first draw of each seed's generator, optionally bent towards its variation seed."""
    x = noise()
    if subseeds is not None and subseed_strength > 0:
        variation = BatchNoise(subseeds, shape, device=x.device, dtype=x.dtype)()
        x = slerp(subseed_strength, x, variation)
    return x


@dataclass(frozen=True)
class PromptSteps:
    """The distinct prompt texts of a batch and the last sampling step each is used for."""

    ends: list[int]  # ascending; step i (0-based) uses the first entry with end >= i, as A1111 does
    texts: list[list[str]]  # texts[k][b]: prompt of batch item b up to ends[k]


def schedule_prompts(prompts: Sequence[str], steps: int) -> PromptSteps:
    """Resolve prompt editing and alternation for every prompt of a batch over `steps` steps.

    Extra-network tags (`<lora:name:1>`) are taken out first, as in A1111: the text encoders never see them.
    """
    schedules = [prompt_schedule(extract_networks(p)[0], steps) for p in prompts]
    ends = sorted({end for schedule in schedules for end, _ in schedule})
    texts = [[next(t for e, t in schedule if e >= end) for schedule in schedules] for end in ends]
    return PromptSteps(ends, texts)


class StepTracker:
    """Counts sampling steps through the sampler's callback; denoisers read `step` from it."""

    def __init__(self, callback: Callable[[Step], None] | None = None, first: int = 0):
        self.step = self.first = first  # a refiner's sampler starts counting where the base stopped
        self.callback = callback

    def __call__(self, info: Step) -> None:
        self.step = self.first + info.i + 1
        if self.callback is not None:
            self.callback(info)


class ScheduledDenoiser:
    """Switches between denoisers (one per prompt text) as sampling passes each schedule boundary."""

    def __init__(self, ends: Sequence[int], denoisers: Sequence[Denoiser], tracker: StepTracker):
        self.ends, self.denoisers, self.tracker = list(ends), list(denoisers), tracker

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        step = self.tracker.step
        index = next((k for k, end in enumerate(self.ends) if end >= step), len(self.ends) - 1)
        return self.denoisers[index](x, sigma)


class MaskedDenoiser:
    """Inpainting with any model: outside the mask the clean estimate is the original latent."""

    def __init__(self, inner: Denoiser, original: torch.Tensor, keep: torch.Tensor):
        self.inner, self.original, self.keep = inner, original, keep

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.keep * self.original + (1 - self.keep) * self.inner(x, sigma)
