"""The PatchGAN discriminator and hinge losses of VAE training, as taming-transformers and ldm use them.

`NLayerDiscriminator` is pix2pix's PatchGAN (Isola et al. 2017) in taming's form: 4x4 convs, the
first `layers` with stride 2, BatchNorm and LeakyReLU(0.2), ending in one real/fake logit per
overlapping patch. The generator's GAN term is weighted adaptively (Esser et al. 2021, "Taming
Transformers", eq. 7) by the ratio of the reconstruction loss's gradient norm to the GAN loss's at
the decoder's last layer, so neither term swamps the other whatever their scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NLayerDiscriminator(nn.Module):
    """PatchGAN: (b, 3, h, w) images -> (b, 1, h / 2^layers - 2, w / 2^layers - 2) logits."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        if layers < 1:
            raise ValueError(f"a PatchGAN needs at least one layer, got {layers}")
        widths = [channels * min(2**n, 8) for n in range(layers + 1)]
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for n in range(1, layers + 1):
            stride = 2 if n < layers else 1  # the last widening conv keeps the resolution
            conv = nn.Conv2d(widths[n - 1], widths[n], 4, stride, 1, bias=False)  # BatchNorm shifts
            blocks += [conv, nn.BatchNorm2d(widths[n]), nn.LeakyReLU(0.2, True)]
        blocks.append(nn.Conv2d(widths[layers], 1, 4, 1, 1))
        self.main = nn.Sequential(*blocks)
        self.layers = layers
        self.apply(_init_weights)

    def min_size(self) -> int:
        """The smallest image side that leaves at least one patch."""
        return 3 * 2**self.layers  # `layers` halvings, then two 4x4 stride-1 convs that each take 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(module: nn.Module) -> None:
    """pix2pix/taming init: conv weights N(0, 0.02), BatchNorm scales N(1, 0.02) and zero shifts."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss (Lim & Ye 2017): push real logits above 1 and fake below -1."""
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def generator_loss(fake: torch.Tensor) -> torch.Tensor:
    """The generator's side of the hinge GAN: raise the discriminator's logits on reconstructions."""
    return -fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """scale * |grad rec| / (|grad gan| + 1e-4) at `last_layer`, clamped to [0, 1e4] and detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach() * scale
