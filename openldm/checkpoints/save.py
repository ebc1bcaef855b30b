"""Writing checkpoints: the original single file or a diffusers folder, each checked after writing.

Both writers take either loaded `Components` or plain per-component state dicts in our layout
(text encoders in Hugging Face names). Writes are atomic: a reader never sees half a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from openldm.checkpoints import diffusers_layout as dl
from openldm.checkpoints.infer import config_metadata
from openldm.checkpoints.io import CheckpointError, write_safetensors_atomic
from openldm.checkpoints.layout import TEXT_ENCODER_NAMES, join_state_dict, split_state_dict
from openldm.checkpoints.openclip import hf_to_openclip, openclip_to_hf
from openldm.config import WEIGHT_DTYPES, ModelConfig
from openldm.models.tokenizer import CLIPTokenizer, tokenizer_metadata

# Keys we add to the safetensors header so `openldm info` and loaders know what the keys cannot tell.
META_PRESET = "openldm.preset"
META_FAMILY = "openldm.family"
META_PREDICTION = "openldm.prediction"
EMA_PREFIX = "model_ema."
DTYPES = dict(zip(WEIGHT_DTYPES, (torch.float16, torch.bfloat16, torch.float32), strict=True))
Parts = dict[str, dict[str, torch.Tensor]]


def model_metadata(config: ModelConfig) -> dict[str, str]:
    """The header entries that record which preset and parameterization a file holds."""
    return {META_PRESET: config.name, META_FAMILY: config.family, META_PREDICTION: config.prediction,
            **config_metadata(config)}


def _state(part) -> dict[str, torch.Tensor]:
    return dict(part.state_dict() if isinstance(part, torch.nn.Module) else part)


def component_parts(components) -> Parts:
    """Per-component state dicts (our names; text encoders in HF names) from loaded `Components`."""
    parts = {"unet": _state(components.unet), "vae": _state(components.vae)}
    for name, encoder in zip(TEXT_ENCODER_NAMES, components.text_encoders):
        parts[name] = _state(encoder)
    return parts


def single_file_state_dict(parts: Mapping[str, Mapping[str, torch.Tensor]], config: ModelConfig) -> dict:
    """Parts -> the original single-file dict, with OpenCLIP encoders back in OpenCLIP names."""
    out = dict(parts)
    for name, encoder in zip(TEXT_ENCODER_NAMES, config.text_encoders):
        if encoder.openclip_layout and name in out:
            out[name] = hf_to_openclip(out[name], encoder)
    return join_state_dict(out, config)


def parts_from_single_file(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> Parts:
    """The original single-file dict -> parts with HF-named text encoders (extra keys dropped)."""
    parts, _ = split_state_dict(state_dict, config)
    for name, encoder in zip(TEXT_ENCODER_NAMES, config.text_encoders):
        if encoder.openclip_layout:
            parts[name] = openclip_to_hf(parts[name], encoder)
    return parts


def cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Floating tensors to `dtype`; integer buffers and `None` leave the tensor as it is."""
    if dtype is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


def _cast_all(state: Mapping[str, torch.Tensor], dtype, progress: bool, desc: str) -> dict:
    items = tqdm(state.items(), desc=desc, total=len(state), disable=not progress, unit="tensor")
    return {key: cast(value, dtype).contiguous() for key, value in items}


def _is_components(source) -> bool:
    return hasattr(source, "unet") and hasattr(source, "config")


def save_single_file(
    source, path: str | Path, *, config: ModelConfig | None = None, dtype: torch.dtype | None = None,
    prune_ema: bool = False, metadata: Mapping[str, str] | None = None, progress: bool = False,
) -> Path:
    """Write the original single-file layout from `Components` or a full single-file state dict.

    A state dict keeps every key it has (EMA copies too, unless `prune_ema`); `config`, when given,
    records the preset and prediction in the header.
    """
    if _is_components(source):
        config = source.config
        state = single_file_state_dict(component_parts(source), config)
        metadata = {**(getattr(source, "metadata", None) or {}), **tokenizer_metadata(source.tokenizers),
                    **(metadata or {})}
    else:
        state = dict(source)
    if prune_ema:
        state = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}
    header = {**(metadata or {}), **(model_metadata(config) if config else {})}
    path = Path(path)
    write_safetensors_atomic(path, _cast_all(state, dtype, progress, path.name), metadata=header)
    return path


def _config_and_parts(source, config: ModelConfig | None) -> tuple[ModelConfig, Parts]:
    if _is_components(source):
        return source.config, component_parts(source)
    if config is None:
        raise ValueError("saving plain state dicts needs the model `config`")
    return config, {name: dict(part) for name, part in source.items()}


def _write_json(path: Path, data: Mapping) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_component(root: Path, name: str, part: Mapping, config: ModelConfig, dtype, progress,
                     tokenizers: list[CLIPTokenizer]) -> None:
    """One diffusers sub-folder: config.json and weights (plus the tokenizer beside an encoder)."""
    folder = root / dl.folder_names(config)[name]
    state = _cast_all(dl.to_diffusers(name, part, config), dtype, progress, folder.name)
    if name.startswith("text_encoder"):
        encoder = config.text_encoders[TEXT_ENCODER_NAMES.index(name)]
        _write_json(folder / "config.json", dl.text_encoder_config_json(encoder))
        weights = folder / "model.safetensors"
        index = TEXT_ENCODER_NAMES.index(name)
        tokenizer = tokenizers[index] if tokenizers else CLIPTokenizer.for_config(encoder)
        tokenizer.save(root / folder.name.replace("text_encoder", "tokenizer"))
    else:
        _write_json(folder / "config.json", getattr(dl, f"{name}_config_json")(config))
        weights = folder / "diffusion_pytorch_model.safetensors"
    write_safetensors_atomic(weights, state, metadata={"format": "pt", **model_metadata(config)})


def _replace_dir(new: Path, target: Path) -> None:
    """Move a finished folder into place; an existing diffusers folder there is replaced whole."""
    if not target.exists():
        os.replace(new, target)
        return
    if any(target.iterdir()) and not (target / "model_index.json").exists():
        raise CheckpointError(f"{target} exists and is not a diffusers folder; refusing to replace it")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old)


def save_diffusers(
    source, folder: str | Path, *, config: ModelConfig | None = None, dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Path:
    """Write the diffusers folder layout from `Components` or parts; built beside, then renamed."""
    config, parts = _config_and_parts(source, config)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name in dl.folder_names(config):
            _write_component(tmp, name, parts[name], config, dtype, progress,
                             getattr(source, "tokenizers", None) or [])
        _write_json(tmp / "scheduler" / "scheduler_config.json", dl.scheduler_config_json(config))
        if config.low_res is not None:
            low_res = dl.low_res_scheduler_json(config)
            _write_json(tmp / "low_res_scheduler" / "scheduler_config.json", low_res)
        _write_json(tmp / "model_index.json", dl.model_index_json(config))
        _replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# --- verification --------------------------------------------------------------------------

def _check(key: str, written: torch.Tensor, expected: torch.Tensor, dtype, bad: list[str]) -> None:
    expected = cast(expected, dtype)
    same = written.dtype == expected.dtype and written.shape == expected.shape
    if not (same and torch.equal(written, expected)):
        bad.append(key)


def _report(where: Path, missing: Iterable[str], extra: Iterable[str], bad: list[str]) -> None:
    problems = [(f"{len(keys)} {what}", sorted(keys)[:3]) for what, keys in
                (("missing", list(missing)), ("unexpected", list(extra)), ("differing", bad)) if keys]
    if problems:
        detail = "; ".join(f"{head} (e.g. {', '.join(keys)})" for head, keys in problems)
        raise CheckpointError(f"verification of {where} failed: {detail}")


def verify_single_file(
    path: str | Path, expected: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None,
    prune_ema: bool = False,
) -> int:
    """Re-read a written file tensor by tensor; every tensor must equal the source after the cast."""
    path = Path(path)
    expected = {k: v for k, v in expected.items() if not (prune_ema and k.startswith(EMA_PREFIX))}
    bad: list[str] = []
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        for key in keys & expected.keys():
            _check(key, f.get_tensor(key), expected[key], dtype, bad)
    _report(path, expected.keys() - keys, keys - expected.keys(), bad)
    return len(expected)


def verify_diffusers(
    folder: str | Path, parts: Mapping[str, Mapping[str, torch.Tensor]], config: ModelConfig, *,
    dtype: torch.dtype | None = None,
) -> int:
    """Re-read a written diffusers folder, one component at a time, against the source parts.

    The expectation is the source as the layout stores it: an SD2 encoder's last layer, which the
    folder leaves out (`diffusers_layout.drops_last_layer`), reads back as zeros.
    """
    count = 0
    for name in dl.folder_names(config):
        written = dl.read_component(folder, name, config)
        expected = dl.from_diffusers(name, dl.to_diffusers(name, parts[name], config), config)
        bad: list[str] = []
        for key in written.keys() & expected.keys():
            _check(f"{name}.{key}", written[key], expected[key], dtype, bad)
        _report(Path(folder), expected.keys() - written.keys(), written.keys() - expected.keys(), bad)
        count += len(written)
    return count


# --- random weights ------------------------------------------------------------------------

def _meta_parts(config: ModelConfig) -> Iterable[tuple[str, dict[str, torch.Tensor]]]:
    """Each component built on the meta device (no memory), one at a time."""
    from openldm.models.clip import CLIPTextModel
    from openldm.models.unet import UNetModel
    from openldm.models.vae import AutoencoderKL

    builders = {"unet": partial(UNetModel, config.unet), "vae": partial(AutoencoderKL, config.vae)}
    for name, encoder in zip(TEXT_ENCODER_NAMES, config.text_encoders):
        builders[name] = partial(CLIPTextModel, encoder)
    for name, build in builders.items():
        with torch.device("meta"):  # not around the yield: the caller's tensors must be real
            state = build().state_dict()
        yield name, state


def _random_like(key: str, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Biases 0, norm scales 1, position ids counted, matrices N(0, 1/fan_in): outputs stay O(1)."""
    if not like.is_floating_point():
        return torch.arange(like.shape[-1], dtype=like.dtype).expand(like.shape).clone()
    if key.endswith("bias"):
        return torch.zeros(like.shape)
    if like.ndim <= 1:
        return torch.ones(like.shape)
    fan_in = like[0].numel()
    return torch.randn(like.shape, generator=generator) * fan_in**-0.5


def random_state_dict(
    config: ModelConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32, progress: bool = False
) -> dict[str, torch.Tensor]:
    """A random-weight single-file state dict: shapes from meta-built models, values from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, part in _meta_parts(config):
        full = single_file_state_dict({name: part}, config)
        for key, like in tqdm(full.items(), desc=name, disable=not progress, unit="tensor"):
            out[key] = cast(_random_like(key, like, generator), dtype)
    return out
