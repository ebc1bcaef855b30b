"""Everything that decides an image, in one record: what the CLI fills, the API takes and PNGs store."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from functools import partial
from typing import Any

RESIZE_MODES = ("resize", "crop", "fill")  # A1111: just resize, crop and resize, resize and fill
MASKED_CONTENT = ("fill", "original", "latent_noise", "latent_nothing")  # what an inpainted area starts from
MODE_INPUTS = {  # the images each kind of run starts from
    "txt2img": (), "img2img": ("image",), "inpaint": ("image", "mask"), "outpaint": ("image",),
    "upscale": ("image",),
}


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    negative: str = ""
    steps: int = 20
    sampler: str = "euler"
    schedule: str | None = None  # None: the sampler's default
    cfg: float | None = None  # None: the model's own scale (`ModelConfig.guidance`, 7 for SD)
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
    outpaint: tuple[int, int, int, int] = (0, 0, 0, 0)  # pixels added (left, right, top, bottom): inpainted
    # hires fix / upscaling
    upscale_by: float = 2.0
    upscaler: str = "latent"  # latent | lanczos
    hires_steps: int | None = None  # None: the same number as `steps`
    hires_strength: float = 0.5
    # SDXL: the size conditioning tells the model what picture it draws; None means the image's size.
    original_size: tuple[int, int] | None = None  # (width, height) the training image had
    crop_coords: tuple[int, int] = (0, 0)  # (top, left) of the crop taken from it, as sgm writes it
    target_size: tuple[int, int] | None = None  # (width, height)
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    refiner_switch: float = 0.8  # the base samples down to timestep (1 - f) T, the refiner the rest
    refiner_model: str | None = None  # recorded by `Pipeline.generate`: the refiner used, if any
    loras: tuple[tuple[str, float], ...] = field(default_factory=tuple)

    def with_seed(self) -> GenerationParams:
        """A copy whose seed (and subseed) is a concrete number, drawn at random if it was -1."""
        rng = random.SystemRandom()
        seed = self.seed if self.seed >= 0 else rng.randrange(2**32)
        subseed = self.subseed if self.subseed >= 0 else rng.randrange(2**32)
        return dataclasses.replace(self, seed=seed, subseed=subseed)

    def to_json(self) -> dict[str, Any]:
        return {k: _lists(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerationParams:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown generation settings: {', '.join(sorted(unknown))}")
        values = {k: _tuples(v) for k, v in data.items()}
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, value in values.items():
            _check_type(name, types[name], value)
        return cls(**values)


_KINDS = {"int": int, "float": (int, float), "str": str, "bool": bool, "tuple": tuple}


def _check_type(name: str, annotation: str, value: Any) -> None:
    """Settings that arrive as JSON (a server request, a PNG chunk) must have the field's type."""
    kinds = [part.strip().split("[")[0] for part in annotation.split("|")]
    if value is None:
        ok = "None" in kinds
    elif isinstance(value, bool):  # JSON true is not a number of steps
        ok = "bool" in kinds
    else:
        ok = any(isinstance(value, _KINDS[kind]) for kind in kinds if kind != "None")
    if not ok:
        raise ValueError(f"setting {name!r} must be {' or '.join(kinds)}, not {value!r}")


def _lists(value: Any) -> Any:
    return [_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value: Any) -> Any:
    """JSON lists back into the tuples the frozen record holds (sizes, crops, LoRA pairs)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (tuple, list)) else value


def infotext_settings(
    params: GenerationParams, width: int, height: int, model_name: str, model_hash: str, mode: str
) -> dict[str, Any]:
    """The `Key: value` pairs of an A1111 infotext for these settings."""
    from openldm.diffusion.registry import SCHEDULE_DISPLAY, resolve  # the samplers, and torch: only here

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
    for key, size in (("Original size", params.original_size), ("Target size", params.target_size)):
        if size is not None:
            settings[key] = "{}x{}".format(*size)
    if params.crop_coords != (0, 0):
        settings["Crop coords"] = "{},{}".format(*params.crop_coords)
    if any(params.outpaint):
        settings["Outpaint"] = ",".join(map(str, params.outpaint))
    if params.refiner_model is not None:  # A1111's keys
        settings |= {"Refiner": params.refiner_model, "Refiner switch at": params.refiner_switch}
    return settings


def seeds_for(seed: int, count: int, offset: int = 0) -> list[int]:
    """Image i of a run uses seed + i, so any image can be regenerated alone."""
    return [(seed + offset + i) % 2**64 for i in range(count)]


def read_ints(text: str, count: int, sep: str = ",") -> tuple[int, ...]:
    """`count` integers written with `sep` between them ("1024x768", "0,64,0,0")."""
    parts = text.lower().split(sep)
    if len(parts) != count:
        raise ValueError(f"{text!r} is not {count} integers separated by {sep!r}")
    return tuple(int(p) for p in parts)


def read_float(text: str) -> float:
    """A finite number: float() also reads "nan" and "inf", which no setting means."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


# A1111 infotext key -> (our field, how to read its value); the inverse of `infotext_settings`.
_FROM_INFOTEXT = {
    "Steps": ("steps", int), "Sampler": ("sampler", str), "Schedule type": ("schedule", str),
    "CFG scale": ("cfg", read_float), "Seed": ("seed", int), "Denoising strength": ("strength", read_float),
    "Clip skip": ("clip_skip", int), "CFG Rescale phi": ("guidance_rescale", read_float),
    "Variation seed": ("subseed", int), "Variation seed strength": ("subseed_strength", read_float),
    "Hires upscale": ("upscale_by", read_float), "Hires steps": ("hires_steps", int),
    "Hires upscaler": ("upscaler", str.lower),
    "Original size": ("original_size", partial(read_ints, count=2, sep="x")),
    "Target size": ("target_size", partial(read_ints, count=2, sep="x")),
    "Crop coords": ("crop_coords", partial(read_ints, count=2)),
    "Outpaint": ("outpaint", partial(read_ints, count=4)),
    "Refiner": ("refiner_model", str), "Refiner switch at": ("refiner_switch", read_float),
}


def params_from_infotext(prompt: str, negative: str, settings: dict[str, str]) -> GenerationParams:
    """Settings from an A1111-style infotext (ours or A1111's own); keys we do not use are ignored."""
    values: dict[str, Any] = {}
    try:
        for key, (name, read) in _FROM_INFOTEXT.items():
            if key in settings:
                values[name] = read(settings[key])
        if "Size" in settings:
            values["width"], values["height"] = read_ints(settings["Size"], 2, "x")
        if "Lora weights" in settings:
            pairs = (item.rsplit(":", 1) for item in settings["Lora weights"].split(","))
            values["loras"] = tuple((name.strip(), read_float(w)) for name, w in pairs)
    except ValueError as e:
        raise ValueError(f"unreadable infotext value ({e})") from None
    if "Hires upscale" in settings and "strength" in values:  # A1111: the hires pass's strength
        values["hires_strength"] = values.pop("strength")
    return GenerationParams(prompt, negative=negative, **values)
