"""Inpainting and outpainting: the picture and mask at working size, where the masked area starts, and
the inpainting models' extra UNet input (mask + masked image).

Any model inpaints: outside the mask its clean estimate is replaced by the original latent at every
step (`MaskedDenoiser`). Inpainting models (UNet in_channels 9) instead see the mask and the masked
image's latent concatenated to `x`; without a mask they see A1111's "everything to paint" input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image

from openldm.diffusion.noise import BatchNoise
from openldm.models.vae_tiling import AUTO_TILING, VAETiling
from openldm.pipelines import images as im
from openldm.pipelines.params import MASKED_CONTENT, GenerationParams
from openldm.pipelines.run import Start

if TYPE_CHECKING:
    from openldm.pipelines.pipeline import Pipeline

# "latent noise" fills the masked area with the noise of seed + 0x5EED, for the batch's first seed: a
# stream of its own, so that the fill is not the sampler's starting noise (image and fill would then
# be correlated), and fixed by the seed, so that the PNG's settings regenerate it.
MASKED_NOISE_SEED_OFFSET = 0x5EED


@dataclass(frozen=True)
class Overlay:
    """The picture to inpaint at working size, and how to put results back into the original."""

    image: Image.Image
    mask: Image.Image
    original: Image.Image
    original_mask: Image.Image
    box: tuple[int, int, int, int] | None = None

    def apply(self, picture: Image.Image) -> Image.Image:
        """Outside the mask the result keeps the original pixels ("only masked": pasted back)."""
        if self.box is not None:
            return im.paste_back(self.original, picture, self.box, self.original_mask)
        return Image.composite(picture, self.original, self.mask)


def outpaint_canvas(
    params: GenerationParams, image: Image.Image | None, mask: Image.Image | None
) -> tuple[Image.Image | None, Image.Image | None]:
    """The image on a canvas grown by `params.outpaint` and the mask of the new area (plus `mask`'s)."""
    if not any(params.outpaint):
        return image, mask
    if image is None:
        raise ValueError("outpainting extends an image: give one")
    outpaint_size(params.outpaint, image.size)
    left, right, top, bottom = params.outpaint
    return im.extend_canvas(image.convert("RGB"), left=left, top=top, right=right, bottom=bottom, mask=mask)


def outpaint_size(outpaint: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int]:
    """The canvas an image of `size` grows to; it is what is sampled, so a multiple of 8 (even when
    --width/--height then resize it), else a one-line error before anything is loaded."""
    left, right, top, bottom = outpaint
    if min(outpaint) < 0:
        raise ValueError(f"outpainting adds pixels: (left, right, top, bottom) {outpaint} is negative")
    width, height = size[0] + left + right, size[1] + top + bottom
    if width % 8 or height % 8:
        raise ValueError(f"outpainting {size[0]}x{size[1]} by (left, right, top, bottom) {outpaint} makes "
                         f"{width}x{height}: choose the pixels added so that the new size is a multiple of 8")
    return width, height


def prepare_inpaint(params: GenerationParams, image: Image.Image, mask: Image.Image, width: int,
                    height: int) -> Overlay:
    """Mask blur/invert, "fill" content, and the "only masked" crop of the region to repaint."""
    if mask.size != image.size:
        raise ValueError(f"mask size {mask.size[0]}x{mask.size[1]} does not match the image size "
                         f"{image.size[0]}x{image.size[1]}")
    image = image.convert("RGB")
    mask = im.prepare_mask(mask, params.mask_blur, params.invert_mask)
    original = image
    if params.masked_content == "fill":
        image = im.fill_masked(image, mask)
    if not params.only_masked:
        image = im.resize_image(image, width, height)
        mask = mask.resize((width, height), im.LANCZOS)
        return Overlay(image, mask, image if params.masked_content != "fill" else
                       im.resize_image(original, width, height), mask)
    box = im.masked_region(mask, params.only_masked_padding, width, height)
    work = im.resize_image(image.crop(box), width, height)
    return Overlay(work, mask.crop(box).resize((width, height), im.LANCZOS), original, mask, box)


def inpaint_start(pipe: Pipeline, params: GenerationParams, overlay: Overlay,
                  seeds: tuple[int, ...]) -> Start:
    """The image latent with its masked area prepared, and the mask as the model takes it."""
    latent = pipe.encode_image(overlay.image, params.tiling())
    binary = im.mask_to_tensor(overlay.mask).to(pipe.device).round()
    small = F.interpolate(binary, size=latent.shape[-2:], mode="nearest")
    start = masked_content(params, latent, small, seeds)
    if pipe.config.is_inpainting:
        masked = im.to_tensor([overlay.image]).to(pipe.device) * (binary < 0.5)
        masked_latent = pipe.encode_image(masked, params.tiling())
        return Start(start, params.strength, concat=torch.cat([small, masked_latent.to(small)], dim=1))
    return Start(start, params.strength, keep=1 - small)


def masked_content(params: GenerationParams, latent: torch.Tensor, small_mask: torch.Tensor,
                   seeds: tuple[int, ...]) -> torch.Tensor:
    """What the masked area starts from: the image, its fill, fresh noise or zeros."""
    if params.masked_content not in MASKED_CONTENT:
        raise ValueError(f"unknown masked content {params.masked_content!r}; choose one of "
                         f"{', '.join(MASKED_CONTENT)}")
    if params.masked_content == "latent_noise":
        fill_seeds = [s + MASKED_NOISE_SEED_OFFSET for s in seeds[:1]]
        noise = BatchNoise(fill_seeds, latent.shape[1:], device=latent.device)()
        return latent * (1 - small_mask) + noise * small_mask
    if params.masked_content == "latent_nothing":
        return latent * (1 - small_mask)
    return latent


def unmasked_concat(pipe: Pipeline, width: int, height: int,
                    tiling: VAETiling = AUTO_TILING) -> torch.Tensor:
    """An inpainting model's extra input with no mask, as A1111 makes it: everything is to be painted.

    The mask is all ones and the masked image is the image times (1 - mask), all zeros (mid-grey).
    """
    grey = torch.zeros(1, pipe.vae.cfg.in_channels, height, width)
    masked_latent = pipe.encode_image(grey, tiling)
    return torch.cat([torch.ones_like(masked_latent[:, :1]), masked_latent], dim=1).float()
