"""Everything that decides an image, in one record: what the CLI fills, the API takes and PNGs store."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from openldm.models.vae_tiling import DEFAULT_VAE_TILE, VAETiling

RESIZE_MODES = ("resize", "crop", "fill")  # A1111: just resize, crop and resize, resize and fill
MASKED_CONTENT = ("fill", "original", "latent_noise", "latent_nothing")  # what an inpainted area starts from
CONTROL_MODES = ("balanced", "prompt", "control")  # ControlNet: balanced, prompt or net more important
MODE_INPUTS = {  # the images each kind of run starts from
    "txt2img": (), "img2img": ("image",), "inpaint": ("image", "mask"), "outpaint": ("image",),
    "upscale": ("image",),
}
# The hires fix's upscalers: ours -> A1111's name (`hr_upscaler`, infotext `Hires upscaler`). The latent
# modes resize the latents with torch's interpolation (`upscale.LATENT_MODES`); lanczos resizes pixels;
# x4 is an x4-upscaler model (--hires-upscaler PATH), which A1111 does not have.
UPSCALER_NAMES = {
    "latent": "Latent", "latent_antialiased": "Latent (antialiased)", "latent_bicubic": "Latent (bicubic)",
    "latent_bicubic_antialiased": "Latent (bicubic antialiased)", "latent_nearest": "Latent (nearest)",
    "latent_nearest_exact": "Latent (nearest-exact)", "lanczos": "Lanczos", "x4": "x4",
}
UPSCALERS = tuple(UPSCALER_NAMES)
X4_MODE = "x4"  # the mode an x4-upscaler model's own upscale records: no img2img pass, unlike "upscale"
SEED_RANGE = 2**32  # seeds are 0 .. 2**32 - 1, as A1111 draws them; -1 means "draw one"


class SettingsError(ValueError):
    """A generation setting that cannot make an image (or is over a `Limits` bound); the message names it."""


class Unhonoured(ValueError):
    """An infotext value we read but cannot make (an upscaler we do not have)."""


def upscaler_key(name: str) -> str:
    """Our upscaler name for ours or A1111's ("Latent (bicubic)", "lanczos"), case-insensitively."""
    wanted = name.strip().lower()
    for key, display in UPSCALER_NAMES.items():
        if wanted in (key, display.lower()):
            return key
    raise Unhonoured(f"unknown upscaler {name!r}; one of {', '.join(UPSCALER_NAMES.values())}")


@dataclass(frozen=True)
class Limits:
    """Bounds on what one run may ask, so that a typo or a hostile request cannot hold a machine for hours.

    The defaults are far above what SD models are used at (1024x1024 SDXL, 20-50 steps, a few images)
    and below what makes a run take hours on a GPU; `openldm serve` may set its own.
    """

    max_prompt_chars: int = 20_000  # prompt and negative prompt, each: CLIP reads 75 tokens a chunk
    max_steps: int = 1000  # sampling steps, and hires steps
    max_batch_size: int = 64  # images sampled together
    max_images: int = 1000  # batch size x batch count
    max_side: int = 16384  # pixels, width or height
    max_pixels: int = 4096 * 4096  # width x height of what is sampled or decoded (after upscaling)
    max_upscale: float = 8.0  # upscale factor

    def check(self, params: GenerationParams) -> None:
        """Raise `SettingsError` naming the first setting over a bound."""
        for name in ("prompt", "negative", "hires_prompt", "hires_negative"):
            if len(getattr(params, name)) > self.max_prompt_chars:
                raise SettingsError(f"{name} of {len(getattr(params, name)):,} characters is over the limit "
                                    f"of {self.max_prompt_chars:,}")
        bounds = (("width", self.max_side), ("height", self.max_side), ("steps", self.max_steps),
                  ("hires_steps", self.max_steps), ("upscale_by", self.max_upscale),
                  ("hires_width", self.max_side), ("hires_height", self.max_side))
        for name, bound in bounds:
            _at_most(name, getattr(params, name), bound)
        _at_most("batch_size", params.batch_size, self.max_batch_size, "images sampled together")
        images = params.batch_size * params.batch_count
        _at_most("batch_size x batch_count", images, self.max_images, "images")
        if params.width and params.height:
            self.check_size(params.width, params.height)

    def check_size(self, width: int, height: int, what: str = "size") -> None:
        """Raise `SettingsError` if a `width` x `height` image is over the side or pixel bound."""
        if max(width, height) > self.max_side or width * height > self.max_pixels:
            raise SettingsError(f"{what} {_short(width)}x{_short(height)} is over the limit of "
                                f"{self.max_side} pixels a side and {self.max_pixels:,} pixels in all")


def _at_most(name: str, value: float | None, bound: float, unit: str = "") -> None:
    if value is not None and value > bound:
        limit = f"{bound} {unit}".strip()
        raise SettingsError(f"{name} {_short(value)} is over the limit of {limit}")


LIMITS = Limits()


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
    upscaler: str = "latent"  # one of UPSCALERS
    hires_steps: int | None = None  # None: the same number as `steps`
    hires_strength: float = 0.5
    hires: bool = False  # txt2img finished by the hires fix (A1111's enable_hr)
    hires_width: int = 0  # A1111's hr_resize_x/y: a target size instead of upscale_by (0: keep the aspect)
    hires_height: int = 0
    hires_prompt: str = ""  # the hires pass's prompts, sampler and scale ("" and None: the first pass's)
    hires_negative: str = ""
    hires_sampler: str | None = None
    hires_cfg: float | None = None
    # SDXL: the size conditioning tells the model what picture it draws; None means the image's size.
    original_size: tuple[int, int] | None = None  # (width, height) the training image had
    crop_coords: tuple[int, int] = (0, 0)  # (top, left) of the crop taken from it, as sgm writes it
    target_size: tuple[int, int] | None = None  # (width, height)
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    refiner_switch: float = 0.8  # the base samples down to timestep (1 - f) T, the refiner the rest
    refiner_model: str | None = None  # recorded by `Pipeline.generate`: the refiner used, if any
    loras: tuple[tuple[str, float], ...] = field(default_factory=tuple)
    # VAE memory savers (`models.vae_tiling`), in latent pixels (x8 image pixels for SD)
    vae_tiling: str = "auto"  # auto: tiles only when a whole decode or encode would not fit in memory
    vae_tile_size: int | None = None  # None: `vae_tiling.DEFAULT_VAE_TILE` (512 image pixels for SD)
    vae_tile_overlap: int | None = None  # None: a quarter of the tile
    vae_slicing: bool = False  # decode and encode a batch one image at a time

    def __post_init__(self) -> None:
        """Settings that can never make an image fail here, whoever builds them (CLI, API, JSON, PNG)."""
        check_settings(self)

    def validate(self, limits: Limits = LIMITS) -> GenerationParams:
        """These settings, if they are within `limits` (what a CLI run or a server request may ask)."""
        limits.check(self)
        return self

    def tiling(self) -> VAETiling:
        """How the VAE runs for these settings (tiled, whole or chosen by memory; sliced or not)."""
        size = DEFAULT_VAE_TILE if self.vae_tile_size is None else self.vae_tile_size
        overlap = size // 4 if self.vae_tile_overlap is None else self.vae_tile_overlap
        return VAETiling(self.vae_tiling, size, overlap, self.vae_slicing)  # type: ignore[arg-type]

    def with_seed(self) -> GenerationParams:
        """A copy whose seed is a concrete number, drawn at random if it was -1; the subseed too if in use.

        The subseed stays -1 while subseed_strength is 0, so equal settings write equal files.
        """
        rng = random.SystemRandom()
        seed = self.seed if self.seed >= 0 else rng.randrange(SEED_RANGE)
        in_use = self.subseed < 0 and self.subseed_strength > 0
        subseed = rng.randrange(SEED_RANGE) if in_use else self.subseed
        return dataclasses.replace(self, seed=seed, subseed=subseed)

    def to_json(self) -> dict[str, Any]:
        return {k: _lists(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: Any, limits: Limits = LIMITS) -> GenerationParams:
        """Settings from JSON (a server request, a PNG chunk); anything wrong raises `SettingsError`."""
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
            raise SettingsError("generation settings must be a JSON object with a \"prompt\" string")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SettingsError(f"unknown generation settings: {', '.join(sorted(map(str, unknown)))}")
        return cls(**{k: _tuples(v) for k, v in data.items()}).validate(limits)


# Inclusive ranges of the numeric settings (None: no upper bound here; `Limits` bounds the costly ones).
_RANGES: dict[str, tuple[float, float | None]] = {
    "steps": (1, None), "hires_steps": (1, None), "batch_size": (1, None), "batch_count": (1, None),
    "width": (8, None), "height": (8, None), "clip_skip": (0, None), "only_masked_padding": (0, None),
    "cfg": (0, 100), "guidance_rescale": (0, 1), "subseed_strength": (0, 1), "strength": (0, 1),
    "hires_strength": (0, 1), "refiner_switch": (0, 1), "mask_blur": (0, 1024), "eta": (0, 100),
    "s_noise": (0, 100), "hires_width": (0, None), "hires_height": (0, None), "hires_cfg": (0, 100),
    "aesthetic_score": (-1000, 1000), "negative_aesthetic_score": (-1000, 1000),
}
_CHOICES = {"resize_mode": RESIZE_MODES, "masked_content": MASKED_CONTENT, "upscaler": UPSCALERS}
_INT_TUPLES = {"outpaint": (4, 0), "crop_coords": (2, 0), "original_size": (2, 1), "target_size": (2, 1)}


def check_settings(params: GenerationParams) -> None:
    """Raise `SettingsError` naming the first setting of the wrong type or outside its range."""
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        _check_type(f.name, f.type, value)
        if isinstance(value, float) and not math.isfinite(value):
            raise SettingsError(f"{f.name} {value} is not a finite number")
    for name, (low, high) in _RANGES.items():
        value = getattr(params, name)
        if value is not None and not (low <= value and (high is None or value <= high)):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise SettingsError(f"{name} {_short(value)} is out of range: it must be {bound}")
    for name in ("seed", "subseed"):
        if not -1 <= getattr(params, name) < SEED_RANGE:
            raise SettingsError(f"{name} {_short(getattr(params, name))} is out of range: -1 (random) or "
                                f"0 to {SEED_RANGE - 1}")
    if not params.upscale_by > 0:
        raise SettingsError(f"upscale_by {params.upscale_by} must be more than 0 (2 doubles the size)")
    for name, choices in _CHOICES.items():
        if getattr(params, name) not in choices:
            raise SettingsError(f"unknown {name} {_short(getattr(params, name))}; one of "
                                f"{', '.join(choices)}")
    for name, (length, low) in _INT_TUPLES.items():
        _check_ints(name, getattr(params, name), length, low)
    for pair in params.loras:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)
                and _is_number(pair[1]) and abs(pair[1]) <= 100):  # abs(nan) <= 100 is False too
            raise SettingsError(f"loras: {_short(pair)} is not a (name, weight) pair with a weight of "
                                "-100 to 100")
    try:
        params.tiling()  # `VAETiling` owns the rules of its mode, tile size and overlap
    except ValueError as e:
        raise SettingsError(str(e)) from None


def _check_ints(name: str, value: tuple | None, length: int, low: int) -> None:
    if value is None:
        return
    if len(value) != length or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise SettingsError(f"{name} must be {length} integers, not {_short(value)}")
    if min(value) < low:
        raise SettingsError(f"{name} {_short(value)} is out of range: each must be at least {low}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(value: Any, limit: int = 60) -> str:
    """A value as it goes into a one-line message: its repr, cut short (a prompt may be megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


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
        raise SettingsError(f"setting {name!r} must be {' or '.join(kinds)}, not {_short(value)}")


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
        settings |= {"Denoising strength": params.hires_strength, **_hires_infotext(params)}
    elif mode not in ("txt2img", X4_MODE):
        settings["Denoising strength"] = params.strength
    if params.clip_skip and params.clip_skip > 1:
        settings["Clip skip"] = params.clip_skip
    if params.guidance_rescale:
        settings["CFG Rescale phi"] = params.guidance_rescale
    settings |= {"Eta": params.eta, "Sigma noise": params.s_noise}  # None (the sampler's own) is not written
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
    return settings | _vae_settings(params)


def _vae_settings(params: GenerationParams) -> dict[str, Any]:
    """The VAE memory savers, where they are not the defaults (tiling changes pixels, a little)."""
    settings: dict[str, Any] = {} if params.vae_tiling == "auto" else {"VAE tiling": params.vae_tiling}
    tiles = {"VAE tile size": params.vae_tile_size, "VAE tile overlap": params.vae_tile_overlap}
    settings |= {key: value for key, value in tiles.items() if value is not None}
    if params.vae_slicing:
        settings["VAE slicing"] = True
    return settings


def _hires_infotext(params: GenerationParams) -> dict[str, Any]:
    """A1111's keys of a hires pass; a target size is `Hires resize` instead of `Hires upscale`."""
    from openldm.diffusion.registry import resolve

    resized = params.hires_width or params.hires_height
    size = {"Hires resize": f"{params.hires_width}x{params.hires_height}"} if resized else {
        "Hires upscale": params.upscale_by}
    sampler = params.hires_sampler and resolve(params.hires_sampler)[0].display
    return size | {"Hires steps": params.hires_steps, "Hires upscaler": UPSCALER_NAMES[params.upscaler],
                   "Hires prompt": params.hires_prompt or None, "Hires negative prompt": params.hires_negative
                   or None, "Hires sampler": sampler, "Hires CFG Scale": params.hires_cfg}


# The hires fix's size, A1111's rule (processing.py `init` of txt2img with enable_hr).
SIZE_STEP = 8  # the VAE's factor: A1111 sizes the latents `to // 8`, so a side is floored to a multiple of 8


@dataclass(frozen=True)
class HiresSize:
    """The enlarged size, and the centred crop of it the hires pass samples (A1111's truncate_x/y)."""

    width: int  # enlarged to, keeping the base image's aspect
    height: int
    crop_x: int = 0  # pixels cut off across the width, then the height (multiples of 8)
    crop_y: int = 0

    @property
    def final(self) -> tuple[int, int]:
        return self.width - self.crop_x, self.height - self.crop_y


def hires_size(width: int, height: int, params: GenerationParams) -> HiresSize:
    """A1111's hires size: `upscale_by`, or a target (hires_width/height) where 0 keeps the aspect and
    two sides cover the target, then crop to it."""
    to_w, to_h = params.hires_width, params.hires_height
    if not (to_w or to_h):
        return HiresSize(_floor8(width * params.upscale_by), _floor8(height * params.upscale_by))
    if not to_h or (to_w and width / height < to_w / to_h):
        cover_w, cover_h = to_w, to_w * height // width
    else:
        cover_w, cover_h = to_h * width // height, to_h
    big = HiresSize(_floor8(cover_w), _floor8(cover_h))
    if not (to_w and to_h):
        return big
    return dataclasses.replace(big, crop_x=(cover_w - to_w) // SIZE_STEP * SIZE_STEP,
                               crop_y=(cover_h - to_h) // SIZE_STEP * SIZE_STEP)


def _floor8(value: float) -> int:
    """A side as A1111 makes it, int() then down to a multiple of 8 (at least 8)."""
    return max(SIZE_STEP, int(value) // SIZE_STEP * SIZE_STEP)


def seeds_for(seed: int, count: int, offset: int = 0) -> list[int]:
    """Image i of a run uses seed + i (past 2**32 - 1 it wraps to 0), so any image can be regenerated alone.

    A subseed of -1 (variation seeds not in use) stays -1 for every image.
    """
    if seed < 0:
        return [seed] * count
    return [(seed + offset + i) % SEED_RANGE for i in range(count)]


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


# Every infotext key we know, in one table. A key with a reader is honoured: (our field, how to read its
# value), the inverse of `infotext_settings`. IGNORED keys do not change the image, or name files that
# other options choose (--model, --vae, --lora: the CLI notes a mismatch). Any other key may change
# the image and cannot be honoured: `read_infotext` lists it, and `--from-png` refuses it.
IGNORED = None
INFOTEXT_KEYS: dict[str, tuple[str, Callable[[str], Any]] | None] = {
    "Steps": ("steps", int), "Sampler": ("sampler", str), "Schedule type": ("schedule", str),
    "CFG scale": ("cfg", read_float), "Seed": ("seed", int), "Denoising strength": ("strength", read_float),
    "Clip skip": ("clip_skip", int), "CFG Rescale phi": ("guidance_rescale", read_float),
    "Variation seed": ("subseed", int), "Variation seed strength": ("subseed_strength", read_float),
    "Eta": ("eta", read_float), "Eta DDIM": ("eta", read_float), "Sigma noise": ("s_noise", read_float),
    "Mask blur": ("mask_blur", read_float),
    "Hires upscale": ("upscale_by", read_float),
    "Hires resize": ("hires_width", partial(read_ints, count=2, sep="x")),  # and hires_height
    "Hires steps": ("hires_steps", lambda v: int(v) or None),  # A1111's 0: as many as `steps`
    "Hires upscaler": ("upscaler", upscaler_key),
    "Hires prompt": ("hires_prompt", str), "Hires negative prompt": ("hires_negative", str),
    "Hires sampler": ("hires_sampler", str), "Hires CFG Scale": ("hires_cfg", read_float),
    "Original size": ("original_size", partial(read_ints, count=2, sep="x")),
    "Target size": ("target_size", partial(read_ints, count=2, sep="x")),
    "Crop coords": ("crop_coords", partial(read_ints, count=2)),
    "Outpaint": ("outpaint", partial(read_ints, count=4)),
    "Refiner": ("refiner_model", str), "Refiner switch at": ("refiner_switch", read_float),
    "Size": ("width", partial(read_ints, count=2, sep="x")),  # and height
    "Lora weights": ("loras", lambda v: tuple((n.strip(), read_float(w)) for n, w in
                                             (item.rsplit(":", 1) for item in v.split(",")))),
    "Model": IGNORED, "Model hash": IGNORED, "VAE": IGNORED, "VAE hash": IGNORED, "Lora hashes": IGNORED,
    "TI hashes": IGNORED, "Hashes": IGNORED, "Version": IGNORED,
    "VAE tiling": ("vae_tiling", str), "VAE tile size": ("vae_tile_size", int),
    "VAE tile overlap": ("vae_tile_overlap", int), "VAE slicing": ("vae_slicing", lambda v: v == "True"),
}
_PAIRS = {"width": "height", "hires_width": "hires_height"}  # "WxH" keys fill two fields


def read_infotext(prompt: str, negative: str,
                  settings: dict[str, str]) -> tuple[GenerationParams, tuple[str, ...]]:
    """Settings from an A1111-style infotext (ours or A1111's own), and the keys we cannot honour.

    Those keys ("Key: value") are left out of the settings: the caller decides whether that is an error.
    """
    values: dict[str, Any] = {}
    unhonoured = []
    for key, text in settings.items():
        entry = INFOTEXT_KEYS.get(key, False)
        if entry is IGNORED:
            continue
        if entry is False:
            unhonoured.append(f"{key}: {_short(text, 40)}")
            continue
        name, read = entry
        try:
            value = read(text)
        except Unhonoured as e:
            unhonoured.append(f"{key}: {_short(text, 40)} ({e})")
            continue
        except ValueError as e:
            raise ValueError(f"unreadable infotext value ({e})") from None
        if name in _PAIRS:
            values[name], values[_PAIRS[name]] = value
        else:
            values[name] = value
    if "Hires upscale" in settings or "Hires resize" in settings:  # A1111's enable_hr
        values["hires"] = True
        if "strength" in values:  # A1111: the hires pass's strength
            values["hires_strength"] = values.pop("strength")
    try:
        return GenerationParams(prompt, negative=negative, **values), tuple(unhonoured)
    except SettingsError as e:  # read, but no image can have been made with it
        raise SettingsError(f"unreadable infotext value ({e})") from None


def params_from_infotext(prompt: str, negative: str, settings: dict[str, str]) -> GenerationParams:
    """Settings from an A1111-style infotext; keys we cannot honour are left out (see `read_infotext`)."""
    return read_infotext(prompt, negative, settings)[0]
