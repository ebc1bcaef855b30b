"""Everything that decides an image, in one record: what the CLI fills, the API takes and PNGs store."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

from openldm.diffusion.registry import SCHEDULE_DISPLAY, resolve


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    negative: str = ""
    steps: int = 20
    sampler: str = "euler"
    schedule: str | None = None  # None: the sampler's default
    cfg: float = 7.0
    guidance_rescale: float = 0.0
    seed: int = -1  # -1: pick one at random (and record it)
    subseed: int = -1
    subseed_strength: float = 0.0  # variation seeds: slerp towards the subseed's noise
    width: int | None = None  # None: the model's native size
    height: int | None = None
    batch_size: int = 1
    batch_count: int = 1
    clip_skip: int | None = None
    eta: float | None = None  # ancestral noise amount, for the samplers that take it
    s_noise: float | None = None
    # img2img / inpainting
    strength: float = 0.75
    resize_mode: str = "resize"
    mask_blur: float = 4.0
    invert_mask: bool = False
    masked_content: str = "original"  # fill | original | latent_noise | latent_nothing
    only_masked: bool = False
    only_masked_padding: int = 32
    overlay: bool = True  # paste the original pixels back outside the mask
    # hires fix / upscaling
    upscale_by: float = 2.0
    upscaler: str = "latent"  # latent | lanczos
    hires_steps: int | None = None  # None: the same number as `steps`
    hires_strength: float = 0.5
    # SDXL
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    refiner_switch: float = 0.8
    loras: tuple[tuple[str, float], ...] = field(default_factory=tuple)

    def with_seed(self) -> GenerationParams:
        """A copy whose seed (and subseed) is a concrete number, drawn at random if it was -1."""
        rng = random.SystemRandom()
        seed = self.seed if self.seed >= 0 else rng.randrange(2**32)
        subseed = self.subseed if self.subseed >= 0 else rng.randrange(2**32)
        return dataclasses.replace(self, seed=seed, subseed=subseed)

    def to_json(self) -> dict[str, Any]:
        return {k: list(map(list, v)) if k == "loras" else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerationParams:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown generation settings: {', '.join(sorted(unknown))}")
        data = dict(data)
        data["loras"] = tuple(tuple(x) for x in data.get("loras", ()))
        return cls(**data)


def infotext_settings(
    params: GenerationParams, width: int, height: int, model_name: str, model_hash: str, mode: str
) -> dict[str, Any]:
    """The `Key: value` pairs of an A1111 infotext for these settings."""
    spec, schedule = resolve(params.sampler, params.schedule)
    settings: dict[str, Any] = {
        "Steps": params.steps, "Sampler": spec.display, "Schedule type": SCHEDULE_DISPLAY[schedule],
        "CFG scale": params.cfg, "Seed": params.seed, "Size": f"{width}x{height}",
        "Model hash": model_hash, "Model": model_name,
    }
    if params.subseed_strength:
        settings |= {"Variation seed": params.subseed, "Variation seed strength": params.subseed_strength}
    if mode == "upscale":
        settings |= {"Denoising strength": params.hires_strength, "Hires upscale": params.upscale_by,
                     "Hires steps": params.hires_steps, "Hires upscaler": params.upscaler}
    elif mode != "txt2img":
        settings["Denoising strength"] = params.strength
    if params.clip_skip and params.clip_skip > 1:
        settings["Clip skip"] = params.clip_skip
    if params.guidance_rescale:
        settings["CFG Rescale phi"] = params.guidance_rescale
    if params.loras:
        settings["Lora weights"] = ", ".join(f"{name}: {w}" for name, w in params.loras)
    return settings


# A1111 infotext key -> (our field, how to read its value); the inverse of `infotext_settings`.
_FROM_INFOTEXT = {
    "Steps": ("steps", int), "Sampler": ("sampler", str), "Schedule type": ("schedule", str),
    "CFG scale": ("cfg", float), "Seed": ("seed", int), "Denoising strength": ("strength", float),
    "Clip skip": ("clip_skip", int), "CFG Rescale phi": ("guidance_rescale", float),
    "Variation seed": ("subseed", int), "Variation seed strength": ("subseed_strength", float),
    "Hires upscale": ("upscale_by", float), "Hires steps": ("hires_steps", int),
    "Hires upscaler": ("upscaler", str.lower),
}


def params_from_infotext(prompt: str, negative: str, settings: dict[str, str]) -> GenerationParams:
    """Settings from an A1111-style infotext (ours or A1111's own); keys we do not use are ignored."""
    values: dict[str, Any] = {}
    try:
        for key, (name, read) in _FROM_INFOTEXT.items():
            if key in settings:
                values[name] = read(settings[key])
        if "Size" in settings:
            values["width"], values["height"] = (int(v) for v in settings["Size"].lower().split("x"))
        if "Lora weights" in settings:
            pairs = (item.rsplit(":", 1) for item in settings["Lora weights"].split(","))
            values["loras"] = tuple((name.strip(), float(w)) for name, w in pairs)
    except ValueError as e:
        raise ValueError(f"unreadable infotext value ({e})") from None
    if "Hires upscale" in settings and "strength" in values:  # A1111: the hires pass's strength
        values["hires_strength"] = values.pop("strength")
    return GenerationParams(prompt, negative=negative, **values)
