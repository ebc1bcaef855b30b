"""Latents to pixels and pixels to latents, never NaN: a NaN or inf is never written as an image.

A half-precision VAE can overflow (SDXL's original VAE does, in fp16, on many images): its decode
(or encode) is then retried in float32 and the VAE stays in float32 from then on, as A1111's
"automatically revert VAE to 32-bit floats" does. Non-finite latents, or a float32 VAE that still
gives NaN, are an error. `decode_latents` adds the `VAETiling` setting: whole through the engine,
tiled eagerly, or sliced; `encode_finite` takes it too.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from openldm.models.vae_tiling import VAETiling, decode_tile, encode_images

HALF = (torch.float16, torch.bfloat16)


class NonFiniteError(ValueError):
    """Latents or decoded pixels hold NaN or inf: writing them would save a black or broken image."""


def decode_finite(vae: nn.Module, z: torch.Tensor,
                  decode: Callable[[torch.Tensor], torch.Tensor] | None = None, *, tile: int | None = None,
                  overlap: int | None = None) -> torch.Tensor:
    """Decode unscaled latents `z` with `vae.decode` (in tiles if given) or `decode` (an engine's runner
    standing in for it); a half VAE that overflows is moved to float32 and decodes again, eagerly."""
    if not torch.isfinite(z).all():
        raise NonFiniteError(f"sampling produced non-finite latents ({_count(z)}): no image is written; "
                             "try float32 (--dtype fp32), another sampler or a lower CFG scale")
    z_vae = z.to(next(vae.parameters()).dtype)

    def first() -> torch.Tensor:
        return decode(z_vae) if decode is not None else _decode(vae, z_vae, tile, overlap)

    return _finite(vae, first, lambda: _decode(vae, z.float(), tile, overlap), "decoded non-finite pixels")


def encode_finite(vae: nn.Module, x: torch.Tensor, tiling: VAETiling) -> torch.Tensor:
    """Pixels in [-1, 1] -> unscaled latents (the posterior's mean) under `tiling`; a half VAE whose
    encoder overflows is moved to float32 and encodes again."""
    dtype = next(vae.parameters()).dtype
    return _finite(vae, lambda: encode_images(vae, x.to(dtype), tiling).mode(),
                   lambda: encode_images(vae, x.float(), tiling).mode(), "encoded non-finite latents")


def _finite(vae: nn.Module, first: Callable[[], torch.Tensor], again: Callable[[], torch.Tensor],
            what: str) -> torch.Tensor:
    """`first()` if finite; else, for a half VAE, `again()` once the VAE is float32 for good."""
    dtype = next(vae.parameters()).dtype
    with torch.no_grad():
        out = first()
        if torch.isfinite(out).all():
            return out
        if dtype not in HALF:
            raise NonFiniteError(f"the VAE {what} ({_count(out)}) in {dtype}: no image is written; the "
                                 "VAE's weights may be broken")
        warnings.warn(f"the VAE overflowed in {dtype} ({_count(out)}): it runs in float32 from now on",
                      stacklevel=4)
        vae.float()
        out = again()
    if not torch.isfinite(out).all():
        raise NonFiniteError(f"the VAE {what} ({_count(out)}) even in float32: no image is written; the "
                             "VAE's weights may be broken")
    return out


def decode_latents(vae: nn.Module, z: torch.Tensor, tiling: VAETiling,
                   decode: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                   available: int | None = None) -> torch.Tensor:
    """`decode_finite` under `tiling`: a whole decode goes through `decode` (the engine), a tiled one
    runs eagerly, a sliced batch one image at a time; `available` as in `vae_tiling.decode_tile`."""
    tile = decode_tile(vae, z, tiling, available)
    parts = z.split(1) if tiling.sliced else (z,)
    if tile is None:
        return torch.cat([decode_finite(vae, part, decode) for part in parts])
    return torch.cat([decode_finite(vae, part, tile=tile, overlap=tiling.overlap) for part in parts])


def _decode(vae: nn.Module, z: torch.Tensor, tile: int | None, overlap: int | None) -> torch.Tensor:
    return vae.decode(z, tile=tile, overlap=overlap) if tile else vae.decode(z)  # a TAESD takes no tiles


def _count(x: torch.Tensor) -> str:
    bad = ~torch.isfinite(x)
    return f"{int(bad.sum())} of {x.numel()} values NaN or inf"


def check_taesd(taesd: nn.Module, channels: int) -> None:
    """A TAESD decodes this model's latents only if it takes as many channels as they have."""
    if taesd.latent_channels != channels:
        raise ValueError(f"the TAESD decoder takes {taesd.latent_channels} latent channels; this model's "
                         f"latents have {channels}")

