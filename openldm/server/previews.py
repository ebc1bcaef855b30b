"""Step previews without the VAE: a per-family linear map from latent channels to RGB (`LatentFormat`).

A 64x64 latent becomes a 64x64 JPEG in well under a millisecond, so every step can carry one. The
map runs in numpy, not torch: a torch matmul between two OpenVINO steps wakes torch's thread pool,
whose spinning threads then slow the next step (the embedded model through the default engine:
20 previews cost 50 ms of a 0.28 s render in torch, nothing measurable in numpy).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from openldm.config import LatentFormat

if TYPE_CHECKING:
    import torch


def latent_rgb(x: torch.Tensor, latent_format: LatentFormat) -> np.ndarray:
    """(C, h, w) model-space latent -> (h, w, 3) uint8, by the family's fitted factors."""
    x = x.detach().float().cpu().numpy()
    if latent_format.rgb_factors is not None and len(latent_format.rgb_factors) == x.shape[0]:
        factors = np.asarray(latent_format.rgb_factors, dtype=np.float32)  # (C, 3)
        rgb = np.einsum("chw,cr->hwr", x, factors) + np.asarray(latent_format.rgb_bias, dtype=np.float32)
    else:  # no fitted map: the first three channels, each stretched to [-1, 1]
        rgb = x[:3].transpose(1, 2, 0)
        lo, hi = rgb.min(axis=(0, 1)), rgb.max(axis=(0, 1))
        rgb = (rgb - lo) / np.maximum(hi - lo, 1e-6) * 2 - 1
    return np.rint((np.clip(rgb, -1, 1) + 1) * 127.5).astype(np.uint8)


def preview_jpeg(denoised: torch.Tensor, latent_format: LatentFormat, quality: int = 80) -> bytes:
    """The first image of a batch's current denoised latent, as JPEG bytes."""
    out = io.BytesIO()
    Image.fromarray(latent_rgb(denoised[0], latent_format), "RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()
