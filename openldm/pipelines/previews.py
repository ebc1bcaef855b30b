"""Which decoder draws the progress previews: TAESD when its weights are given, else a linear map.

The per-family linear latent -> RGB approximation is owned elsewhere (the server's previews); this
module only chooses, so the server calls `preview_decoder(taesd, linear)` once and then the result
on every step's `denoised` latents.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from openldm.models.taesd import TAESD
from openldm.pipelines import images as im

Preview = Callable[[torch.Tensor], list[Image.Image]]  # model-space latents (batch first) -> pictures


def preview_decoder(taesd: TAESD | None, linear: Preview) -> Preview:
    """TAESD's decode of the model-space latents if a TAESD is loaded, else `linear`."""
    if taesd is None:
        return linear
    if taesd.decoder is None:
        raise ValueError("the TAESD weights hold no decoder: previews need taesd_decoder.safetensors")

    def draw(x: torch.Tensor) -> list[Image.Image]:
        with torch.no_grad():
            return im.to_pil(taesd.decode(x.float()))

    return draw
