"""The hires fix: generate at the base size (or take an image), enlarge, then img2img at `hires_strength`.

The enlargement is the upscaler's (`params.UPSCALER_NAMES`): A1111's latent modes resize the latents
with torch's interpolation, "lanczos" decodes, resizes the pixels and encodes again, "x4" decodes,
runs the SD x4 upscaler model (`Run.upscaler`, see `x4`) with the same prompt and seed, resizes its
4x image to the target size and encodes again. The target size follows A1111's hr_scale and
hr_resize_x/y rules (`hires_size`); the second pass may have its own prompts, sampler and scale.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image

from openldm.models.vae_tiling import AUTO_TILING
from openldm.pipelines import images as im
from openldm.pipelines.params import UPSCALERS, GenerationParams, HiresSize, hires_size
from openldm.pipelines.run import Run, Start
from openldm.pipelines.x4 import X4Settings, X4Tiling, upscale_x4, x4_infotext

if TYPE_CHECKING:
    from openldm.pipelines.pipeline import Pipeline

# A1111's latent upscalers (modules/shared_items.py `latent_upscale_modes`): (interpolation, antialias)
LATENT_MODES = {
    "latent": ("bilinear", False), "latent_antialiased": ("bilinear", True),
    "latent_bicubic": ("bicubic", False), "latent_bicubic_antialiased": ("bicubic", True),
    "latent_nearest": ("nearest", False), "latent_nearest_exact": ("nearest-exact", False),
}
HIRES_X4 = X4Settings(tiling=X4Tiling(128, 16))  # in 128 px tiles: a 1024 px result fits anywhere


def hires_fix(pipe: Pipeline, run: Run, image: Image.Image | None) -> torch.Tensor:
    """The final latents of a hires-fix batch: base pass (or `image`), enlarged, then refined."""
    params = run.params
    if image is None:
        base = pipe.sample(dataclasses.replace(run, latents=None))
    else:
        base = pipe.encode_image(im.resize_image(image, run.width, run.height), params.tiling())
        base = base.expand(len(run.seeds), -1, -1, -1)
    size = hires_size(run.width, run.height, params)
    start = crop(enlarge(pipe, base, params.upscaler, size.width, size.height, run), size, pipe)
    width, height = size.final
    big = dataclasses.replace(run, params=second_pass(params), width=width, height=height, latents=None,
                              first_pass_steps=params.steps if image is None else 0)
    return pipe.sample(big, Start(start, params.hires_strength))


def second_pass(params: GenerationParams) -> GenerationParams:
    """The hires pass's settings: its steps, prompts, sampler and scale where they are given."""
    return dataclasses.replace(
        params, steps=params.hires_steps or params.steps, prompt=params.hires_prompt or params.prompt,
        negative=params.hires_negative or params.negative, sampler=params.hires_sampler or params.sampler,
        cfg=params.cfg if params.hires_cfg is None else params.hires_cfg)


def enlarge(pipe: Pipeline, x: torch.Tensor, upscaler: str, width: int, height: int,
            run: Run | None = None) -> torch.Tensor:
    """Latents of the images `x` enlarged to width x height pixels by `upscaler` (x4: `run.upscaler`)."""
    if upscaler in LATENT_MODES:
        mode, antialias = LATENT_MODES[upscaler]
        f = pipe.config.vae.downsample_factor
        return F.interpolate(x, size=(height // f, width // f), mode=mode, antialias=antialias)
    if upscaler == "lanczos":
        tiling = run.params.tiling() if run is not None else AUTO_TILING
        pictures = [p.resize((width, height), im.LANCZOS) for p in pipe.decode(x, tiling)]
        return torch.cat([pipe.encode_image(p, tiling) for p in pictures])
    if upscaler == "x4":
        if run is None or run.upscaler is None:
            raise ValueError("the x4 upscaler needs an x4-upscaler model (--hires-upscaler PATH)")
        tiling = run.params.tiling()
        return torch.cat([pipe.encode_image(p.resize((width, height), im.LANCZOS), tiling)
                          for p in _x4_pictures(run.upscaler, pipe.decode(x, tiling), run)])
    raise ValueError(f"unknown upscaler {upscaler!r}; choose {' or '.join(UPSCALERS)}")


def crop(x: torch.Tensor, size: HiresSize, pipe: Pipeline) -> torch.Tensor:
    """The centred crop of enlarged latents that a target of another aspect keeps (as A1111 cuts it)."""
    f = pipe.config.vae.downsample_factor
    cut_x, cut_y = size.crop_x // f, size.crop_y // f
    return x[:, :, cut_y // 2 : x.shape[2] - (cut_y + 1) // 2, cut_x // 2 : x.shape[3] - (cut_x + 1) // 2]
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
