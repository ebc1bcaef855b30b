"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"), in the original `cldm.py` parameter names with the `control_model.` prefix removed.

It is the base UNet's encoder half built by the UNet's own code (`time_embed`, `label_emb` for SDXL,
`input_blocks`, `middle_block`), plus what steers it:

- `input_hint_block`: the control image (pixel resolution) down to latent resolution in stride-2
  stages (three in the originals, one per halving of the VAE); its indices are the original
  `nn.Sequential`'s, SiLUs included (convs at 0, 2, ..., 14), and its last conv starts at zero.
- `zero_convs.N.0`: a zero-initialised 1x1 conv on every input block's output (`.0`: each sits in
  a one-layer `TimestepEmbedSequential` in the original).
- `middle_block_out.0`: the same on the middle block's output.

The hint's features are added once, after the first input block (the input convolution). The
outputs are residuals that `UNetModel.forward(control=...)` adds to its skip connections and to its
middle block's output.
"""

from __future__ import annotations

import torch
from torch import nn

from openldm.config import ControlNetConfig
from openldm.models.unet import Block, ResBlock, _input_blocks, _mlp, _transformer
from openldm.nn.blocks import zero_init
from openldm.nn.embeddings import timestep_embedding


def _hint_block(cfg: ControlNetConfig) -> nn.Sequential:
    """conv-SiLU pairs per width, the first conv of each later width with stride 2, then a zero conv."""
    layers: list[nn.Module] = []
    width = cfg.hint_channels
    for i, out in enumerate(cfg.hint_widths):
        if i:
            layers += [nn.Conv2d(width, out, 3, padding=1, stride=2), nn.SiLU()]
        else:
            layers += [nn.Conv2d(width, out, 3, padding=1), nn.SiLU()]
        if i < len(cfg.hint_widths) - 1:
            layers += [nn.Conv2d(out, out, 3, padding=1), nn.SiLU()]
        width = out
    layers.append(zero_init(nn.Conv2d(width, cfg.unet.model_channels, 3, padding=1)))
    return nn.Sequential(*layers)


def _zero_conv(channels: int) -> nn.Sequential:
    return nn.Sequential(zero_init(nn.Conv2d(channels, channels, 1)))


class ControlNet(nn.Module):
    """The residuals that steer a UNet toward a control image, one per skip connection plus the middle."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.cfg = cfg
        unet = cfg.unet
        ch, emb_dim = unet.model_channels, 4 * unet.model_channels
        self.time_embed = _mlp(ch, emb_dim)
        self.label_emb = None
        if unet.adm_in_channels is not None:  # as the UNet's: `label_emb.0.0`
            self.label_emb = nn.Sequential(_mlp(unet.adm_in_channels, emb_dim))
        self.input_hint_block = _hint_block(cfg)
        self.input_blocks, widths = _input_blocks(unet, emb_dim)
        self.zero_convs = nn.ModuleList(_zero_conv(w) for w in widths)
        top = widths[-1]
        self.middle_block = Block(
            ResBlock(top, emb_dim, top, unet.norm_groups),
            _transformer(unet, top, unet.transformer_depth_middle, self_attn=True),
            ResBlock(top, emb_dim, top, unet.norm_groups),
        )
        self.middle_block_out = _zero_conv(top)

    def forward(
        self,
        x: torch.Tensor,
        hint: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """x: (b, 4, h, w) latent; hint: (b, hint_channels, f h, f w) in [0, 1] with f = cfg.hint_factor;
        the rest as the UNet's.

        Returns `cfg.outputs` residuals: the input blocks' in order, then the middle block's.
        """
        if (y is None) != (self.label_emb is None):
            raise ValueError(
                f"this ControlNet {'needs' if y is None else 'takes no'} the vector conditioning y"
            )
        t_emb = timestep_embedding(timesteps.expand(x.shape[0]), self.cfg.unet.model_channels)
        emb = self.time_embed(t_emb.to(x.dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y.to(x.dtype))
        context = context.to(x.dtype)
        guided = self.input_hint_block(hint.to(x.dtype))
        outs = []
        h = x
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided
            outs.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h))
        return outs
