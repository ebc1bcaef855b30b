"""LPIPS v0.1 with VGG16 (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric"): the perceptual term of ldm's VAE loss.

    d(x, y) = sum over VGG16's relu1_2 .. relu5_3 of mean_hw( w_k . (u(f_k(x)) - u(f_k(y)))^2 )

where u scales each pixel's feature vector to unit length and w_k >= 0 are LPIPS's learned channel
weights. Nothing is downloaded: the user gives torchvision's VGG16 weights (`features.N.weight`)
and the LPIPS v0.1 heads (`lin0.model.1.weight` .. `lin4`), as one file or two. The modules carry
those files' names, so loading is a lookup. Whole-model LPIPS files (`net.sliceK.N.*`, as taming's
and the `lpips` package's modules save) are renamed into that layout.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from openldm.checkpoints.io import CheckpointError, read_state_dict

VGG16_WIDTHS = (64, 128, 256, 512, 512)
CONVS_PER_STAGE = (2, 2, 3, 3, 3)  # VGG16 ("D"); every stage but the first starts with a 2x2 max-pool
TAPS = (3, 8, 15, 22, 29)  # `features` indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
SHIFT = (-0.030, -0.088, -0.188)  # LPIPS's ScalingLayer: [-1, 1] images to ImageNet-normalised ones
SCALE = (0.458, 0.448, 0.450)
IGNORED = ("classifier.", "scaling_layer.")  # torchvision's ImageNet head; LPIPS's stored SHIFT/SCALE
_SLICE = re.compile(r"^net\.slice\d\.(\d+)\.")


class Head(nn.Module):
    """LPIPS's `NetLinLayer`, a bias-free 1x1 conv to one channel. Its `model.0` is a dropout, idle at
    evaluation: an Identity here, so the weight keeps the published name `model.1.weight`."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def vgg16_features(widths: Sequence[int] = VGG16_WIDTHS) -> nn.Sequential:
    """torchvision's `vgg16().features` up to relu5_3 (indices 0-29); other widths make test-sized twins."""
    layers: list[nn.Module] = []
    channels = 3
    for stage, (width, convs) in enumerate(zip(widths, CONVS_PER_STAGE, strict=True)):
        if stage:
            layers.append(nn.MaxPool2d(2, 2))
        for _ in range(convs):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
            channels = width
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    def __init__(self, widths: Sequence[int] = VGG16_WIDTHS):
        super().__init__()
        self.features = vgg16_features(widths)
        for k, width in enumerate(widths):
            self.add_module(f"lin{k}", Head(width))

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in TAPS:
                taps.append(x)
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(b, 3, h, w) images in [-1, 1] -> (b,) distances; both go through VGG as one batch."""
        shift = torch.tensor(SHIFT, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        scale = torch.tensor(SCALE, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        taps = self._taps((torch.cat([x, y]) - shift) / scale)
        distance = x.new_zeros(x.shape[0])
        for k, features in enumerate(taps):
            fx, fy = _unit(features).chunk(2)
            distance = distance + getattr(self, f"lin{k}")((fx - fy).pow(2)).mean((1, 2, 3))
        return distance


def _unit(features: torch.Tensor) -> torch.Tensor:
    """Each pixel's channel vector scaled to length 1 (LPIPS's `normalize_tensor`, same epsilon)."""
    return features / (features.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)


def _canonical(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole-model LPIPS names (`net.slice2.5.weight`, torchvision's index kept) -> `features.5.weight`."""
    return {_SLICE.sub(r"features.\1.", key): value for key, value in tensors.items()}


def load_lpips(paths: str | Path | Sequence[str | Path]) -> LPIPS:
    """LPIPS from the user's weight file(s), frozen and in eval mode; widths follow the heads' shapes."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        tensors |= _canonical(read_state_dict(path)[0])
    where = ", ".join(map(str, paths))
    heads = [tensors.get(f"lin{k}.model.1.weight") for k in range(len(VGG16_WIDTHS))]
    if any(head is None for head in heads):
        raise CheckpointError(f"{where}: no LPIPS heads (lin0.model.1.weight .. lin4.model.1.weight); "
                              "give the LPIPS v0.1 vgg weights beside the VGG16 ones")
    with torch.device("meta"):
        model = LPIPS([head.shape[1] for head in heads])
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(k for k in set(tensors) - set(expected) if not k.startswith(IGNORED))
    if missing or unexpected:
        raise CheckpointError(f"{where}: not VGG16 + LPIPS v0.1 weights (missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]})")
    try:
        model.load_state_dict({k: tensors[k].float() for k in expected}, strict=True, assign=True)
    except RuntimeError as error:
        raise CheckpointError(f"{where}: LPIPS weights of the wrong shape ({error})") from None
    return model.requires_grad_(False).eval()
