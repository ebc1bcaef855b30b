"""TAESD / TAESDXL (Ollin Boer Bohan's tiny autoencoders): fast approximate decoding and previews.

Parameter names are the original `taesd_encoder.*` / `taesd_decoder.*` files' (a bare
`nn.Sequential`: the decoder's entry 0 is the parameter-free clamp, so its first conv is `1`).
diffusers' `AutoencoderTiny` keeps the same layers under `encoder.layers.` / `decoder.layers.`,
with the decoder's clamp outside the Sequential: its indices are ours minus one (`from_state_dict`
converts). TAESD works on model-space (scaled) latents and makes images in [0, 1]; `decode` returns
[-1, 1] like `AutoencoderKL.decode`. TAESD and TAESDXL differ only in their weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from openldm.checkpoints.io import CheckpointError, read_state_dict

WIDTH = 64


def _conv(n_in: int, n_out: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class Block(nn.Module):
    """Three 3x3 convs with ReLUs between, plus the input, then ReLU (`conv.0/2/4`, `skip`, `fuse`)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(),
                                  _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3): 3 tanh(x / 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def encoder(latent_channels: int = 4) -> nn.Sequential:
    """[0, 1] image -> latent at 1/8 size: a conv, then three stride-2 convs each followed by 3 blocks."""
    layers: list[nn.Module] = [_conv(3, WIDTH), Block(WIDTH, WIDTH)]
    for _ in range(3):
        layers += [_conv(WIDTH, WIDTH, stride=2, bias=False), *(Block(WIDTH, WIDTH) for _ in range(3))]
    return nn.Sequential(*layers, _conv(WIDTH, latent_channels))


def decoder(latent_channels: int = 4) -> nn.Sequential:
    """Latent -> [0, 1] image at 8x: clamp, conv, then three (3 blocks, 2x nearest upsample, conv)."""
    layers: list[nn.Module] = [Clamp(), _conv(latent_channels, WIDTH), nn.ReLU()]
    for _ in range(3):
        layers += [*(Block(WIDTH, WIDTH) for _ in range(3)), nn.Upsample(scale_factor=2),
                   _conv(WIDTH, WIDTH, bias=False)]
    return nn.Sequential(*layers, Block(WIDTH, WIDTH), _conv(WIDTH, 3))


class TAESD(nn.Module):
    """A tiny autoencoder; either half may be absent (the decoder file alone serves decoding and previews)."""

    def __init__(self, latent_channels: int = 4, *, with_encoder: bool = True, with_decoder: bool = True):
        super().__init__()
        self.latent_channels = latent_channels
        self.encoder = encoder(latent_channels) if with_encoder else None
        self.decoder = decoder(latent_channels) if with_decoder else None

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space latents (batch, c, h, w) -> images in [-1, 1] at 8x the size."""
        if self.decoder is None:
            raise ValueError("these TAESD weights hold no decoder (load taesd_decoder.safetensors)")
        return self.decoder(x.to(self.decoder[1].weight.dtype)) * 2 - 1

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> model-space latents at 1/8 the size."""
        if self.encoder is None:
            raise ValueError("these TAESD weights hold no encoder (load taesd_encoder.safetensors)")
        return self.encoder((image.to(self.encoder[0].weight.dtype) + 1) / 2)


_DIFFUSERS = {"encoder.layers.": ("encoder.", 0), "decoder.layers.": ("decoder.", 1)}  # prefix, index shift


def canonical_keys(state: dict[str, torch.Tensor], half: str | None = None) -> dict[str, torch.Tensor]:
    """Any layout -> `encoder.N...` / `decoder.N...`; a bare original file is the `half` it says it is."""
    out = {}
    for key, value in state.items():
        for prefix, (ours, shift) in _DIFFUSERS.items():
            if key.startswith(prefix):
                index, rest = key[len(prefix):].split(".", 1)
                out[f"{ours}{int(index) + shift}.{rest}"] = value
                break
        else:
            if key.startswith(("encoder.", "decoder.")):
                out[key] = value
            elif key.split(".", 1)[0].isdigit():
                out[f"{half or _which_half(state)}.{key}"] = value
            else:
                raise CheckpointError(f"not a TAESD weight: {key!r}")
    return out


def _which_half(state: dict[str, torch.Tensor]) -> str:
    """An original single-half file: the decoder's first conv is `1` (after the clamp), the encoder's `0`."""
    if "1.weight" in state and "0.weight" not in state:
        return "decoder"
    if "0.weight" in state and state["0.weight"].shape[1] == 3:
        return "encoder"
    raise CheckpointError("cannot tell whether these TAESD weights are an encoder or a decoder")


def from_state_dict(state: dict[str, torch.Tensor]) -> TAESD:
    """A TAESD holding whichever halves `state` has (original or diffusers layout), strictly loaded."""
    state = canonical_keys(state)
    has = {half: any(k.startswith(half + ".") for k in state) for half in ("encoder", "decoder")}
    if "decoder.1.weight" in state:
        channels = state["decoder.1.weight"].shape[1]
    elif "encoder.14.weight" in state:
        channels = state["encoder.14.weight"].shape[0]
    else:
        raise CheckpointError("TAESD weights without the decoder's first conv or the encoder's last")
    model = TAESD(channels, with_encoder=has["encoder"], with_decoder=has["decoder"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"TAESD weights do not fit: {str(e).splitlines()[0]}") from None
    return model.eval()


def load_taesd(*paths: str | Path) -> TAESD:
    """TAESD from `taesd*_decoder.safetensors` (and/or `_encoder`) files or a diffusers folder or file."""
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        path = Path(path)
        if path.is_dir():
            path = path / "diffusion_pytorch_model.safetensors"
        part, _ = read_state_dict(path)
        half = "decoder" if "decoder" in path.name else "encoder" if "encoder" in path.name else None
        state |= canonical_keys(part, half)
    return from_state_dict(state)
