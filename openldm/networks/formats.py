"""Reading LoRA and LyCORIS files: every key format becomes (component, module path, role).

Formats read (the path is left as the file spells it; `lora.py` finds the module it names):
- kohya / A1111: `lora_unet_<path>` / `lora_te_` (SD1, SD2) / `lora_te1_`, `lora_te2_` (SDXL), the
  module path joined with `_` (diffusers names for SD1/SD2 UNets, ldm names for SDXL), suffixes
  `.lora_down.weight`, `.lora_up.weight`, `.lora_mid.weight`, `.alpha`, and LyCORIS's `.hada_*`,
  `.lokr_*`, `.diff`, `.diff_b`;
- diffusers / PEFT: `unet.` / `text_encoder.` / `text_encoder_2.` + dotted path, suffixes
  `.lora_A.weight`/`.lora_B.weight` (PEFT), `.lora.down.weight`/`.lora.up.weight`,
  `.lora_linear_layer.down.weight`, and the old attention processors `processor.to_q_lora.down.weight`.
  PEFT keeps alpha outside the tensors: in `lora_adapter_metadata` (`unet.lora_alpha`,
  `unet.alpha_pattern`, ...); with no alpha anywhere, alpha = rank.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from openldm.checkpoints.io import CheckpointError, read_state_dict
from openldm.networks.deltas import ROLES

# (key prefix, component, separator in the module path); `None`: the file does not say.
PREFIXES: tuple[tuple[str, str | None, str], ...] = (
    ("lora_unet_", "unet", "_"), ("lora_te1_", "text_encoder", "_"), ("lora_te2_", "text_encoder_2", "_"),
    ("lora_te_", "text_encoder", "_"), ("unet.", "unet", "."), ("text_encoder_2.", "text_encoder_2", "."),
    ("text_encoder.", "text_encoder", "."), ("base_model.model.", None, "."),
)
_LOW_RANK = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid",
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
}
_PROCESSOR = {"_lora.down.weight": "down", "_lora.up.weight": "up"}  # `processor.to_q_lora.down.weight`
_LYCORIS = {f".{role}": role for role in ROLES if role not in ("down", "up", "mid")}  # `.hada_w1_a`, ...
SUFFIXES: dict[str, str] = _LOW_RANK | _LYCORIS
# Roles we recognise but do not apply; a module carrying one is left untouched and reported.
UNSUPPORTED = (
    ".dora_scale", ".lora_magnitude_vector", ".lora_B.bias", ".oft_blocks", ".oft_diag", ".rescale",
    ".w_norm", ".b_norm", ".on_input", ".scale", ".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight",
)
# Old diffusers text-encoder processors used the UNet's attention names.
_TEXT_PROCESSOR_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
METADATA_KEY = "lora_adapter_metadata"


@dataclass
class NetworkModule:
    """The tensors one network stores for one layer of the model."""

    component: str | None  # "unet", "text_encoder", "text_encoder_2"; None: any that has the path
    path: str  # as the file names it, prefix removed (`down_blocks_0_..._to_q` or dotted)
    tensors: dict[str, Tensor] = field(default_factory=dict)  # role -> tensor
    keys: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)


@dataclass
class LoadedNetwork:
    """A network file, grouped by module; `unknown` keys fit no format and are reported when applied."""

    name: str
    modules: list[NetworkModule]
    unknown: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    source: Path | None = None


def _split_suffix(key: str) -> tuple[str, str, str] | None:
    """(module part, role, kind) for a key, kind being "plain", "processor" or "unsupported"."""
    for kind, table in (("plain", SUFFIXES), ("processor", _PROCESSOR)):
        for suffix in sorted(table, key=len, reverse=True):
            if key.endswith(suffix):
                return key[: -len(suffix)], table[suffix], kind
    for suffix in UNSUPPORTED:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix[1:], "unsupported"
    return None


def _split_prefix(module: str) -> tuple[str | None, str]:
    for prefix, component, _ in PREFIXES:
        if module.startswith(prefix):
            return component, module[len(prefix):]
    return None, module


def _processor_path(path: str, component: str | None) -> str:
    """`attn1.processor.to_out` -> `attn1.to_out.0`; `self_attn.to_q` -> `self_attn.q_proj`."""
    parent, _, leaf = path.replace(".processor.", ".").rpartition(".")
    if component is not None and component.startswith("text_encoder"):
        return f"{parent}.{_TEXT_PROCESSOR_NAMES.get(leaf, leaf)}"
    return f"{parent}.{leaf}.0" if leaf == "to_out" else f"{parent}.{leaf}"


def parse_network(
    state_dict: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None, name: str = "network"
) -> LoadedNetwork:
    """Group a network's tensors by module; CheckpointError if no key is in a format we know."""
    modules: dict[tuple[str | None, str], NetworkModule] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        split = _split_suffix(key)
        if split is None:
            unknown.append(key)
            continue
        module_part, role, kind = split
        component, path = _split_prefix(module_part)
        if kind == "processor":
            path = _processor_path(path, component)
        module = modules.setdefault((component, path), NetworkModule(component, path))
        module.keys.append(key)
        if kind == "unsupported":
            module.unsupported.append(key)
        elif role in module.tensors:
            unknown.append(key)  # two spellings of one tensor: report rather than guess
        else:
            module.tensors[role] = value
    if not modules:
        shown = ", ".join(sorted(state_dict)[:5])
        raise CheckpointError(f"{name}: not a LoRA/LyCORIS file in any format we know; its keys: {shown}")
    network = LoadedNetwork(name, list(modules.values()), unknown, dict(metadata or {}))
    _apply_peft_alphas(network)
    return network


def load_network(path: str | Path, name: str | None = None) -> LoadedNetwork:
    """Read a `.safetensors` (or, through `torch.load(weights_only=True)`, `.pt`/`.ckpt`) network."""
    path = Path(path)
    tensors, metadata = read_state_dict(path)
    network = parse_network(tensors, metadata, name or path.stem)
    network.source = path
    return network


# --- PEFT alphas ---------------------------------------------------------------------------

def peft_configs(metadata: Mapping[str, str]) -> dict[str, dict]:
    """Per-component LoRA configs from diffusers' `lora_adapter_metadata` (flat `unet.r` keys)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"unreadable {METADATA_KEY} metadata: {e}") from None
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field_name = key.partition(".")
        if field_name:
            configs.setdefault(component, {})[field_name] = value
        elif isinstance(value, dict):
            configs.setdefault(component, {}).update(value)
    return configs


def _pattern_value(patterns: Mapping[str, float], path: str) -> float | None:
    """PEFT's rule: a pattern names the module path or a dotted suffix of it (regex allowed)."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", path):
            return value
    return None


def _apply_peft_alphas(network: LoadedNetwork) -> None:
    """Store each PEFT module's alpha as the `alpha` tensor, so every format scales one way."""
    configs = peft_configs(network.metadata)
    for module in network.modules:
        config = configs.get(module.component or "")
        if config is None or "alpha" in module.tensors or "down" not in module.tensors:
            continue
        rank = module.tensors["down"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module.path)
        alpha = float(config.get("lora_alpha", rank) if alpha is None else alpha)
        if config.get("use_rslora"):  # rsLoRA scales by alpha / sqrt(rank)
            alpha *= math.sqrt(rank)
        module.tensors["alpha"] = torch.tensor(alpha)
