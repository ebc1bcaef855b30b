"""Blocks the UNet, the VAE (and ControlNet's copy of the UNet) share, in the originals' parameter names."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class GroupNorm32(nn.GroupNorm):
    """32-group GroupNorm computed in float32 and cast back, as the originals' `GroupNorm32` does.

    Its statistics span a whole group of a feature map (tens of thousands of values at SD sizes);
    in half precision the sum of squares can overflow or lose the mean, on kernels that do not
    accumulate in float32 themselves. The upcast costs one copy of an activation and keeps fp16 and
    bf16 runs on the numerics the weights were trained with. LayerNorm runs in the input dtype, as
    in the originals: it spans only one token's channels.
    """

    def __init__(self, channels: int, eps: float = 1e-5, groups: int = 32):
        super().__init__(groups, channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a block's last layer so that at initialisation the block adds nothing to its residual."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def checkpointed(enabled: bool, fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """Run `fn`, recomputing it in the backward pass instead of keeping its activations, if enabled."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution (the UNet's; the VAE pads asymmetrically)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
