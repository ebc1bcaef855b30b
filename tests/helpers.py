"""Shared test helpers: single-file checkpoints of any preset, with random weights.

The key set and shapes come from our own model classes built on the meta device, put into the
original layout by `save.single_file_state_dict`; values come from `save.random_state_dict`.
`extras` adds what real ldm files carry beside the weights (DDPM buffers, CLIP position ids,
OpenCLIP's logit scale and unused text projection), so loaders meet them in every test.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import save_file

from openldm.checkpoints.io import write_safetensors_atomic
from openldm.checkpoints.layout import TEXT_ENCODER_NAMES, UNET_PREFIX, component_prefixes
from openldm.checkpoints.load import build_component, ema_key
from openldm.checkpoints.save import random_state_dict, single_file_state_dict
from openldm.config import ModelConfig, get_preset

EMA_OFFSET = 0.01  # EMA copies are the raw weights plus this, so tests can tell which was loaded


def preset(config: str | ModelConfig) -> ModelConfig:
    return get_preset(config) if isinstance(config, str) else config


def checkpoint_shapes(config: str | ModelConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a preset's single-file checkpoint, without allocating any weights."""
    config = preset(config)
    parts = {name: build_component(name, config).state_dict() for name in component_prefixes(config)}
    return {k: tuple(v.shape) for k, v in single_file_state_dict(parts, config).items()}


def extra_tensors(config: ModelConfig) -> dict[str, torch.Tensor]:
    """Non-weight tensors that real original checkpoints of this family carry."""
    out: dict[str, torch.Tensor] = {}
    if config.family in ("sd1", "sd2", "x4"):  # ldm's DDPM registers its schedule as buffers
        betas = torch.linspace(config.linear_start**0.5, config.linear_end**0.5, config.timesteps) ** 2
        out["betas"] = betas
        out["alphas_cumprod"] = torch.cumprod(1 - betas, 0)
    if config.low_res is not None:  # and the x4 upscaler's noise augmentation, its own
        out["low_scale_model.betas"] = betas.clone()
        out["low_scale_model.sqrt_one_minus_alphas_cumprod"] = (1 - torch.cumprod(1 - betas, 0)).sqrt()
    for name, encoder in zip(TEXT_ENCODER_NAMES, config.text_encoders):
        prefix = component_prefixes(config)[name]
        if encoder.openclip_layout:
            out[prefix + "logit_scale"] = torch.tensor(4.6052)
            if not encoder.projection_dim:
                out[prefix + "text_projection"] = torch.randn(encoder.hidden_size, encoder.hidden_size)
        else:
            ids = torch.arange(encoder.max_length)[None]
            out[prefix + "text_model.embeddings.position_ids"] = ids
    return out


@lru_cache(maxsize=16)
def _tiny_random(config: ModelConfig, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return random_state_dict(config, seed=seed, dtype=dtype)


def checkpoint_state_dict(
    config: str | ModelConfig, *, dtype: torch.dtype = torch.float32, ema: bool = False,
    extras: bool = True, seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A random-weight single-file state dict; `ema` adds ldm's `model_ema.*` copies of the UNet."""
    config = preset(config)
    if config.name.startswith("tiny"):  # tests mutate what they get: hand out copies of the cached dict
        state = {k: v.clone() for k, v in _tiny_random(config, seed, dtype).items()}
    else:
        state = random_state_dict(config, seed=seed, dtype=dtype)
    if ema:
        for key, _ in build_component("unet", config).named_parameters():  # LitEma keeps parameters only
            state[ema_key(key)] = state[UNET_PREFIX + key] + EMA_OFFSET
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    if extras:
        state |= extra_tensors(config)
    return state


def make_checkpoint(
    tmp_path: Path, config: str | ModelConfig, *, dtype: torch.dtype = torch.float32, ema: bool = False,
    fmt: str = "safetensors", metadata: dict[str, str] | None = None, name: str | None = None,
    extras: bool = True, seed: int = 0,
) -> Path:
    """Write a random-weight original-layout checkpoint (`fmt`: "safetensors" or "ckpt")."""
    config = preset(config)
    state = checkpoint_state_dict(config, dtype=dtype, ema=ema, extras=extras, seed=seed)
    path = Path(tmp_path) / f"{name or config.name}.{fmt}"
    if fmt == "safetensors":
        write_safetensors_atomic(path, state, metadata)
    elif fmt == "ckpt":
        torch.save({"state_dict": state, "global_step": 1}, path)
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}")
    return path


TINY_LORA_UNET_LAYER = "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # diffusers name, kohya
TINY_LORA_TEXT_LAYER = "text_model_encoder_layers_0_mlp_fc1"


def write_tiny_lora(path: Path, seed: int) -> None:
    """A kohya LoRA on one UNet cross-attention projection and one text-encoder MLP layer of tiny-sd1."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for stem, (out, inp) in ((f"lora_unet_{TINY_LORA_UNET_LAYER}", (32, 32)),
                             (f"lora_te_{TINY_LORA_TEXT_LAYER}", (64, 32))):
        tensors |= {f"{stem}.lora_down.weight": torch.randn(4, inp, generator=g),
                    f"{stem}.lora_up.weight": torch.randn(out, 4, generator=g),
                    f"{stem}.alpha": torch.tensor(4.0)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path)
