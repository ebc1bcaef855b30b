"""User-facing sampler and schedule names, in one place.

Accepts our names (`dpmpp_2m`, `karras`), AUTOMATIC1111's display names (`DPM++ 2M`, `Karras`,
and the older combined form `DPM++ 2M Karras`) and ComfyUI's names, case-insensitively.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from openldm.diffusion import samplers as k
from openldm.diffusion.samplers import Callback, Denoiser, NoiseSampler

Noise = Literal["none", "gaussian", "brownian"]


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler function with its fixed options, default schedule and the noise it wants."""

    name: str
    display: str  # AUTOMATIC1111's name
    fn: Callable[..., torch.Tensor]
    options: dict[str, Any] = field(default_factory=dict)
    default_schedule: str = "normal"
    noise: Noise = "none"
    sigma_range: bool = False  # DPM-Solver fast/adaptive take (sigma_min, sigma_max) not a list

    def __call__(
        self, denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
        noise_sampler: NoiseSampler | None = None, callback: Callback | None = None, **options: Any,
    ) -> torch.Tensor:
        """Run the sampler over `sigmas`, passing noise only to samplers that draw it."""
        kwargs = {**self.options, **options, "callback": callback}
        if self.noise != "none" and noise_sampler is not None:
            kwargs["noise_sampler"] = noise_sampler
        if self.sigma_range:
            positive = sigmas[sigmas > 0]
            extra = {"n": len(sigmas) - 1} if self.fn is k.sample_dpm_fast else {}
            return self.fn(denoiser, x, float(positive.min()), float(positive.max()), **extra, **kwargs)
        return self.fn(denoiser, x, sigmas, **kwargs)


_SPECS = [
    SamplerSpec("euler", "Euler", k.sample_euler),
    SamplerSpec("euler_ancestral", "Euler a", k.sample_euler_ancestral, noise="gaussian"),
    SamplerSpec("heun", "Heun", k.sample_heun),
    SamplerSpec("dpm_2", "DPM2", k.sample_dpm_2, default_schedule="karras"),
    SamplerSpec("dpm_2_ancestral", "DPM2 a", k.sample_dpm_2_ancestral, default_schedule="karras",
                noise="gaussian"),
    SamplerSpec("lms", "LMS", k.sample_lms),
    SamplerSpec("dpm_fast", "DPM fast", k.sample_dpm_fast, noise="gaussian", sigma_range=True),
    SamplerSpec("dpm_adaptive", "DPM adaptive", k.sample_dpm_adaptive, noise="gaussian", sigma_range=True),
    SamplerSpec("dpmpp_2s_ancestral", "DPM++ 2S a", k.sample_dpmpp_2s_ancestral, default_schedule="karras",
                noise="gaussian"),
    SamplerSpec("dpmpp_sde", "DPM++ SDE", k.sample_dpmpp_sde, default_schedule="karras", noise="brownian"),
    SamplerSpec("dpmpp_2m", "DPM++ 2M", k.sample_dpmpp_2m, default_schedule="karras"),
    SamplerSpec("dpmpp_2m_sde", "DPM++ 2M SDE", k.sample_dpmpp_2m_sde, default_schedule="exponential",
                noise="brownian"),
    SamplerSpec("dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun", k.sample_dpmpp_2m_sde, {"solver_type": "heun"},
                default_schedule="exponential", noise="brownian"),
    SamplerSpec("dpmpp_3m_sde", "DPM++ 3M SDE", k.sample_dpmpp_3m_sde, default_schedule="exponential",
                noise="brownian"),
]
SAMPLERS: dict[str, SamplerSpec] = {spec.name: spec for spec in _SPECS}

# Schedule names: ours -> A1111 display name ("Schedule type").
SCHEDULE_DISPLAY = {
    "normal": "Normal", "uniform": "Uniform", "simple": "Simple", "sgm_uniform": "SGM Uniform",
    "ddim_uniform": "DDIM", "karras": "Karras", "exponential": "Exponential",
    "polyexponential": "Polyexponential", "kl_optimal": "KL Optimal", "beta": "Beta",
    "ays": "Align Your Steps", "leading": "Leading", "trailing": "Trailing", "linspace": "Linspace",
}


def _key(name: str) -> str:
    return name.strip().lower().replace("+", "p").replace("-", " ").replace("_", " ")


_SAMPLER_ALIASES = {_key(s.name): s.name for s in _SPECS} | {_key(s.display): s.name for s in _SPECS}
_SAMPLER_ALIASES |= {_key("k_" + s.name): s.name for s in _SPECS}
_SCHEDULE_ALIASES = {_key(n): n for n in SCHEDULE_DISPLAY} | {_key(d): n for n, d in SCHEDULE_DISPLAY.items()}
_SCHEDULE_ALIASES[_key("automatic")] = ""


def resolve(sampler: str, schedule: str | None = None) -> tuple[SamplerSpec, str]:
    """(sampler, schedule name) for a user's words; the schedule defaults to the sampler's own."""
    key = _key(sampler)
    if key not in _SAMPLER_ALIASES:  # the combined A1111 form, e.g. "DPM++ 2M Karras"
        for alias, name in _SCHEDULE_ALIASES.items():
            if alias and key.endswith(" " + alias) and key[: -len(alias) - 1] in _SAMPLER_ALIASES:
                key, schedule = key[: -len(alias) - 1], schedule or name
                break
    if key not in _SAMPLER_ALIASES:
        names = ", ".join(f"{s.name} ({s.display})" for s in SAMPLERS.values())
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {names}")
    spec = SAMPLERS[_SAMPLER_ALIASES[key]]
    if schedule is None or _key(schedule) == "automatic":
        return spec, spec.default_schedule
    if _key(schedule) not in _SCHEDULE_ALIASES:
        raise ValueError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULE_DISPLAY)}")
    return spec, _SCHEDULE_ALIASES[_key(schedule)]
