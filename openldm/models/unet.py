"""The conditional UNet of SD1, SD2 and SDXL (ldm/sgm `UNetModel`), in the original parameter names.

The state dict is the single-file checkpoint's `model.diffusion_model.*` with that prefix removed,
so loading an original file is a prefix strip and a strict load. Its layout:

- `time_embed`, and for SDXL `label_emb`: the timestep (and vector-conditioning) embedding; the x4
  upscaler's `label_emb` is an `nn.Embedding` of its noise level (ldm's `num_classes`: `label_emb.weight`).
- `input_blocks.N`: block 0 is the input convolution; then, level by level, `res_blocks(level)` blocks
  of a ResBlock (`.0`) and, where the level has attention, a SpatialTransformer (`.1`), and between
  levels a block holding only a stride-2 downsampler (`.0.op`). Every block's output is kept.
- `middle_block`: ResBlock, SpatialTransformer, ResBlock (absent where a distilled model removed it).
- `output_blocks.N`: levels in reverse, `res_blocks(level) + 1` blocks each, every one taking the
  latest kept input-block output concatenated on channels; the last block of each level but the
  first ends in a nearest-neighbour x2 upsampler (`.1.conv` or `.2.conv`).
- `out`: GroupNorm, SiLU, convolution back to latent channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from openldm.config import UNetConfig
from openldm.nn.attention import Backend
from openldm.nn.blocks import Downsample, GroupNorm32, Upsample, checkpointed, zero_init
from openldm.nn.embeddings import timestep_embedding
from openldm.nn.lookup import Embedding
from openldm.nn.transformer import BasicTransformerBlock, CrossAttention, SpatialTransformer


class ResBlock(nn.Module):
    """Two 3x3 convolutions with the timestep embedding added between them, plus a skip path.

    The sub-module indices are the originals' `nn.Sequential` positions, weightless layers included:
    `in_layers` = (norm, SiLU, conv), `emb_layers` = (SiLU, linear), `out_layers` = (norm, SiLU,
    dropout, conv); hence `in_layers.2`, `emb_layers.1` and `out_layers.3`. The dropout (rate 0 in
    every SD model) is an Identity here. `skip_connection` is a 1x1 conv when the width changes and
    weightless otherwise.
    """

    def __init__(self, channels: int, emb_dim: int, out_channels: int, groups: int = 32):
        super().__init__()
        self.gradient_checkpointing = False
        self.in_layers = nn.Sequential(
            GroupNorm32(channels, groups=groups), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels, groups=groups), nn.SiLU(), nn.Identity(),
            zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        same = channels == out_channels
        self.skip_connection = nn.Identity() if same else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpointed(self.gradient_checkpointing, self._forward, x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Block(nn.Sequential):
    """One numbered UNet block (ldm's `TimestepEmbedSequential`): gives each layer what it needs."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """Predicts the noise (or v) in a latent from its timestep, the text tokens and, for SDXL, `y`."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, emb_dim = cfg.model_channels, 4 * cfg.model_channels
        self.time_embed = _mlp(ch, emb_dim)
        self.label_emb: nn.Module | None = None
        if cfg.adm_in_channels is not None:
            # ldm's "sequential" class embedding wraps the MLP in one more Sequential: `label_emb.0.0`.
            self.label_emb = nn.Sequential(_mlp(cfg.adm_in_channels, emb_dim))
        elif cfg.num_classes is not None:
            self.label_emb = Embedding(cfg.num_classes, emb_dim)
        self.input_blocks, skips = _input_blocks(cfg, emb_dim)
        top = skips[-1]
        self.middle_block = None if cfg.transformer_depth_middle is None else Block(
            ResBlock(top, emb_dim, top, cfg.norm_groups),
            _transformer(cfg, top, cfg.transformer_depth_middle, self_attn=True),
            ResBlock(top, emb_dim, top, cfg.norm_groups),
        )
        self.output_blocks = _output_blocks(cfg, emb_dim, skips)
        self.out = nn.Sequential(
            GroupNorm32(ch, groups=cfg.norm_groups), nn.SiLU(),
            zero_init(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)),
        )

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None,
        control: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: (b, in_channels, h, w) latent; timesteps: (b,) floats in [0, 1000); context: (b, tokens,
        context_dim); y: (b, adm_in_channels) for SDXL, (b,) noise levels for the x4 upscaler.
        Conditioning is cast to x's dtype.

        `control` (ControlNet's residuals, `models.controlnet`): one per input block, added to its kept
        output before the decoder takes it, then one added to the middle block's output, as cldm's
        `ControlledUnetModel` does."""
        self._check_inputs(x, y)
        t_emb = timestep_embedding(timesteps.expand(x.shape[0]), self.cfg.model_channels)
        emb = self.time_embed(t_emb.to(x.dtype))
        if self.label_emb is not None:
            labels = y.round().long() if self.cfg.num_classes is not None else y.to(x.dtype)
            emb = emb + self.label_emb(labels).to(x.dtype)
        context = context.to(x.dtype)
        kept = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            kept.append(h)
        if self.middle_block is not None:
            h = self.middle_block(h, emb, context)
        if control is not None:
            if len(control) != len(kept) + 1:
                raise ValueError(f"{len(control)} control residuals for a UNet that takes {len(kept) + 1}")
            h = h + control[-1]
            kept = [k + c.to(k.dtype) for k, c in zip(kept, control)]
        for block in self.output_blocks:
            h = block(torch.cat([h, kept.pop()], dim=1), emb, context)
        return self.out(h)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute ResBlocks and transformer blocks in the backward pass: far less activation memory
        for about a third more compute. Takes effect only where gradients are being recorded."""
        for module in self.modules():
            if isinstance(module, (ResBlock, BasicTransformerBlock)):
                module.gradient_checkpointing = enabled

    def set_attention_backend(self, backend: Backend) -> None:
        """Choose the backend of `openldm.nn.attention.attention` for every attention layer."""
        for module in self.modules():
            if isinstance(module, CrossAttention):
                module.backend = backend

    def _check_inputs(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        factor = 2 ** (len(self.cfg.channel_mult) - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not a multiple of {factor}, "
                             f"which this UNet's {factor}x downsampling needs")
        if (y is None) != (self.label_emb is None):
            need = "needs" if y is None else "takes no"
            raise ValueError(f"this UNet {need} the vector conditioning `y` (adm_in_channels="
                             f"{self.cfg.adm_in_channels})")


def _mlp(dim_in: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, dim), nn.SiLU(), nn.Linear(dim, dim))


def _transformer(cfg: UNetConfig, channels: int, depth: int, self_attn: bool) -> SpatialTransformer:
    heads = cfg.heads_at(channels)
    if channels % heads:
        raise ValueError(f"{channels} channels do not split into {heads} attention heads")
    return SpatialTransformer(channels, heads, depth, cfg.context_dim, cfg.use_linear_in_transformer,
                              cfg.norm_groups, self_attn)


def _input_blocks(cfg: UNetConfig, emb_dim: int) -> tuple[nn.ModuleList, list[int]]:
    """The encoder half, and the width of every block's output (each is kept for the decoder)."""
    ch = cfg.model_channels
    blocks, widths = [Block(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))], [ch]
    for level, (mult, depths) in enumerate(zip(cfg.channel_mult, cfg.input_depths())):
        for depth in depths:
            layers: list[nn.Module] = [ResBlock(ch, emb_dim, cfg.model_channels * mult, cfg.norm_groups)]
            ch = cfg.model_channels * mult
            if depth:
                layers.append(_transformer(cfg, ch, depth, cfg.self_attends(level)))
            blocks.append(Block(*layers))
            widths.append(ch)
        if level < len(cfg.channel_mult) - 1:
            blocks.append(Block(Downsample(ch)))
            widths.append(ch)
    return nn.ModuleList(blocks), widths


def _output_blocks(cfg: UNetConfig, emb_dim: int, widths: list[int]) -> nn.ModuleList:
    """The decoder half; `widths` are the kept encoder outputs, consumed last first."""
    widths = list(widths)
    ch, blocks = widths[-1], []
    levels = reversed(range(len(cfg.channel_mult)))
    for level, depths in zip(levels, cfg.output_depths()):
        out = cfg.model_channels * cfg.channel_mult[level]
        for i, depth in enumerate(depths):
            layers: list[nn.Module] = [ResBlock(ch + widths.pop(), emb_dim, out, cfg.norm_groups)]
            ch = out
            if depth:
                layers.append(_transformer(cfg, ch, depth, cfg.self_attends(level)))
            if level and i == len(depths) - 1:
                layers.append(Upsample(ch))
            blocks.append(Block(*layers))
    return nn.ModuleList(blocks)
