"""ControlNet files: the original layout (with or without `control_model.`) and diffusers' `ControlNetModel`.

Every layout is renamed into the original one, then the config is read off the tensor shapes
(widths, levels, transformer depths, the vector conditioning), so that "small" and "mid" variants with
shallower transformers load as what they are. Head counts are the one fact shapes cannot tell: they
come from the family's preset (SD1: 8 heads; SD2 and SDXL: 64-channel heads), or from a diffusers
config file. Anything else is refused with the facts that were seen.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from openldm.checkpoints.diffusers_layout import _SAME, Table, _convert, _unet_table, invert
from openldm.checkpoints.errors import CheckpointError
from openldm.checkpoints.io import read_state_dict
from openldm.config import CONTROLNET_PRESETS, ControlNetConfig, UNetConfig
from openldm.models.controlnet import ControlNet

PREFIX = "control_model."
Shapes = Mapping[str, tuple[int, ...]]


# --- the diffusers table ---------------------------------------------------------------------


def _hint_rows(stages: int) -> Table:
    """input_hint_block.{0, 2, ..., 4 stages - 2}; diffusers: conv_in, blocks.0 to 2 stages - 3, conv_out."""
    inner = [f"controlnet_cond_embedding.blocks.{i}" for i in range(2 * stages - 2)]
    theirs = ["controlnet_cond_embedding.conv_in", *inner, "controlnet_cond_embedding.conv_out"]
    return {f"input_hint_block.{2 * i}": (name, _SAME) for i, name in enumerate(theirs)}


def controlnet_table(cfg: UNetConfig, stages: int) -> Table:
    """Ours -> diffusers: the UNet's encoder rows, the hint encoder, and the zero convs."""
    rows = {k: v for k, v in _unet_table(cfg).items() if not k.startswith(("output_blocks.", "out."))}
    blocks = len(cfg.channel_mult) * (cfg.num_res_blocks + 1)
    rows |= {f"zero_convs.{i}.0": (f"controlnet_down_blocks.{i}", _SAME) for i in range(blocks)}
    rows["middle_block_out.0"] = ("controlnet_mid_block", _SAME)
    return rows | _hint_rows(stages)


def _diffusers_structure(keys: list[str]) -> UNetConfig:
    """Just enough of the config to number the blocks: levels, resnets per level, attention per level."""
    levels = 1 + max(int(m[1]) for k in keys if (m := re.match(r"down_blocks\.(\d+)\.", k)))
    resnets = 1 + max(int(m[1]) for k in keys if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)))
    depth = tuple(int(any(k.startswith(f"down_blocks.{i}.attentions.") for k in keys)) for i in range(levels))
    adm = 1 if "add_embedding.linear_1.weight" in keys else None  # its width does not change the names
    return UNetConfig(
        channel_mult=(1,) * levels, num_res_blocks=resnets, transformer_depth=depth, adm_in_channels=adm
    )


def from_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers `ControlNetModel` state dict in the original names."""
    state = {k: v for k, v in state.items() if not k.startswith("add_time_proj")}  # weightless
    blocks = [k for k in state if re.fullmatch(r"controlnet_cond_embedding\.blocks\.\d+\.weight", k)]
    stages = 1 + len(blocks) // 2
    table = controlnet_table(_diffusers_structure(list(state)), stages)
    return _convert(state, invert(table), to_linear=False)


def to_diffusers(state: Mapping[str, torch.Tensor], cfg: ControlNetConfig) -> dict[str, torch.Tensor]:
    """The original names -> a diffusers `ControlNetModel` state dict (tests compare against diffusers)."""
    return _convert(state, controlnet_table(cfg.unet, len(cfg.hint_widths)), to_linear=True)


# --- the config from shapes ------------------------------------------------------------------


def _depth(shapes: Shapes, block: str) -> int:
    found = [
        int(m[1]) for k in shapes if (m := re.match(re.escape(block) + r"\.transformer_blocks\.(\d+)\.", k))
    ]
    return 1 + max(found) if found else 0


def _levels(shapes: Shapes, model_channels: int) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
    """(channel_mult, num_res_blocks, transformer_depth) from the input blocks in order."""
    mult, depth, per_level, res_blocks = [], [], 0, set()
    n = 1
    while f"input_blocks.{n}.0.op.weight" in shapes or f"input_blocks.{n}.0.in_layers.2.weight" in shapes:
        if f"input_blocks.{n}.0.op.weight" in shapes:
            res_blocks.add(per_level)
            per_level = 0
        else:
            width = shapes[f"input_blocks.{n}.0.in_layers.2.weight"][0]
            if per_level == 0:
                mult.append(width // model_channels)
                depth.append(_depth(shapes, f"input_blocks.{n}.1"))
            per_level += 1
        n += 1
    res_blocks.add(per_level)
    if len(res_blocks) != 1 or not mult:
        raise CheckpointError(
            f"input blocks of uneven depth per level ({sorted(res_blocks)}): not a ControlNet"
        )
    return tuple(mult), res_blocks.pop(), tuple(depth)


def infer_config(shapes: Shapes, base: ControlNetConfig | None = None) -> ControlNetConfig:
    """The ControlNet these original-layout shapes describe; `base` (or the family preset) gives the heads."""
    for key in ("input_blocks.0.0.weight", "input_hint_block.0.weight", "middle_block_out.0.weight"):
        if key not in shapes:
            raise CheckpointError(f"no {key}: not a ControlNet in the original layout")
    model_channels, in_channels = shapes["input_blocks.0.0.weight"][:2]
    context = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    proj = next((s for k, s in shapes.items() if k.endswith("proj_in.weight")), (0, 0))
    adm = shapes["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in shapes else None
    facts = {"context_dim": context, "use_linear_in_transformer": len(proj) == 2, "sdxl": adm is not None}
    family = base or _family_preset(facts)
    mult, res_blocks, depth = _levels(shapes, model_channels)
    unet = replace(
        family.unet,
        in_channels=in_channels,
        model_channels=model_channels,
        channel_mult=mult,
        num_res_blocks=res_blocks,
        transformer_depth=depth,
        transformer_depth_middle=_depth(shapes, "middle_block.1"),
        context_dim=context or family.unet.context_dim,
        adm_in_channels=adm,
        use_linear_in_transformer=facts["use_linear_in_transformer"],
    )
    widths = []  # each stage's first conv sits at 4 * stage (conv, SiLU, conv, SiLU)
    while f"input_hint_block.{4 * len(widths)}.weight" in shapes:
        widths.append(shapes[f"input_hint_block.{4 * len(widths)}.weight"][0])
    return ControlNetConfig(family.family, unet, shapes["input_hint_block.0.weight"][1], tuple(widths))


def _family_preset(facts: dict) -> ControlNetConfig:
    matches = [
        p
        for p in CONTROLNET_PRESETS.values()
        if facts
        == {
            "context_dim": p.unet.context_dim,
            "use_linear_in_transformer": p.unet.use_linear_in_transformer,
            "sdxl": p.unet.adm_in_channels is not None,
        }
    ]
    if not matches:
        seen = ", ".join(f"{k}={v}" for k, v in facts.items())
        raise CheckpointError(
            f"no ControlNet family has {seen} (SD1: 768 conv, SD2: 1024 linear, SDXL: 2048 linear)"
        )
    return matches[0]


# --- reading ---------------------------------------------------------------------------------


def read_controlnet(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """A ControlNet file or diffusers folder -> (state dict in the original names, layout name)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("diffusion_pytorch_model*.safetensors")) or sorted(
            path.glob("*.safetensors")
        )
        if not files:
            raise CheckpointError(f"{path}: a folder without diffusion_pytorch_model.safetensors")
        state = {k: v for f in files for k, v in read_state_dict(f)[0].items()}
    else:
        state = read_state_dict(path)[0]
    if any(k.startswith(PREFIX) for k in state):
        return {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}, "original"
    if "input_hint_block.0.weight" in state:
        return dict(state), "original (no prefix)"
    if "controlnet_cond_embedding.conv_in.weight" in state:
        return from_diffusers(state), "diffusers"
    shown = ", ".join(sorted(state)[:3]) or "no tensors"
    raise CheckpointError(
        f"{path} is not a ControlNet: no input_hint_block or controlnet_cond_embedding "
        f"keys (saw {shown}, ...)"
    )


def _folder_heads(path: Path, cfg: ControlNetConfig) -> ControlNetConfig:
    """A diffusers folder's config names the head width (`attention_head_dim` is a head count in SD1)."""
    config_file = path / "config.json" if path.is_dir() else None
    if config_file is None or not config_file.exists():
        return cfg
    heads = json.loads(config_file.read_text()).get("attention_head_dim")
    if cfg.unet.num_head_channels is None and isinstance(heads, int):
        return replace(cfg, unet=replace(cfg.unet, num_heads=heads))
    return cfg


def load_controlnet(
    path: str | Path,
    base: ControlNetConfig | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> ControlNet:
    """Build the ControlNet a file describes and load it strictly; `base` checks it fits the base model."""
    state, layout = read_controlnet(path)
    cfg = _folder_heads(Path(path), infer_config({k: tuple(v.shape) for k, v in state.items()}, base))
    if base is not None and (cfg.family, cfg.unet.context_dim) != (base.family, base.unet.context_dim):
        raise CheckpointError(
            f"{path}: a {cfg.family} ControlNet (context {cfg.unet.context_dim}) cannot steer a "
            f"{base.family} model (context {base.unet.context_dim})"
        )
    with torch.device("meta"):
        model = ControlNet(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        shown = ", ".join((sorted(missing) + sorted(unexpected))[:4])
        raise CheckpointError(
            f"{path} ({layout}): {len(missing)} missing and {len(unexpected)} unexpected keys "
            f"for the {cfg.family} ControlNet its shapes describe, e.g. {shown}"
        )
    return model.to(device=device, dtype=dtype).eval()
