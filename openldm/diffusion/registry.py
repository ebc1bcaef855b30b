"""User-facing sampler and schedule names, in one place.

Accepts our names (`dpmpp_2m`, `karras`), AUTOMATIC1111's display names (`DPM++ 2M`, `Karras`, and the
older combined form `DPM++ 2M Karras`), A1111's `k_` aliases and ComfyUI's names (`uni_pc_bh2`,
`dpmpp_2m_sde_gpu`, `sgm_uniform`, ...), case-insensitively. Each sampler carries the defaults those UIs
give it: its schedule, the noise it wants, and whether the next-to-last sigma is dropped.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from openldm.diffusion import dpm_solver as dpm
from openldm.diffusion import samplers as k
from openldm.diffusion import samplers_discrete as discrete
from openldm.diffusion import samplers_multistep as multistep
from openldm.diffusion.samplers import Callback, Denoiser, NoiseSampler
from openldm.diffusion.schedules import DiscreteSchedule
from openldm.diffusion.sigmas import get_sigmas

Noise = Literal["none", "gaussian", "brownian"]
GENERIC_OPTIONS = ("eta", "s_noise")  # UI-wide settings; dropped for samplers that do not take them


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
    discard_penultimate: bool = False  # A1111/ComfyUI run steps + 1 sigmas without the next-to-last
    aliases: tuple[str, ...] = ()  # other names: A1111's k_ aliases, ComfyUI's

    def sigmas(self, schedule_name: str, steps: int, schedule: DiscreteSchedule, **opts: Any) -> torch.Tensor:
        """The steps + 1 sigmas this sampler runs, as A1111 and ComfyUI make them.

        For DPM-2 (and A1111's DPM++ 3M SDE, ComfyUI's UniPC) both compute steps + 1 sigmas and drop the
        smallest nonzero one, so that the last, lowest-order step starts from a larger sigma.
        """
        if not self.discard_penultimate:
            return get_sigmas(schedule_name, steps, schedule, **opts)
        sigmas = get_sigmas(schedule_name, steps + 1, schedule, **opts)
        return torch.cat([sigmas[:-2], sigmas[-1:]])

    def __call__(
        self, denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
        noise_sampler: NoiseSampler | None = None, callback: Callback | None = None, **options: Any,
    ) -> torch.Tensor:
        """Run the sampler over `sigmas`, passing noise only to samplers that draw it.

        No steps (one sigma: img2img at strength 0) return x unchanged. `eta`/`s_noise` are dropped for
        samplers without them (as A1111 does); any other unknown option is an error.
        """
        if len(sigmas) < 2:
            return x
        accepted = inspect.signature(self.fn).parameters
        options = {k: v for k, v in options.items() if k in accepted or k not in GENERIC_OPTIONS}
        kwargs = {**self.options, **options, "callback": callback}
        if self.noise != "none" and noise_sampler is not None:
            kwargs["noise_sampler"] = noise_sampler
        if self.sigma_range:
            positive = sigmas[sigmas > 0]
            extra = {"n": len(sigmas) - 1} if self.fn is dpm.sample_dpm_fast else {}
            return self.fn(denoiser, x, float(positive.min()), float(positive.max()), **extra, **kwargs)
        return self.fn(denoiser, x, sigmas, **kwargs)


# Display names and defaults: A1111's modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py and
# sd_samplers_lcm.py; ComfyUI's comfy/samplers.py (KSAMPLER_NAMES + ddim, uni_pc, uni_pc_bh2; the
# `_gpu` variants differ only in where ComfyUI builds its Brownian tree). UniPC is order 3 in both.
_SPECS = [
    SamplerSpec("euler", "Euler", k.sample_euler),
    SamplerSpec("euler_ancestral", "Euler a", k.sample_euler_ancestral, noise="gaussian",
                aliases=("k_euler_a",)),
    SamplerSpec("heun", "Heun", k.sample_heun),
    SamplerSpec("dpm_2", "DPM2", k.sample_dpm_2, default_schedule="karras", discard_penultimate=True),
    SamplerSpec("dpm_2_ancestral", "DPM2 a", k.sample_dpm_2_ancestral, default_schedule="karras",
                noise="gaussian", discard_penultimate=True, aliases=("k_dpm_2_a",)),
    SamplerSpec("lms", "LMS", k.sample_lms),
    SamplerSpec("dpm_fast", "DPM fast", dpm.sample_dpm_fast, noise="gaussian", sigma_range=True),
    SamplerSpec("dpm_adaptive", "DPM adaptive", dpm.sample_dpm_adaptive, noise="gaussian", sigma_range=True,
                aliases=("k_dpm_ad",)),
    SamplerSpec("dpmpp_2s_ancestral", "DPM++ 2S a", dpm.sample_dpmpp_2s_ancestral, default_schedule="karras",
                noise="gaussian", aliases=("k_dpmpp_2s_a",)),
    SamplerSpec("dpmpp_sde", "DPM++ SDE", dpm.sample_dpmpp_sde, default_schedule="karras", noise="brownian",
                aliases=("dpmpp_sde_gpu",)),
    SamplerSpec("dpmpp_2m", "DPM++ 2M", dpm.sample_dpmpp_2m, default_schedule="karras"),
    SamplerSpec("dpmpp_2m_sde", "DPM++ 2M SDE", dpm.sample_dpmpp_2m_sde, default_schedule="exponential",
                noise="brownian", aliases=("dpmpp_2m_sde_gpu",)),
    SamplerSpec("dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun", dpm.sample_dpmpp_2m_sde, {"solver_type": "heun"},
                default_schedule="exponential", noise="brownian", aliases=("dpmpp_2m_sde_heun_gpu",)),
    SamplerSpec("dpmpp_3m_sde", "DPM++ 3M SDE", dpm.sample_dpmpp_3m_sde, default_schedule="exponential",
                noise="brownian", discard_penultimate=True, aliases=("dpmpp_3m_sde_gpu",)),
    SamplerSpec("restart", "Restart", multistep.sample_restart, default_schedule="karras", noise="gaussian"),
    SamplerSpec("ddim", "DDIM", discrete.sample_ddim, default_schedule="ddim_uniform", noise="gaussian"),
    SamplerSpec("plms", "PLMS", discrete.sample_plms, default_schedule="ddim_uniform"),
    SamplerSpec("ddpm", "DDPM", discrete.sample_ddpm, noise="gaussian"),
    SamplerSpec("lcm", "LCM", discrete.sample_lcm, noise="gaussian", aliases=("k_lcm",)),
    SamplerSpec("unipc", "UniPC", multistep.sample_unipc, {"order": 3, "variant": "bh1"},
                default_schedule="ddim_uniform", discard_penultimate=True, aliases=("uni_pc",)),
    SamplerSpec("unipc_bh2", "UniPC BH2", multistep.sample_unipc, {"order": 3, "variant": "bh2"},
                default_schedule="ddim_uniform", discard_penultimate=True, aliases=("uni_pc_bh2",)),
    SamplerSpec("deis", "DEIS", multistep.sample_deis),
    SamplerSpec("ipndm", "IPNDM", multistep.sample_ipndm),
]
SAMPLERS: dict[str, SamplerSpec] = {spec.name: spec for spec in _SPECS}

# Schedule names: ours -> A1111 display name ("Schedule type"; ComfyUI uses our names).
SCHEDULE_DISPLAY = {
    "normal": "Normal", "uniform": "Uniform", "simple": "Simple", "sgm_uniform": "SGM Uniform",
    "ddim_uniform": "DDIM", "karras": "Karras", "exponential": "Exponential",
    "polyexponential": "Polyexponential", "kl_optimal": "KL Optimal", "beta": "Beta",
    "linear_quadratic": "Linear Quadratic", "ays": "Align Your Steps", "leading": "Leading",
    "trailing": "Trailing", "linspace": "Linspace",
}
_SCHEDULE_EXTRA_ALIASES = {"align_your_steps": "ays", "SGMUniform": "sgm_uniform"}  # A1111's other names


def _key(name: str) -> str:
    return name.strip().lower().replace("+", "p").replace("-", " ").replace("_", " ")


_SAMPLER_ALIASES = {
    _key(alias): spec.name
    for spec in _SPECS
    for alias in (spec.name, spec.display, "k_" + spec.name, *spec.aliases)
}
_SCHEDULE_ALIASES = {_key(n): n for n in SCHEDULE_DISPLAY} | {_key(d): n for n, d in SCHEDULE_DISPLAY.items()}
_SCHEDULE_ALIASES |= {_key(alias): name for alias, name in _SCHEDULE_EXTRA_ALIASES.items()}
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
