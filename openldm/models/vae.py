"""The KL autoencoder of every SD family (ldm `AutoencoderKL`), in the original parameter names.

The state dict is the single-file checkpoint's `first_stage_model.*` with that prefix removed. Layout:

- `encoder.down.N`: `num_res_blocks` ResnetBlocks (`block.M`), then at every level but the last a
  stride-2 downsampler (`downsample.conv`).
- `encoder.mid`, `decoder.mid`: ResnetBlock `block_1`, single-head self-attention `attn_1`,
  ResnetBlock `block_2`.
- `decoder.up.N`: `num_res_blocks + 1` ResnetBlocks, then at every level but 0 a nearest-neighbour x2
  upsampler (`upsample.conv`). `up` is indexed like `down`, highest resolution first (`up.0` makes
  the full-size image), but runs from its last entry: ldm built the list by inserting each new
  level at the front.
- `quant_conv`: 1x1 conv on the encoder's moments; `post_quant_conv`: 1x1 conv on the latent.

Every norm is a 32-group GroupNorm with eps 1e-6 (the UNet's use 1e-5). The encoder outputs
2 * z_channels: a mean and a log-variance per latent channel. The latent scale factor is not part of
the VAE: see `LatentFormat` in `openldm.config`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from openldm.config import VAEConfig
from openldm.nn.attention import Backend, attention
from openldm.nn.blocks import GroupNorm32, Upsample, checkpointed


def _norm(channels: int, groups: int) -> GroupNorm32:
    return GroupNorm32(channels, eps=1e-6, groups=groups)


class DiagonalGaussian:
    """The encoder's posterior q(z|x): independent normals, from stacked (mean, logvar) moments."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        # ldm's clamp: keeps exp(logvar) finite and nonzero whatever the encoder outputs.
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise; the noise is drawn on the generator's device, so a CPU generator
        gives the same latent whatever device the VAE runs on."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over the latent: the VAE's regularisation loss."""
        dims = tuple(range(1, self.mean.ndim))
        return 0.5 * (self.mean**2 + self.logvar.exp() - 1.0 - self.logvar).sum(dim=dims)


class ResnetBlock(nn.Module):
    """Norm, SiLU, 3x3 conv, twice, plus a skip path: a 1x1 conv (`nin_shortcut`) if the width changes."""

    def __init__(self, channels: int, out_channels: int, groups: int = 32):
        super().__init__()
        self.gradient_checkpointing = False
        self.norm1 = _norm(channels, groups)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        same = channels == out_channels
        self.nin_shortcut = nn.Identity() if same else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpointed(self.gradient_checkpointing, self._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention among all pixels; q, k, v and `proj_out` are 1x1 convs."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.gradient_checkpointing = False
        self.backend: Backend = "sdpa"
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpointed(self.gradient_checkpointing, self._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # (b, hw, c)
        y = attention(q, k, v, 1, backend=self.backend)
        return x + self.proj_out(y.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Halve the resolution: pad right and bottom by one, then a stride-2 3x3 conv with no padding.

    Unlike the UNet's symmetric `padding=1`, ldm's VAE pads only on the far sides, so its kernel
    windows are offset by one pixel from the UNet's; the trained weights expect this alignment.
    An odd size n gives floor(n / 2), as in ldm and diffusers: the pad then lies outside every window.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """One resolution: ResnetBlocks (`block.M`), then the encoder's downsampler or the decoder's upsampler."""

    def __init__(self, channels: int, out_channels: int, depth: int, *, down: bool = False, up: bool = False,
                 groups: int = 32):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(channels if i == 0 else out_channels, out_channels, groups) for i in range(depth)
        )
        self.downsample = Downsample(out_channels) if down else None
        self.upsample = Upsample(out_channels) if up else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Mid(nn.Module):
    """The lowest-resolution stage: ResnetBlock, self-attention, ResnetBlock."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image -> 2 * z_channels moments (mean, log-variance) at 1 / downsample_factor resolution."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        ch, levels = cfg.ch, []
        for i, width in enumerate(widths):
            down = i < len(widths) - 1
            levels.append(Level(ch, width, cfg.num_res_blocks, down=down, groups=cfg.norm_groups))
            ch = width
        self.down = nn.ModuleList(levels)
        self.mid = Mid(ch, cfg.norm_groups)
        self.norm_out = _norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z_channels latent -> image, the encoder's path in reverse with one more ResnetBlock per level."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = Mid(ch, cfg.norm_groups)
        levels = []
        for i in reversed(range(len(widths))):  # built in running order, lowest resolution first ...
            levels.append(Level(ch, widths[i], cfg.num_res_blocks + 1, up=i > 0, groups=cfg.norm_groups))
            ch = widths[i]
        self.up = nn.ModuleList(reversed(levels))  # ... but numbered from the highest (see module doc)
        self.norm_out = _norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """Images in [-1, 1] <-> unscaled latents at 1 / downsample_factor resolution.

    `encode` and `decode` take two memory savers. `tile` (in latent pixels) runs the network on
    overlapping tiles and blends them with linear ramps over the `overlap` (default tile // 4):
    peak memory then follows the tile, not the image. Every tile normalises and attends only within
    itself, so the result is close to, not equal to, the untiled one. `sliced` runs one sample at
    a time.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(
        self, x: torch.Tensor, *, tile: int | None = None, overlap: int | None = None, sliced: bool = False
    ) -> DiagonalGaussian:
        """x: (b, in_channels, h, w) image in [-1, 1] -> the posterior over (b, embed_dim, h/f, w/f)."""
        f = self.cfg.downsample_factor
        if tile is not None and (x.shape[-2] % f or x.shape[-1] % f):
            raise ValueError(f"tiled encoding needs an image size that is a multiple of {f}, got "
                             f"{tuple(x.shape[-2:])}")
        return DiagonalGaussian(self._run(self._moments, x, tile, overlap, sliced, unit_in=f, unit_out=1))

    def decode(
        self, z: torch.Tensor, *, tile: int | None = None, overlap: int | None = None, sliced: bool = False
    ) -> torch.Tensor:
        """z: (b, embed_dim, h, w) unscaled latent -> image, nominally in [-1, 1] (not clamped)."""
        f = self.cfg.downsample_factor
        return self._run(self._decode, z, tile, overlap, sliced, unit_in=1, unit_out=f)

    def forward(
        self, x: torch.Tensor, *, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct x through a sampled (or, with `sample=False`, the mean) latent; for training."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute ResnetBlocks and attention in the backward pass: far less activation memory for
        about a third more compute. Takes effect only where gradients are being recorded."""
        for module in self.modules():
            if isinstance(module, (ResnetBlock, AttnBlock)):
                module.gradient_checkpointing = enabled

    def set_attention_backend(self, backend: Backend) -> None:
        """Choose the backend of `openldm.nn.attention.attention` for both mid-block attentions."""
        for module in self.modules():
            if isinstance(module, AttnBlock):
                module.backend = backend

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def _run(
        self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int | None,
        overlap: int | None, sliced: bool, *, unit_in: int, unit_out: int,
    ) -> torch.Tensor:
        """Apply `fn` whole, tiled, and/or one sample at a time."""
        def run(x: torch.Tensor) -> torch.Tensor:
            if tile is None:
                return fn(x)
            lap = tile // 4 if overlap is None else overlap
            return tiled(fn, x, tile=tile, overlap=lap, unit_in=unit_in, unit_out=unit_out)

        if sliced:
            return torch.cat([run(sample) for sample in x.split(1)])
        return run(x)


def tiled(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, tile: int, overlap: int,
    unit_in: int = 1, unit_out: int = 1,
) -> torch.Tensor:
    """Apply a resolution-changing `fn` on overlapping tiles, blending overlaps with linear ramps.

    Tiles are laid on a grid whose cell is `unit_in` input pixels and `unit_out` output pixels (for
    the decoder 1 and 8; for the encoder 8 and 1); `tile` and `overlap` count cells.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
    rows, cols = x.shape[-2] // unit_in, x.shape[-1] // unit_in
    if rows <= tile and cols <= tile:
        return fn(x)
    out = weight = None
    for top in _starts(rows, tile, overlap):
        for left in _starts(cols, tile, overlap):
            h, w = min(tile, rows), min(tile, cols)
            piece = fn(x[..., top * unit_in:(top + h) * unit_in, left * unit_in:(left + w) * unit_in])
            if out is None:
                out = piece.new_zeros(*piece.shape[:2], rows * unit_out, cols * unit_out, dtype=torch.float32)
                weight = torch.zeros(rows * unit_out, cols * unit_out, device=piece.device)
            ramp = _ramp(h * unit_out, overlap * unit_out, piece.device)[:, None]
            ramp = ramp * _ramp(w * unit_out, overlap * unit_out, piece.device)
            window = (slice(top * unit_out, (top + h) * unit_out),
                      slice(left * unit_out, (left + w) * unit_out))
            out[(..., *window)] += piece.float() * ramp
            weight[window] += ramp
    return (out / weight).to(piece.dtype)


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis: a stride of tile - overlap, the last tile flush with the far edge."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return [*starts, size - tile]


def _ramp(length: int, overlap: int, device: torch.device) -> torch.Tensor:
    """Blend weights across a tile: rising linearly over `overlap` at each end, 1 in between, never 0."""
    i = torch.arange(length, device=device, dtype=torch.float32)
    return torch.minimum(i + 1, length - i).div(overlap + 1).clamp(max=1.0)
