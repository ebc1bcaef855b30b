"""OpenCLIP's text-tower key layout <-> ours (Hugging Face CLIP names), as pure dict -> dict functions.

SD2 stores the tower under `cond_stage_model.model.`, SDXL under `conditioner.embedders.1.model.`;
these functions see the keys with that prefix stripped. Three layout differences:
- q, k and v are one stacked `attn.in_proj_weight` (3 * width, width) and `in_proj_bias`;
- `positional_embedding` and `text_projection` are bare parameters, not modules' `.weight`s;
- `text_projection` is applied as `x @ P`, shape (width, proj): the transpose of a Linear weight.

Keys OpenCLIP has and we do not use (`OPENCLIP_EXTRAS`): `logit_scale` (the contrastive loss
temperature), `attn_mask` (the causal mask, a buffer some versions saved) and `visual.*` (the image
tower). `openclip_to_hf` drops them; `split_extras` hands them back for a caller that wants to keep
them. SD2 files also carry a `text_projection` its UNet never sees: given a config without
`projection_dim`, it is dropped too. Any other key is an error that lists it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from openldm.checkpoints.io import CheckpointError
from openldm.config import CLIPTextConfig

Tensors = dict[str, torch.Tensor]
OPENCLIP_EXTRAS = ("logit_scale", "attn_mask")
OPENCLIP_EXTRA_PREFIXES = ("visual.",)
PROJECTION = "text_projection"

# OpenCLIP name -> our name, for everything that is a plain rename.
_GLOBAL = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_BLOCK = {  # inside `transformer.resblocks.N.` / `text_model.encoder.layers.N.`
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_QKV = ("q_proj", "k_proj", "v_proj")
_OPENCLIP_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)")
_OPENCLIP_QKV = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")
_OUR_BLOCK = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def split_extras(state_dict: Mapping[str, torch.Tensor]) -> tuple[Tensors, Tensors]:
    """OpenCLIP state dict -> (text tower, the extras we do not use)."""
    tower, extras = {}, {}
    for key, value in state_dict.items():
        is_extra = key in OPENCLIP_EXTRAS or key.startswith(OPENCLIP_EXTRA_PREFIXES)
        (extras if is_extra else tower)[key] = value
    return tower, extras


def _unknown(keys: list[str], layout: str) -> CheckpointError:
    return CheckpointError(f"{len(keys)} keys are not part of a CLIP text tower in {layout} layout: "
                           f"{', '.join(sorted(keys))}")


def _keep_projection(cfg: CLIPTextConfig | None) -> bool:
    return cfg is None or cfg.projection_dim is not None


def openclip_to_hf(state_dict: Mapping[str, torch.Tensor], cfg: CLIPTextConfig | None = None) -> Tensors:
    """OpenCLIP text tower -> our names; extras dropped, and `text_projection` if `cfg` has none."""
    tower, _ = split_extras(state_dict)
    out: Tensors = {}
    unknown = []
    for key, value in tower.items():
        block, qkv = _OPENCLIP_BLOCK.fullmatch(key), _OPENCLIP_QKV.fullmatch(key)
        if key in _GLOBAL:
            out[_GLOBAL[key]] = value
        elif key == PROJECTION:
            if _keep_projection(cfg):
                out[f"{PROJECTION}.weight"] = value.t().contiguous()
        elif qkv:
            prefix = f"text_model.encoder.layers.{qkv[1]}.self_attn"
            for name, part in zip(_QKV, value.chunk(3)):
                out[f"{prefix}.{name}.{qkv[2]}"] = part.clone()
        elif block and block[2] in _BLOCK:
            out[f"text_model.encoder.layers.{block[1]}.{_BLOCK[block[2]]}.{block[3]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise _unknown(unknown, "OpenCLIP")
    return out


def hf_to_openclip(state_dict: Mapping[str, torch.Tensor], cfg: CLIPTextConfig | None = None) -> Tensors:
    """Our names -> the OpenCLIP text tower (exact inverse of `openclip_to_hf` on its output)."""
    renames = {ours: theirs for theirs, ours in _GLOBAL.items()}
    blocks = {ours: theirs for theirs, ours in _BLOCK.items()}
    out: Tensors = {}
    unknown = []
    for key, value in state_dict.items():
        block = _OUR_BLOCK.fullmatch(key)
        if key in renames:
            out[renames[key]] = value
        elif key == f"{PROJECTION}.weight":
            if _keep_projection(cfg):
                out[PROJECTION] = value.t().contiguous()
        elif block and block[2] == "self_attn.q_proj":
            prefix = f"text_model.encoder.layers.{block[1]}.self_attn"
            parts = [state_dict[f"{prefix}.{name}.{block[3]}"] for name in _QKV]
            out[f"transformer.resblocks.{block[1]}.attn.in_proj_{block[3]}"] = torch.cat(parts)
        elif block and block[2] in ("self_attn.k_proj", "self_attn.v_proj"):
            continue  # stacked together with q_proj
        elif block and block[2] in blocks:
            out[f"transformer.resblocks.{block[1]}.{blocks[block[2]]}.{block[3]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise _unknown(unknown, "Hugging Face CLIP")
    return out
