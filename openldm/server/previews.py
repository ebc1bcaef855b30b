"""Step previews without the VAE: a per-family linear map from latent channels to RGB (`LatentFormat`).

A 64x64 latent becomes a 64x64 JPEG in well under a millisecond, so every step can carry one.
"""

from __future__ import annotations

import io

import torch
from PIL import Image

from openldm.config import LatentFormat


def latent_rgb(x: torch.Tensor, latent_format: LatentFormat) -> torch.Tensor:
    """(C, h, w) model-space latent -> (h, w, 3) uint8, by the family's fitted factors."""
    x = x.detach().float().cpu()
    if latent_format.rgb_factors is not None and len(latent_format.rgb_factors) == x.shape[0]:
        factors = torch.tensor(latent_format.rgb_factors)  # (C, 3)
        rgb = torch.einsum("chw,cr->hwr", x, factors) + torch.tensor(latent_format.rgb_bias)
    else:  # no fitted map: the first three channels, each stretched to [-1, 1]
        rgb = x[:3].permute(1, 2, 0)
        lo, hi = rgb.amin(dim=(0, 1)), rgb.amax(dim=(0, 1))
        rgb = (rgb - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def preview_jpeg(denoised: torch.Tensor, latent_format: LatentFormat, quality: int = 80) -> bytes:
    """The first image of a batch's current denoised latent, as JPEG bytes."""
    pixels = latent_rgb(denoised[0], latent_format).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()
