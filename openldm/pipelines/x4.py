"""The SD 2 x4 upscaler: sample a latent the size of the input image, beside that image noised to a level.

ldm's `LatentUpscaleDiffusion`: the low-resolution image (in [-1, 1]) is noised by its own DDPM schedule
to `noise_level` (the model's `NoiseAugmentation`), concatenated to the latent on channels at every
model call, and the level itself is the UNet's class label. Its VAE has f=4, so the latent is as large
as the input and the decoded image four times larger.

Large inputs are processed in tiles: each UNet call runs on overlapping latent tiles blended with
linear ramps (`models.vae.tiled`), and the VAE decodes in tiles too, so memory follows the tile size.
The sampler still sees one whole latent, so the tiles agree on every step's schedule and noise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from openldm.config import NoiseAugmentation
from openldm.diffusion.denoisers import StepTracker
from openldm.diffusion.schedules import make_betas
from openldm.models.vae import tiled
from openldm.pipelines import images as im
from openldm.pipelines.decoding import decode_finite
from openldm.pipelines.params import X4_MODE, GenerationParams
from openldm.pipelines.run import Interrupted, Result, Run, Start, StepCallback, batch_params

if TYPE_CHECKING:
    from openldm.pipelines.pipeline import Pipeline

# The augmentation noise of image i is drawn from seed_i + this, so it is not the latent noise's stream.
LOW_RES_NOISE_SEED_OFFSET = 0x4A4
DEFAULT_NOISE_LEVEL = 20  # diffusers' and the model card's default


@dataclass(frozen=True)
class X4Tiling:
    """UNet and VAE-decode tiles, in latent pixels (= input-image pixels); None: the whole image."""

    tile: int | None = None
    overlap: int = 16

    def __post_init__(self) -> None:
        bad_overlap = self.tile is not None and not 0 <= self.overlap < self.tile // 2
        if self.tile is not None and (self.tile < 16 or self.tile % 8 or bad_overlap):
            raise ValueError(f"x4 tiles must be a multiple of 8 of at least 16 with 0 <= overlap < tile/2, "
                             f"got tile {self.tile}, overlap {self.overlap}")


@dataclass(frozen=True)
class X4Settings:
    """What an x4 run takes beside `GenerationParams`: the augmentation's noise level and the tiles."""

    noise_level: int = DEFAULT_NOISE_LEVEL
    tiling: X4Tiling = X4Tiling()


def x4_infotext(settings: X4Settings) -> dict[str, Any]:
    """What an x4 pass adds to the infotext: its noise level, and its tiles when it runs in tiles."""
    tiles = {"x4 tile": settings.tiling.tile, "x4 tile overlap": settings.tiling.overlap}
    return {"Noise level": settings.noise_level, **(tiles if settings.tiling.tile is not None else {})}


def noise_augment(image: torch.Tensor, level: int, aug: NoiseAugmentation,
                  noise: torch.Tensor) -> torch.Tensor:
    """q_sample in the augmentation's schedule: sqrt(abar) x + sqrt(1 - abar) noise at timestep `level`."""
    betas = make_betas("scaled_linear", aug.timesteps, aug.linear_start, aug.linear_end)
    abar = torch.cumprod(1 - betas, 0)[level]
    return abar.sqrt().to(image) * image + (1 - abar).sqrt().to(image) * noise


def augmentation_noise(seeds: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """One CPU-drawn normal sample of `shape` per seed (offset from the latent's), batch first."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(
        (s + LOW_RES_NOISE_SEED_OFFSET) % 2**64)) for s in seeds])


@dataclass(frozen=True)
class LowRes:
    """The `guidance.Extra` of an x4 run: the noised low-resolution image, its noise level, the tiles."""

    image: torch.Tensor  # (1, 3, h, w) in [-1, 1]
    noise_level: int
    tiling: X4Tiling = X4Tiling()
    noise: torch.Tensor | None = None  # the augmentation noise (batch, 3, h, w); None: from the seeds

    def cond(self, pipe: Pipeline, run: Run, rows: int, *, uncond: bool, tracker: StepTracker,
             steps: int) -> dict[str, Any]:
        assert pipe.config.low_res is not None
        noise = self.noise if self.noise is not None else augmentation_noise(run.seeds, self.image.shape[1:])
        noised = noise_augment(self.image, self.noise_level, pipe.config.low_res, noise)
        cond: dict[str, Any] = {
            "concat": noised.to(pipe.device).expand(rows, -1, -1, -1),
            "y": torch.full((rows,), float(self.noise_level), device=pipe.device),
        }
        if self.tiling.tile is not None:
            cond["tiles"] = (self.tiling.tile, self.tiling.overlap)
        return cond


def tiled_call(model: Callable[..., torch.Tensor], x: torch.Tensor, concat: torch.Tensor | None,
               tiles: tuple[int, int]) -> torch.Tensor:
    """`model(latent, concat=...)` on blended (tile, overlap) latent tiles: `LowRes`'s `tiles` key."""
    def call(xc: torch.Tensor) -> torch.Tensor:
        latent, extra = xc[:, : x.shape[1]], xc[:, x.shape[1]:]
        return model(latent, concat=extra if concat is not None else None)

    inputs = x if concat is None else torch.cat([x, concat.to(x)], dim=1)
    return tiled(call, inputs, tile=tiles[0], overlap=tiles[1])


def check_x4(pipe: Pipeline, image: Image.Image, noise_level: int) -> NoiseAugmentation:
    """Fail early, in one line, on a model that is not an x4 upscaler or inputs it cannot take."""
    aug = pipe.config.low_res
    if aug is None:
        raise ValueError(f"{pipe.name} is not an x4 upscaler model ({pipe.config.name}, family "
                         f"{pipe.config.family}): give the x4-upscaler checkpoint or folder")
    if not 0 <= noise_level <= aug.max_noise_level:
        raise ValueError(f"noise level must be in [0, {aug.max_noise_level}], got {noise_level}")
    factor = 2 ** (len(pipe.config.unet.channel_mult) - 1)
    if image.width % factor or image.height % factor:
        raise ValueError(f"the x4 upscaler needs an input whose sides are multiples of {factor}; got "
                         f"{image.width}x{image.height}")
    return aug


def upscale_x4(
    pipe: Pipeline, image: Image.Image, params: GenerationParams, *, noise_level: int = DEFAULT_NOISE_LEVEL,
    tiling: X4Tiling = X4Tiling(), latents: torch.Tensor | None = None, noise: torch.Tensor | None = None,
    callback: StepCallback | None = None,
) -> list[Result]:
    """`image` four times larger, guided by `params.prompt`; one result per image of the run.

    `latents` and `noise` (the augmentation's) replace the seeds' draws, as diffusers' arguments do.
    """
    aug = check_x4(pipe, image, noise_level)
    width, height = image.width * aug.factor, image.height * aug.factor
    params = dataclasses.replace(params.with_seed(), width=width, height=height,
                                 cfg=pipe.config.guidance if params.cfg is None else params.cfg)
    extra = LowRes(im.to_tensor([image]).to(pipe.device), noise_level, tiling, noise)
    results: list[Result] = []
    with pipe.prompt_networks(params) as applied:
        for batch in batch_params(params):
            run = Run.of_batch(batch, width, height, X4_MODE, callback=callback, latents=latents,
                               extras=(extra,))
            try:
                x = pipe.sample(run, Start())
            except Interrupted:
                break
            pictures = decode_x4(pipe, x, tiling)
            results += [Result(p, run.image_params(i), X4_MODE, x[i : i + 1], applied.reports,
                               infotext=x4_infotext(X4Settings(noise_level, tiling)))
                        for i, p in enumerate(pictures)]
    return results


def decode_x4(pipe: Pipeline, x: torch.Tensor, tiling: X4Tiling) -> list[Image.Image]:
    """Model-space latents -> pictures, the VAE decoding in the same tiles as the UNet ran."""
    z = pipe.config.latent_format.from_model(x)
    return im.to_pil(decode_finite(pipe.vae, z, tile=tiling.tile, overlap=tiling.overlap))

