"""Load a whole model (UNet, VAE, text encoders) from a single file or a diffusers folder.

Each module is built on the `meta` device and receives the file's tensors with
`load_state_dict(strict=True, assign=True)`, so a safetensors file is never copied in memory unless
a dtype or device change asks for it. Every key must be used, or be on the short allow-list below.

Where the prediction type comes from, first found wins:
  1. the `prediction=` argument;
  2. safetensors metadata: `openldm.prediction` (ours, written by `save`: "eps" or "v"), else
     `modelspec.prediction_type` ("epsilon" or "v");
  3. the original yaml: `config_file=`, else `<checkpoint>.yaml` beside the file;
  4. a diffusers folder's `scheduler/scheduler_config.json` `prediction_type`;
  5. the family's: "v" for the x4 upscaler, else "eps".
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from openldm.checkpoints import diffusers_layout as dl
from openldm.checkpoints.detect import detect
from openldm.checkpoints.io import CastReader, CheckpointError, read_state_dict
from openldm.checkpoints.layout import TEXT_ENCODER_NAMES, component_prefixes, model_files, split_state_dict
from openldm.checkpoints.ldm_config import LdmConfig, check_against, read_ldm_config
from openldm.checkpoints.openclip import openclip_to_hf
from openldm.checkpoints.save import EMA_PREFIX, META_PREDICTION
from openldm.checkpoints.vae_file import load_vae
from openldm.config import CLIPTextConfig, ModelConfig, Prediction
from openldm.engines.weights import FileWeights, file_identity
from openldm.models.clip import CLIPTextModel
from openldm.models.tokenizer import CLIPTokenizer, find_tokenizers
from openldm.models.unet import UNetModel
from openldm.models.vae import AutoencoderKL

# --- the allow-list ------------------------------------------------------------------------
# Outside every component: ldm's DDPM schedule buffers (we recompute the schedule from the config),
# sgm's sigma table, the EMA bookkeeping counters, and the x4 upscaler's `low_scale_model` schedule
# (ldm's `AbstractLowScaleModel` buffers; its schedule is the config's `NoiseAugmentation`).
_DDPM_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
IGNORED_KEYS = frozenset({*_DDPM_BUFFERS, *(f"low_scale_model.{b}" for b in _DDPM_BUFFERS[:8]),
                          "denoiser.sigmas", "model_ema.decay", "model_ema.num_updates"})
# Inside a text encoder: the position-id buffer (we count positions), CLIP's contrastive temperature,
# OpenCLIP's causal mask buffer, and the text projection of an encoder whose pooled output SD ignores.
IGNORED_TEXT_KEYS = re.compile(r"(.*\.)?position_ids|logit_scale|attn_mask")
_PROJECTION = re.compile(r"text_projection(\.weight)?")

_PREDICTIONS: dict[str, Prediction] = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v"}
_METADATA_PREDICTION = (META_PREDICTION, "modelspec.prediction_type")
_SHOWN = 8  # keys listed in an error before "... and N more"


@dataclass
class Components:
    """A loaded model and where it came from (`prediction_from` names which source set prediction)."""

    config: ModelConfig
    unet: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    metadata: dict[str, str] = field(default_factory=dict)
    source: Path | None = None
    layout: Literal["single_file", "diffusers"] = "single_file"
    ema: bool = False  # the UNet holds the file's EMA weights
    prediction_from: str = "default"
    tokenizers: list[CLIPTokenizer] = field(default_factory=list)  # one per text encoder
    vae_file: tuple[str, str] | None = None  # (name, short hash) of a standalone VAE in place of the model's
    unet_weights: FileWeights | None = None  # a single file's UNet: may be dropped, read back
    text_weights: list[FileWeights] = field(default_factory=list)  # its text encoders, the same way
    # its VAE, named by the file so an engine's cache finds its decoder unhashed; never dropped
    vae_weights: FileWeights | None = None


def build_component(name: str, config: ModelConfig, device: torch.device | str = "meta") -> nn.Module:
    """An empty module for one component (`unet`, `vae`, `text_encoder`, `text_encoder_2`)."""
    with torch.device(device):
        if name == "unet":
            return UNetModel(config.unet)
        if name == "vae":
            return AutoencoderKL(config.vae)
        return CLIPTextModel(config.text_encoders[TEXT_ENCODER_NAMES.index(name)])


SMALL_MODEL = 50_000_000  # parameters


def _build_device(tensors) -> str:
    """Where to build empty modules before the weights are assigned: "meta" skips random init
    (seconds for SD sizes), but its first use in a process costs torch ~2 s of setup, more than
    initialising a small model (the embedded one: 8 M parameters) on the CPU outright."""
    return "cpu" if sum(t.numel() for t in tensors) < SMALL_MODEL else "meta"


def load_components(
    path: str | Path,
    *,
    prediction: Prediction | None = None,
    config_file: str | Path | None = None,
    ema: bool | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    vae: str | Path | None = None,
    defer_unet: bool = False,
) -> Components:
    """Load a model in any form (`layout.model_files`); `ema=None` takes the EMA weights a file has.

    A single file's UNet can be read back from it (`unet_weights`); `defer_unet=True` leaves it
    unread (on `meta`) until something needs it: an engine may find its own program of it cached."""
    path, tokenizer_folder = model_files(path)
    sidecar = sidecar_for(path, config_file)
    if path.is_dir():
        if ema:
            raise CheckpointError(f"{path}: a diffusers folder holds no EMA weights")
        components = _load_folder(path, prediction, sidecar, dtype, device)
    else:
        components = _load_file(path, prediction, sidecar, ema, dtype, device, defer_unet)
    components.tokenizers = find_tokenizers(components.config.text_encoders, tokenizer_folder,
                                            components.metadata)
    if vae is not None:  # A1111's "SD VAE": the model's own is replaced whole
        loaded = load_vae(vae, components.config, dtype=dtype, device=device)
        components.vae, components.vae_file = loaded.vae, (loaded.name, loaded.hash)
        components.vae_weights = None  # not the model file's VAE any more
    return components


def _load_file(path: Path, prediction, sidecar: LdmConfig | None, ema, dtype, device,
               defer_unet: bool = False) -> Components:
    tensors, metadata = read_state_dict(path)
    chosen, source = prediction_source(prediction, metadata, sidecar)
    config = detect({k: tuple(v.shape) for k, v in tensors.items()}, prediction=chosen, metadata=metadata,
                    hints=sidecar_hints(sidecar))
    if sidecar is not None:
        check_against(sidecar, config)
    where = "meta" if defer_unet else _build_device(tensors.values())
    modules = {name: build_component(name, config, where) for name in component_prefixes(config)}
    parts, used_ema = _single_file_parts(tensors, config, modules["unet"], ema, path)
    reader = CastReader(path, tensors) if path.suffix.lower() == ".safetensors" else None
    loaded = {k: m for k, m in modules.items() if not (defer_unet and k == "unet")}
    _check_fit(path, "unet", modules["unet"], parts["unet"])
    modules["unet"].eval()  # `_load_all` sets what it loads; a deferred UNet is read in eval mode too
    _load_all(loaded, parts, config, path, dtype, device, reader)
    components = _components(modules, config, metadata, path, "single_file", used_ema, source)
    components.unet_weights = _file_weights(components, path, "unet", used_ema, dtype, device,
                                            loaded=not defer_unet)
    components.text_weights = [_file_weights(components, path, name, used_ema, dtype, device)
                               for name in TEXT_ENCODER_NAMES[: len(components.text_encoders)]]
    components.vae_weights = _file_weights(components, path, "vae", used_ema, dtype, device)
    return components


def _file_weights(components: Components, path: Path, name: str, ema: bool, dtype, device,
                  loaded: bool = True) -> FileWeights:
    """How to read one component (`unet`, `vae`, `text_encoder`, ...) back from its file, as it was
    loaded: EMA or not, in `dtype`, on `device`. The VAE's is never released: pipelines call it directly."""
    unet, config = components.unet, components.config
    modules = {"unet": unet, "vae": components.vae, **dict(zip(TEXT_ENCODER_NAMES, components.text_encoders))}
    module = modules[name]

    def read() -> dict[str, torch.Tensor]:
        tensors, _ = read_state_dict(path)
        parts, _ = _single_file_parts(tensors, config, unet, ema, path)
        reader = CastReader(path, tensors) if path.suffix.lower() == ".safetensors" else None
        return {k: _place(v, dtype, device, reader) for k, v in parts[name].items()}

    placed = torch.device(device), dtype or next(module.parameters()).dtype
    identity = file_identity(path, name, dtype, {"ema": ema, "device": str(placed[0])})
    return FileWeights(module, read, identity, *placed, loaded=loaded, releasable=name != "vae")


def _load_folder(folder: Path, prediction, sidecar: LdmConfig | None, dtype, device) -> Components:
    chosen, source = prediction_source(prediction, {}, sidecar)
    if chosen is None and (folder / "scheduler" / "scheduler_config.json").exists():
        source = "scheduler"
    config, parts = dl.read_diffusers(folder, prediction=chosen)
    for name, encoder in zip(TEXT_ENCODER_NAMES, config.text_encoders):
        parts[name] = _drop_ignored(parts[name], encoder)
    if sidecar is not None:
        check_against(sidecar, config)
    where = _build_device(t for part in parts.values() for t in part.values())
    modules = {name: build_component(name, config, where) for name in parts}
    _load_all(modules, parts, config, folder, dtype, device)
    return _components(modules, config, {}, folder, "diffusers", False, source)


def _components(modules, config, metadata, path, layout, used_ema, source) -> Components:
    encoders = [modules[name] for name in TEXT_ENCODER_NAMES if name in modules]
    return Components(config, modules["unet"], modules["vae"], encoders, dict(metadata), path, layout,
                      used_ema, source)


# --- prediction ----------------------------------------------------------------------------

def sidecar_for(path: Path, config_file: str | Path | None) -> LdmConfig | None:
    """The yaml given, else `<name>.yaml` beside a checkpoint file."""
    if config_file is not None:
        return read_ldm_config(config_file)
    for suffix in (".yaml", ".yml"):
        beside = path.with_suffix(suffix)
        if path.is_file() and beside.is_file():
            return read_ldm_config(beside)
    return None


def sidecar_hints(sidecar: LdmConfig | None) -> dict[str, object]:
    """What a yaml says that shapes cannot: the UNet's head counts."""
    heads = ("num_heads", "num_head_channels")
    return {} if sidecar is None else {k: v for k, v in sidecar.unet.items() if k in heads}


def _normalise(value: str, where: str) -> Prediction:
    try:
        return _PREDICTIONS[value.strip().lower().replace("-", "_")]
    except KeyError:
        raise CheckpointError(f"{where}: unknown prediction type {value!r} (expected eps or v)") from None


def prediction_source(explicit, metadata: Mapping[str, str], sidecar: LdmConfig | None) -> tuple:
    """(prediction or None, the source that set it) in the order of the module docstring."""
    if explicit is not None:
        return _normalise(explicit, "prediction="), "option"
    for key in _METADATA_PREDICTION:
        if key in metadata:
            return _normalise(metadata[key], f"metadata {key}"), "metadata"
    if sidecar is not None:
        return sidecar.prediction, "yaml"
    return None, "default"


# --- single-file keys ----------------------------------------------------------------------

def ema_key(unet_key: str) -> str:
    """ldm's `LitEma` name for a UNet parameter: its dotted path, dots removed."""
    return EMA_PREFIX + f"diffusion_model.{unet_key}".replace(".", "")


def _single_file_parts(tensors, config: ModelConfig, unet: nn.Module, ema: bool | None, path: Path):
    """Split by component, swap in the EMA UNet if wanted, refuse keys nobody uses."""
    parts, rest = split_state_dict(tensors, config)
    ema_keys = {k for k in rest if k.startswith(EMA_PREFIX) and k not in IGNORED_KEYS}
    use_ema = bool(ema_keys) if ema is None else ema
    if use_ema:
        if not ema_keys:
            raise CheckpointError(f"{path}: ema=True, but the file has no EMA weights ({EMA_PREFIX}*)")
        names = {ema_key(k): k for k, _ in unet.named_parameters()}
        if len(names) != len(set(names.values())):
            raise CheckpointError("two UNet parameters share one EMA name; cannot tell them apart")
        _report(path, "the EMA UNet", missing=names.keys() - ema_keys, unexpected=ema_keys - names.keys())
        parts["unet"] = parts["unet"] | {names[k]: rest[k] for k in names}
    unused = sorted(k for k in rest if k not in IGNORED_KEYS and k not in ema_keys)
    _report(path, "the checkpoint", missing=(), unexpected=unused)
    for name, encoder in zip(TEXT_ENCODER_NAMES, config.text_encoders):
        parts[name] = _text_part(parts.get(name, {}), encoder)
    return parts, use_ema


def _drop_ignored(state: Mapping[str, torch.Tensor], encoder: CLIPTextConfig) -> dict[str, torch.Tensor]:
    """A text encoder's state without the allow-listed keys (names of either layout)."""
    def ignored(key: str) -> bool:
        unused_projection = not encoder.projection_dim and _PROJECTION.fullmatch(key)
        return bool(IGNORED_TEXT_KEYS.fullmatch(key) or unused_projection)

    return {k: v for k, v in state.items() if not ignored(k)}


def _text_part(state: Mapping[str, torch.Tensor], encoder: CLIPTextConfig) -> dict[str, torch.Tensor]:
    """Drop the allow-listed keys; OpenCLIP names -> Hugging Face names."""
    kept = _drop_ignored(state, encoder)
    return openclip_to_hf(kept, encoder) if encoder.openclip_layout and kept else kept


# --- loading into modules ------------------------------------------------------------------

def _listed(keys) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _report(path: Path, what: str, missing, unexpected) -> None:
    problems = [f"{len(keys)} {kind} keys: {_listed(keys)}"
                for kind, keys in (("missing", list(missing)), ("unexpected", list(unexpected))) if keys]
    if problems:
        raise CheckpointError(f"{path}: {what} does not fit the model: " + "; ".join(problems))


def _check_fit(path: Path, name: str, module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    expected = module.state_dict()
    _report(path, name, missing=expected.keys() - state.keys(), unexpected=state.keys() - expected.keys())
    wrong = [f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})"
             for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{path}: {name}: {len(wrong)} tensors have the wrong shape: {_listed(wrong)}")


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in `tensor`. A NaN or inf anywhere makes the sum non-finite, so a finite sum (one
    read, ~20x faster than `isfinite` over every value: 0.4 s of each SD1.5 load) proves the tensor
    finite; only a non-finite sum, which huge finite values could also give, is checked value by value."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _warn_non_finite(path: Path, name: str, state: Mapping[str, torch.Tensor]) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not all_finite(v)]
    if bad:
        warnings.warn(f"{path}: {name}: NaN or inf in {len(bad)} tensors: {_listed(bad)}", stacklevel=2)


def _place(tensor: torch.Tensor, dtype: torch.dtype | None, device, reader: CastReader | None = None
           ) -> torch.Tensor:
    """Cast floating tensors to `dtype` and move to `device`; a no-op (no copy) when nothing changes.
    A cast from a safetensors file reads through `reader`, so the file's pages do not stay beside it."""
    dtype = dtype if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype else None
    if dtype is not None and reader is not None:
        tensor = reader.cast(tensor, dtype)
    return tensor.to(device=device, dtype=dtype)


def _load_all(modules: dict[str, nn.Module], parts, config, path: Path, dtype, device,
              reader: CastReader | None = None) -> None:
    for name, module in modules.items():
        state = parts.get(name) or {}
        if not state:
            raise CheckpointError(f"{path}: the checkpoint has no {name} (keys under "
                                  f"{component_prefixes(config).get(name, name)!r})")
        _check_fit(path, name, module, state)
        placed = {k: _place(v, dtype, device, reader) for k, v in state.items()}
        _warn_non_finite(path, name, placed)  # on the copies: reading the map would keep its pages
        module.load_state_dict(placed, strict=True, assign=True)
        left = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
        if left:  # a non-persistent buffer would stay on meta: a model bug, not a file problem
            raise RuntimeError(f"{type(module).__name__} has tensors outside its state dict: {_listed(left)}")
        module.eval()
