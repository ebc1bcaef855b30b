"""Where each component lives inside an original single-file checkpoint.

Components are named as the diffusers folders are (`unet`, `vae`, `text_encoder`,
`text_encoder_2`), so one name serves both layouts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from openldm.checkpoints.errors import CheckpointError
from openldm.config import ModelConfig
from openldm.models.tokenizer import has_tokenizer

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")
MODEL_FILE = "model.safetensors"  # the weights of a "model folder": one single file plus its tokenizer/

# Text encoders in HF layout sit under `.transformer.`, OpenCLIP ones under `.model.`.
TEXT_ENCODER_PREFIXES: dict[str, tuple[str, ...]] = {
    "sd1": ("cond_stage_model.transformer.",),
    "sd2": ("cond_stage_model.model.",),
    "sdxl": ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
    "sdxl_refiner": ("conditioner.embedders.0.model.",),
    "x4": ("cond_stage_model.model.",),
}


def component_prefixes(config: ModelConfig) -> dict[str, str]:
    """Component name -> key prefix in the original single-file layout."""
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX}
    for name, prefix in zip(TEXT_ENCODER_NAMES, TEXT_ENCODER_PREFIXES[config.family]):
        prefixes[name] = prefix
    return prefixes


def split_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: ModelConfig
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Split a single-file state dict by component; returns (components, keys matching none)."""
    prefixes = component_prefixes(config)
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in prefixes}
    rest: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for name, prefix in prefixes.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix):]] = value
                break
        else:
            rest[key] = value
    return parts, rest


def join_state_dict(
    parts: Mapping[str, Mapping[str, torch.Tensor]], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """Inverse of `split_state_dict` for the components given."""
    prefixes = component_prefixes(config)
    return {prefixes[name] + key: value for name, part in parts.items() for key, value in part.items()}


def model_files(path: str | Path) -> tuple[Path, Path | None]:
    """(the weights to read, the folder its tokenizers may sit in) for each form a model takes:
    a single file, a diffusers folder (`model_index.json`) or a model folder (`model.safetensors` +
    `tokenizer/`, as the embedded model and `openldm train` write it; its file alone works too)."""
    path = Path(path)
    if path.is_dir() and (path / "model_index.json").exists():
        return path, path
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise CheckpointError(f"{path}: neither a diffusers folder (model_index.json) nor a model folder "
                                  f"({MODEL_FILE})")
        return path / MODEL_FILE, path
    if path.name == MODEL_FILE and any(has_tokenizer(f) for f in (path.parent / "tokenizer", path.parent)):
        return path, path.parent
    return path, None
