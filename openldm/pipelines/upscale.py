"""The hires fix: generate at the base size (or take an image), enlarge, then img2img at `hires_strength`.

The enlargement is the upscaler's: "latent" resizes the latents bilinearly, "lanczos" decodes, resizes
the pixels and encodes again, "x4" decodes, runs the SD x4 upscaler model (`Run.upscaler`, see `x4`)
with the same prompt and seed, resizes its 4x image to the target size and encodes again.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image

from openldm.pipelines import images as im
from openldm.pipelines.params import UPSCALERS, GenerationParams
from openldm.pipelines.run import Run, Start
from openldm.pipelines.x4 import X4Settings, X4Tiling, upscale_x4, x4_infotext

if TYPE_CHECKING:
    from openldm.pipelines.pipeline import Pipeline

HIRES_X4 = X4Settings(tiling=X4Tiling(128, 16))  # in 128 px tiles: a 1024 px result fits anywhere


def hires_fix(pipe: Pipeline, run: Run, image: Image.Image | None) -> torch.Tensor:
    """The final latents of a hires-fix batch: base pass (or `image`), enlarged, then refined."""
    params = run.params
    if image is None:
        base = pipe.sample(dataclasses.replace(run, latents=None))
    else:
        base = pipe.encode_image(im.resize_image(image, run.width, run.height))
        base = base.expand(len(run.seeds), -1, -1, -1)
    big_w, big_h = round8(run.width * params.upscale_by), round8(run.height * params.upscale_by)
    start = enlarge(pipe, base, params.upscaler, big_w, big_h, run)
    hires = dataclasses.replace(params, steps=params.hires_steps or params.steps)
    big = dataclasses.replace(run, params=hires, width=big_w, height=big_h, latents=None)
    return pipe.sample(big, Start(start, params.hires_strength))


def enlarge(pipe: Pipeline, x: torch.Tensor, upscaler: str, width: int, height: int,
            run: Run | None = None) -> torch.Tensor:
    """Latents of the images `x` enlarged to width x height pixels by `upscaler` (x4: `run.upscaler`)."""
    if upscaler == "latent":
        f = pipe.config.vae.downsample_factor
        return F.interpolate(x, size=(height // f, width // f), mode="bilinear", align_corners=False)
    if upscaler == "lanczos":
        pictures = [p.resize((width, height), im.LANCZOS) for p in pipe.decode(x)]
        return torch.cat([pipe.encode_image(p) for p in pictures])
    if upscaler == "x4":
        if run is None or run.upscaler is None:
            raise ValueError("the x4 upscaler needs an x4-upscaler model (--hires-upscaler PATH)")
        return torch.cat([pipe.encode_image(p.resize((width, height), im.LANCZOS))
                          for p in _x4_pictures(run.upscaler, pipe.decode(x), run)])
    raise ValueError(f"unknown upscaler {upscaler!r}; choose {' or '.join(UPSCALERS)}")


def upscaler_infotext(run: Run) -> dict[str, Any]:
    """A hires fix's x4 model (by name: `Renderer` adds its file's hash) and how it ran, for the infotext."""
    if run.mode != "upscale" or run.params.upscaler != "x4" or run.upscaler is None:
        return {}
    return {"Hires upscaler model": run.upscaler.name, **x4_infotext(HIRES_X4)}


def _x4_pictures(model: Pipeline, pictures: list[Image.Image], run: Run) -> list[Image.Image]:
    """Each picture 4x larger by the x4 model: the run's prompt, seed and steps, the model's guidance."""
    settings, out = HIRES_X4, []
    for picture, seed in zip(pictures, run.seeds):
        params = GenerationParams(run.params.prompt, negative=run.params.negative, seed=seed,
                                  steps=run.params.steps, sampler=run.params.sampler)
        out.append(upscale_x4(model, picture, params, noise_level=settings.noise_level,
                              tiling=settings.tiling)[0].image)
    return out


def round8(value: float) -> int:
    return max(8, int(round(value / 8)) * 8)
