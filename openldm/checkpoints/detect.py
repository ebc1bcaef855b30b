"""Which preset a single-file checkpoint holds, read from its keys and tensor shapes alone.

We read a few architecture facts off the tensors (widths, depths, per-level channel multipliers,
context width, conv or linear `proj_in`) and compare them with the same facts computed from every
preset in `config.PRESETS`. Only what the shapes can show is compared: head counts, activations and
which hidden layer SD uses are fixed per family, and the family comes from the key prefixes.
Files that are not a whole model (LoRA, VAE-only, text-encoder-only, diffusers-named UNet) are
recognised and refused with a message that says what they are.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import replace

from openldm.checkpoints.io import CheckpointError
from openldm.checkpoints.layout import TEXT_ENCODER_NAMES, TEXT_ENCODER_PREFIXES, UNET_PREFIX, VAE_PREFIX
from openldm.config import PRESETS, CLIPTextConfig, ModelConfig, Prediction, UNetConfig, VAEConfig

Shapes = Mapping[str, tuple[int, ...]]
Facts = dict[str, object]

_LORA = re.compile(r"(^|[._])(lora|lokr|hada|oft)[._]", re.IGNORECASE)
_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_TEXT_ONLY = (
    "text_model.", "transformer.resblocks.", "token_embedding.", "cond_stage_model.", "conditioner."
)
_DIFFUSERS_UNET = ("down_blocks.", "mid_block.", "time_embedding.", "unet.down_blocks.")


def detect(shapes: Shapes, *, prediction: Prediction | None = None) -> ModelConfig:
    """The one preset these shapes are; `prediction` picks between presets the keys cannot tell apart."""
    _reject_partial(shapes)
    seen = checkpoint_facts(shapes)
    matches = [p for p in PRESETS.values() if _agrees(seen, preset_facts(p))]
    groups = {(p.family, p.unet, p.vae, p.text_encoders) for p in matches}
    if len(groups) != 1:
        found = ", ".join(p.name for p in matches) or "no preset"
        raise CheckpointError(f"{found} matches this checkpoint; it shows {_describe(seen)}")
    wanted = prediction or "eps"
    same = [p for p in matches if p.prediction == wanted]
    return same[0] if same else replace(matches[0], prediction=wanted)


# --- facts ---------------------------------------------------------------------------------

def preset_facts(config: ModelConfig) -> Facts:
    """The facts `checkpoint_facts` can read, computed from a preset instead of from tensors."""
    facts: Facts = {"family": config.family}
    facts |= _prefixed("unet", _unet_config_facts(config.unet))
    facts |= _prefixed("vae", _vae_config_facts(config.vae))
    for name, encoder in zip(TEXT_ENCODER_NAMES, config.text_encoders):
        facts |= _prefixed(name, _text_config_facts(encoder))
    return facts


def checkpoint_facts(shapes: Shapes) -> Facts:
    """Facts read off a single-file checkpoint's shapes; components it lacks are left out."""
    facts: Facts = {}
    family = _family(shapes)
    if family is not None:
        facts["family"] = family
        for name, prefix in zip(TEXT_ENCODER_NAMES, TEXT_ENCODER_PREFIXES[family]):
            facts |= _prefixed(name, _text_facts(_strip(shapes, prefix)))
    facts |= _prefixed("unet", _unet_facts(_strip(shapes, UNET_PREFIX)))
    vae = _strip(shapes, VAE_PREFIX)
    if vae:
        facts |= _prefixed("vae", _vae_facts(vae))
    return facts


def _agrees(seen: Facts, preset: Facts) -> bool:
    return all(preset.get(key) == value for key, value in seen.items())


def _describe(facts: Facts) -> str:
    return ", ".join(f"{key}={value}" for key, value in facts.items())


def _prefixed(name: str, facts: Facts) -> Facts:
    return {f"{name}.{key}": value for key, value in facts.items()}


def _strip(shapes: Shapes, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}


def _family(shapes: Shapes) -> str | None:
    """The family whose text-encoder prefixes are all present (None for a file without them)."""
    present = [
        family for family, prefixes in TEXT_ENCODER_PREFIXES.items()
        if all(any(k.startswith(p) for k in shapes) for p in prefixes)
    ]
    return present[0] if len(present) == 1 else None


# --- UNet ----------------------------------------------------------------------------------

_UNET_FIELDS = (
    "in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
    "transformer_depth", "transformer_depth_middle", "context_dim", "use_linear_in_transformer",
    "adm_in_channels",
)


def _unet_config_facts(cfg: UNetConfig) -> Facts:
    return {name: getattr(cfg, name) for name in _UNET_FIELDS}


def _blocks(shapes: Shapes, name: str) -> dict[int, dict[str, tuple[int, ...]]]:
    """`name.N.rest` keys grouped by N, in order."""
    pattern = re.compile(rf"{name}\.(\d+)\.(.+)")
    blocks: dict[int, dict[str, tuple[int, ...]]] = defaultdict(dict)
    for key, shape in shapes.items():
        m = pattern.fullmatch(key)
        if m:
            blocks[int(m[1])][m[2]] = shape
    return dict(sorted(blocks.items()))


def _depth(block: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    """How many transformer blocks sit under `prefix.transformer_blocks.K`."""
    return len(_blocks({k: v for k, v in block.items() if k.startswith(prefix)},
                       rf"{re.escape(prefix)}transformer_blocks"))


def _unet_levels(shapes: Shapes, model_channels: int) -> Facts:
    """Walk `input_blocks`: resnets (`.0.in_layers`) add to the level, downsamplers (`.0.op`) end it."""
    widths: list[int] = []
    counts: list[int] = []
    depths: list[int] = []
    new_level = True
    for _, block in _blocks(shapes, "input_blocks").items():
        if "0.op.weight" in block:
            new_level = True
        elif "0.in_layers.2.weight" in block:
            if new_level:
                widths.append(block["0.in_layers.2.weight"][0])
                counts.append(0)
                depths.append(0)
                new_level = False
            counts[-1] += 1
            depths[-1] = max(depths[-1], _depth(block, "1."))
    return {
        "channel_mult": tuple(w // model_channels for w in widths),
        "num_res_blocks": counts[0] if len(set(counts)) == 1 else tuple(counts),
        "transformer_depth": tuple(depths),
    }


def _unet_facts(shapes: Shapes) -> Facts:
    try:
        conv_in, conv_out = shapes["input_blocks.0.0.weight"], shapes["out.2.weight"]
    except KeyError as e:
        raise CheckpointError(f"the UNet under {UNET_PREFIX!r} lacks {e.args[0]!r}") from None
    facts: Facts = {"in_channels": conv_in[1], "out_channels": conv_out[0], "model_channels": conv_in[0]}
    facts |= _unet_levels(shapes, conv_in[0])
    facts["transformer_depth_middle"] = _depth(shapes, "middle_block.1.")
    proj_in = [v for k, v in shapes.items() if k.endswith(".proj_in.weight")]
    context = [v[1] for k, v in shapes.items() if k.endswith(".attn2.to_k.weight")]
    facts["context_dim"] = context[0] if context else None
    facts["use_linear_in_transformer"] = bool(proj_in) and len(proj_in[0]) == 2
    label = shapes.get("label_emb.0.0.weight")
    facts["adm_in_channels"] = label[1] if label else None
    return facts


# --- VAE and text encoders -----------------------------------------------------------------

def _vae_config_facts(cfg: VAEConfig) -> Facts:
    return {name: getattr(cfg, name) for name in (
        "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks", "z_channels", "embed_dim")}


def _vae_facts(shapes: Shapes) -> Facts:
    try:
        ch = shapes["encoder.conv_in.weight"][0]
        levels = _blocks(shapes, "encoder.down")
        return {
            "in_channels": shapes["encoder.conv_in.weight"][1],
            "out_ch": shapes["decoder.conv_out.weight"][0],
            "ch": ch,
            "ch_mult": tuple(level["block.0.conv2.weight"][0] // ch for level in levels.values()),
            "num_res_blocks": len(_blocks(levels[0], "block")),
            "z_channels": shapes["encoder.conv_out.weight"][0] // 2,  # mean and log-variance
            "embed_dim": shapes["quant_conv.weight"][0] // 2,
        }
    except KeyError as e:
        raise CheckpointError(f"the VAE under {VAE_PREFIX!r} lacks {e.args[0]!r}") from None


def _text_config_facts(cfg: CLIPTextConfig) -> Facts:
    return {name: getattr(cfg, name) for name in (
        "vocab_size", "hidden_size", "intermediate_size", "num_layers", "max_length")}


# Where each fact lives in the two layouts: Hugging Face CLIP and OpenCLIP.
_TEXT_KEYS = {
    "hf": ("text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
           "text_model.encoder.layers", "text_model.encoder.layers.0.mlp.fc1.weight"),
    "openclip": ("token_embedding.weight", "positional_embedding", "transformer.resblocks",
                 "transformer.resblocks.0.mlp.c_fc.weight"),
}


def _text_facts(shapes: Shapes) -> Facts:
    layout = "hf" if "text_model.embeddings.token_embedding.weight" in shapes else "openclip"
    tokens, positions, layers, fc1 = _TEXT_KEYS[layout]
    try:
        return {
            "vocab_size": shapes[tokens][0], "hidden_size": shapes[tokens][1],
            "intermediate_size": shapes[fc1][0], "num_layers": len(_blocks(shapes, re.escape(layers))),
            "max_length": shapes[positions][0],
        }
    except KeyError as e:
        raise CheckpointError(f"a text encoder lacks {e.args[0]!r}") from None


# --- files that are not a whole model ------------------------------------------------------

def _all_start(keys: Iterable[str], prefixes: tuple[str, ...]) -> bool:
    return all(k.startswith(prefixes) for k in keys)


def _reject_partial(shapes: Shapes) -> None:
    """Refuse, by name, the files people mistake for a model checkpoint."""
    keys = list(shapes)
    if not keys:
        raise CheckpointError("the checkpoint is empty: it holds no tensors")
    lora = [k for k in keys if _LORA.search(k)]
    if lora:
        raise CheckpointError(f"this is a LoRA/LyCORIS network (keys like {lora[0]!r}), not a model: "
                              "load a base model and apply the LoRA to it")
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return
    bare = [k[len(VAE_PREFIX):] if k.startswith(VAE_PREFIX) else k for k in keys]
    if _all_start(bare, (*_VAE_PARTS, "loss.")):
        raise CheckpointError("this file holds only a VAE (encoder./decoder. keys), not a whole model: "
                              "give it as the VAE of a model instead")
    if any(k.startswith(_DIFFUSERS_UNET) for k in keys):
        raise CheckpointError("this is a UNet in diffusers naming (down_blocks./mid_block. keys): "
                              "give the whole diffusers folder (with model_index.json) instead")
    if _all_start(keys, _TEXT_ONLY):
        raise CheckpointError("this file holds only a text encoder, not a whole model")
    if "input_blocks.0.0.weight" in shapes:
        raise CheckpointError(f"this is a bare UNet without the {UNET_PREFIX!r} prefix, not a whole model")
    raise CheckpointError(f"no UNet: no keys start with {UNET_PREFIX!r} (first keys: {', '.join(keys[:3])})")
