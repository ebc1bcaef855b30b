"""VAE tiling and slicing as a setting: decode and encode whole, tiled, or tiled only when needed.

`AutoencoderKL.encode/decode` do the tiling (see `models.vae.tiled`); this module decides when.
`auto` tiles when `openldm.memory`'s estimate of the whole decode (or encode) exceeds the memory
available now, so a run that fits is computed exactly and one that does not still finishes.
Importing this module does not import torch: `GenerationParams` checks its settings with `VAETiling`
in a CLI that starts in a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

    from openldm.models.vae import AutoencoderKL, DiagonalGaussian

TilingMode = Literal["auto", "on", "off"]
TILING_MODES: tuple[str, ...] = ("auto", "on", "off")
# The tile (latent pixels; 512 image pixels for SD) that `--vae-tiling on` uses unless told.
DEFAULT_VAE_TILE = 64


@dataclass(frozen=True)
class VAETiling:
    """How the VAE runs: `tile_size` and `overlap` in latent pixels (x8 in image pixels for SD);
    `sliced` runs a batch one image at a time (identical results, a batch's worth less memory)."""

    mode: TilingMode = "auto"
    tile_size: int = DEFAULT_VAE_TILE
    overlap: int = DEFAULT_VAE_TILE // 4
    sliced: bool = False

    def __post_init__(self) -> None:
        if self.mode not in TILING_MODES:
            raise ValueError(f"VAE tiling must be one of {', '.join(TILING_MODES)}, got {self.mode!r}")
        if self.tile_size < 8:
            raise ValueError(f"VAE tile size must be at least 8 latent pixels, got {self.tile_size}")
        if not 0 <= self.overlap < self.tile_size // 2:
            raise ValueError(f"VAE tile overlap must be in [0, {self.tile_size // 2}) for tile size "
                             f"{self.tile_size}, got {self.overlap}")


AUTO_TILING = VAETiling()  # the default: whole, unless a whole decode or encode would not fit


def decode_tile(vae: AutoencoderKL, z: torch.Tensor, tiling: VAETiling,
                available: int | None = None) -> int | None:
    """The tile size a decode of `z` uses under `tiling` (None: whole)."""
    if tiling.mode == "off":
        return None
    if tiling.mode == "on":
        return tiling.tile_size
    from openldm.memory import vae_decode_bytes

    batch = 1 if tiling.sliced else z.shape[0]
    need = vae_decode_bytes(vae.cfg, batch, *z.shape[-2:], z.element_size(), images=z.shape[0])
    return tiling.tile_size if need > _available(z, available) else None


def encode_tile(vae: AutoencoderKL, x: torch.Tensor, tiling: VAETiling,
                available: int | None = None) -> int | None:
    """The tile size (in latent pixels) an encode of image `x` uses under `tiling` (None: whole)."""
    if tiling.mode == "off":
        return None
    f = vae.cfg.downsample_factor
    if tiling.mode == "auto":
        from openldm.memory import vae_encode_bytes

        batch = 1 if tiling.sliced else x.shape[0]
        need = vae_encode_bytes(vae.cfg, batch, x.shape[-2] // f, x.shape[-1] // f, x.element_size())
        if need <= _available(x, available):
            return None
    if x.shape[-2] % f or x.shape[-1] % f:
        raise ValueError(f"tiled VAE encoding needs an image size that is a multiple of {f}, got "
                         f"{x.shape[-1]}x{x.shape[-2]}")
    return tiling.tile_size


def decode_latents(
    vae: AutoencoderKL, z: torch.Tensor, tiling: VAETiling = VAETiling(), available: int | None = None
) -> torch.Tensor:
    """Unscaled latents -> images under `tiling`; `available`: bytes free (default: measured now)."""
    import torch

    tile = decode_tile(vae, z, tiling, available)
    with torch.no_grad():
        return vae.decode(z, tile=tile, overlap=tiling.overlap, sliced=tiling.sliced)


def encode_images(
    vae: AutoencoderKL, x: torch.Tensor, tiling: VAETiling = VAETiling(), available: int | None = None
) -> DiagonalGaussian:
    """Images in [-1, 1] -> the posterior under `tiling`; `available` as in `decode_latents`."""
    import torch

    tile = encode_tile(vae, x, tiling, available)
    with torch.no_grad():
        return vae.encode(x, tile=tile, overlap=tiling.overlap, sliced=tiling.sliced)


def _available(t: torch.Tensor, available: int | None) -> int:
    from openldm.memory import memory_available

    return memory_available(t.device) if available is None else available
