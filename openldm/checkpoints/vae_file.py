"""A standalone VAE put in place of a model's own (A1111's `--vae`, "SD VAE").

Accepted forms: a file in the original layout (`vae-ft-mse-840000-ema-pruned.safetensors`, keys
`encoder.*`/`decoder.*`, with or without `first_stage_model.`), a file in diffusers naming (the SDXL
fp16-fix VAE's `diffusion_pytorch_model.safetensors`), or a diffusers `vae/` folder. The VAE must fit
the model's VAE config exactly (strict load), so one made for another latent space is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from openldm.checkpoints import diffusers_layout as dl
from openldm.checkpoints.hashing import model_hash
from openldm.checkpoints.io import CheckpointError, read_state_dict
from openldm.checkpoints.layout import VAE_PREFIX
from openldm.config import ModelConfig
from openldm.models.vae import AutoencoderKL

# Keys VAE files carry beside the weights: the training loss (LPIPS, discriminator) and EMA counters.
_IGNORED = ("loss.", "model_ema.")


@dataclass(frozen=True)
class VAEFile:
    """A loaded standalone VAE and what the infotext records of it (A1111's `VAE`, `VAE hash`)."""

    vae: AutoencoderKL
    name: str
    hash: str


def _vae_state(path: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The VAE's tensors in our names, whatever form `path` has."""
    files = dl._weight_files(path) if path.is_dir() else [path]
    state = {k: v for file in files for k, v in read_state_dict(file)[0].items()}
    state = {k.removeprefix(VAE_PREFIX): v for k, v in state.items() if not k.startswith(_IGNORED)}
    if any(k.startswith("encoder.down_blocks.") for k in state):  # diffusers names
        return dl.from_diffusers("vae", state, config)
    return state


def _check_latent_space(path: Path, state: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Refuse a VAE of another latent space in one line: its latent channels, and (a diffusers folder's
    config.json says it) its scaling factor. An original-layout file does not record its scale: an SDXL
    VAE (0.13025) has SD1's shapes (0.18215), so only the folder form can be told apart."""
    wanted = config.latent_format
    conv = state.get("post_quant_conv.weight")
    if conv is not None and conv.ndim == 4 and conv.shape[1] != wanted.channels:
        raise CheckpointError(f"{path}: a VAE with {conv.shape[1]} latent channels; {config.name}'s latents "
                              f"have {wanted.channels}")
    settings = path / "config.json"
    if not settings.is_file():
        return
    try:
        scale = json.loads(settings.read_text(encoding="utf-8")).get("scaling_factor")
    except (ValueError, AttributeError, UnicodeDecodeError):
        raise CheckpointError(f"{settings}: not a readable diffusers VAE config") from None
    if isinstance(scale, (int, float)) and not math.isclose(scale, wanted.scale_factor, rel_tol=1e-4):
        raise CheckpointError(f"{path}: a VAE for latents scaled by {scale} (its config.json); "
                              f"{config.name}'s are scaled by {wanted.scale_factor}")


def load_vae(path: str | Path, config: ModelConfig, *, dtype: torch.dtype | None = None,
             device: torch.device | str = "cpu") -> VAEFile:
    """A standalone VAE for `config`'s latent space, loaded strictly."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such VAE file or folder")
    state = _vae_state(path, config)
    _check_latent_space(path, state, config)
    vae = AutoencoderKL(config.vae)
    expected = vae.state_dict()
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    wrong = [k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        shown = sorted(missing)[:2] + sorted(unexpected)[:2] + sorted(wrong)[:2]
        raise CheckpointError(f"{path}: not a VAE for {config.name} ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected, {len(wrong)} wrongly shaped keys, e.g. "
                              f"{', '.join(shown)})")
    vae.load_state_dict(state, strict=True)
    vae = vae.to(device=device, dtype=dtype).eval()
    return VAEFile(vae, path.name, model_hash(path))  # A1111 records the file name, suffix included
