"""Which model a single-file checkpoint holds, read from its keys and tensor shapes.

We read a few architecture facts off the tensors (widths, depths, per-level channel multipliers,
context width, conv or linear `proj_in`) and compare them with the same facts computed from every
preset in `config.PRESETS`. Only what the shapes can show is compared: head counts, activations and
which hidden layer SD uses are fixed per family, and the family comes from the key prefixes.
Shapes no preset has give a config inferred from them (`checkpoints.infer` supplies the rest).
Files that are not a whole model (LoRA, VAE-only, text-encoder-only, diffusers-named UNet) are
recognised and refused with a message that says what they are.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import replace

from openldm.checkpoints.infer import (
    FAMILY_BASE,
    FAMILY_TITLE,
    HEAD_WIDTH,
    META_CONFIG,
    Inferred,
    config_from_metadata,
    named,
    norm_groups,
    text_encoder,
    unet_heads,
)
from openldm.checkpoints.io import CheckpointError
from openldm.checkpoints.layout import TEXT_ENCODER_NAMES, TEXT_ENCODER_PREFIXES, UNET_PREFIX, VAE_PREFIX
from openldm.config import (
    PRESETS,
    CLIPTextConfig,
    ModelConfig,
    Prediction,
    UNetConfig,
    VAEConfig,
    unet_from_blocks,
)

Shapes = Mapping[str, tuple[int, ...]]
Facts = dict[str, object]
Metadata = Mapping[str, str] | None
Hints = Mapping[str, object] | None  # facts given by the caller (a sidecar yaml's head counts)

_LORA = re.compile(r"(^|[._])(lora|lokr|hada|oft)[._]", re.IGNORECASE)
_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_TEXT_ONLY = (
    "text_model.", "transformer.resblocks.", "token_embedding.", "cond_stage_model.", "conditioner."
)
_DIFFUSERS_UNET = ("down_blocks.", "mid_block.", "time_embedding.", "unet.down_blocks.")


def detect(shapes: Shapes, *, prediction: Prediction | None = None, metadata: Metadata = None,
           hints: Hints = None) -> ModelConfig:
    """The config these shapes are: a preset, the file's recorded config, or one inferred (see `infer`)."""
    return infer_shapes(shapes, prediction=prediction, metadata=metadata, hints=hints).config


def infer_shapes(shapes: Shapes, *, prediction: Prediction | None = None, metadata: Metadata = None,
                 hints: Hints = None) -> Inferred:
    """`detect`, with where each fact the shapes cannot show came from."""
    _reject_partial(shapes)
    seen = checkpoint_facts(shapes)
    family = seen.get("family")  # unset: the family's own (eps, but v for the x4 upscaler)
    wanted = prediction or (FAMILY_BASE[str(family)].prediction if family else "eps")
    stored = config_from_metadata(metadata or {})
    if stored is not None:
        wrong = {k: v for k, v in seen.items() if preset_facts(stored).get(k) != v}
        if wrong:
            raise CheckpointError(f"the file's {META_CONFIG} metadata disagrees with its tensors: "
                                  f"{_describe(wrong)}")
        return Inferred(replace(stored, prediction=wanted), {"everything": f"metadata {META_CONFIG}"})
    matches = [p for p in PRESETS.values() if _agrees(seen, preset_facts(p))]
    groups = {(p.family, p.unet, p.vae, p.text_encoders) for p in matches}
    if len(groups) > 1:
        found = ", ".join(p.name for p in matches)
        raise CheckpointError(f"{found} match this checkpoint; it shows {_describe(seen)}")
    if not matches:
        return _custom(seen, wanted, hints or {})
    same = [p for p in matches if p.prediction == wanted]
    config = same[0] if same else replace(matches[0], prediction=wanted)
    return Inferred(config, {"everything": f"preset {config.name}, matched by shapes"})


def _custom(seen: Facts, prediction: Prediction, hints: Mapping[str, object]) -> Inferred:
    """A config for shapes no preset has: structure from the shapes, the rest as `infer` explains."""
    family = seen.get("family")
    if family is None:
        raise CheckpointError(f"no preset matches this checkpoint, and without text-encoder keys its family "
                              f"is unknown; it shows {_describe(seen)}")
    base = FAMILY_BASE[str(family)]
    part = {name: {k.split(".", 1)[1]: v for k, v in seen.items() if k.startswith(f"{name}.")}
            for name in ("unet", "vae", *TEXT_ENCODER_NAMES)}
    unet = part["unet"] | {"context_dim": part["unet"]["context_dim"] or base.unet.context_dim}
    widths = _attention_widths(UNetConfig(**unet))
    heads, heads_from = unet_heads(widths, str(family), hints)
    unet_widths = [unet["model_channels"] * m for m in unet["channel_mult"]]
    vae = VAEConfig(**part["vae"]) if part["vae"] else base.vae
    vae = replace(vae, norm_groups=norm_groups([vae.ch * m for m in vae.ch_mult], "VAE"))
    encoders = tuple(text_encoder(str(family), i, part[name])
                     for i, name in enumerate(TEXT_ENCODER_NAMES[: len(base.text_encoders)]))
    config = replace(
        base, unet=UNetConfig(**unet, **heads, norm_groups=norm_groups(unet_widths, "UNet")), vae=vae,
        text_encoders=encoders, prediction=prediction,
    )
    sources = {"structure": "tensor shapes", "unet heads": heads_from, "norm groups": "SD convention (32)",
               "text encoder heads": f"CLIP convention ({HEAD_WIDTH}-channel heads)",
               "latent scale, image size": f"{FAMILY_TITLE[str(family)]} family convention"}
    return Inferred(named(config), sources)


def _attention_widths(cfg: UNetConfig) -> list[int]:
    down = [m for m, depths in zip(cfg.channel_mult, cfg.input_depths()) if any(depths)]
    up = [cfg.channel_mult[-1 - i] for i, depths in enumerate(cfg.output_depths()) if any(depths)]
    widths = [cfg.model_channels * m for m in down + up]
    return sorted(set(widths))


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
    """The family whose text-encoder prefixes are all present (None for a file without them).

    The x4 upscaler stores its encoder where SD2 does; its noise-level embedding tells them apart."""
    upscaler = UNET_PREFIX + "label_emb.weight" in shapes
    present = [
        family for family, prefixes in TEXT_ENCODER_PREFIXES.items()
        if all(any(k.startswith(p) for k in shapes) for p in prefixes) and (family == "x4") == upscaler
    ]
    return present[0] if len(present) == 1 else None


# --- UNet ----------------------------------------------------------------------------------

_UNET_FIELDS = (
    "in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
    "transformer_depth", "transformer_depth_middle", "transformer_depth_input", "transformer_depth_output",
    "context_dim", "use_linear_in_transformer", "adm_in_channels", "num_classes", "disable_self_attentions",
)


def _unet_config_facts(cfg: UNetConfig) -> Facts:
    facts = {name: getattr(cfg, name) for name in _UNET_FIELDS}
    if cfg.disable_self_attentions:  # only levels with attention can show it
        flags = tuple(d and depth > 0 for d, depth in zip(cfg.disable_self_attentions, cfg.transformer_depth))
        facts["disable_self_attentions"] = flags if any(flags) else None
    return facts


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


def _walk(shapes: Shapes, name: str, ends_level) -> list[tuple[int, list[int]]]:
    """(width, per-block transformer depths) per level; `ends_level(block)` marks a level's last block."""
    levels: list[tuple[int, list[int]]] = []
    new_level = True
    for _, block in _blocks(shapes, name).items():
        if "0.in_layers.2.weight" in block:
            if new_level:
                levels.append((block["0.in_layers.2.weight"][0], []))
                new_level = False
            levels[-1][1].append(_depth(block, "1."))
        new_level = new_level or ends_level(block)
    return levels


def _unet_levels(shapes: Shapes, model_channels: int) -> Facts:
    """Down path: downsamplers (`.0.op`) end a level; up path: upsamplers (`.1.conv`/`.2.conv`) do."""
    down = _walk(shapes, "input_blocks", lambda block: "0.op.weight" in block)
    up = _walk(shapes, "output_blocks", lambda block: "1.conv.weight" in block or "2.conv.weight" in block)
    if not down or len(up) != len(down):
        raise CheckpointError(f"the UNet under {UNET_PREFIX!r} has {len(down)} levels going down and "
                              f"{len(up)} going up")
    config = unet_from_blocks(
        tuple(len(depths) for _, depths in down), tuple(tuple(d) for _, d in down),
        tuple(tuple(d) for _, d in up),
        channel_mult=tuple(width // model_channels for width, _ in down),
    )
    return {name: getattr(config, name) for name in (
        "channel_mult", "num_res_blocks", "transformer_depth", "transformer_depth_input",
        "transformer_depth_output")}


def _unet_facts(shapes: Shapes) -> Facts:
    try:
        conv_in, conv_out = shapes["input_blocks.0.0.weight"], shapes["out.2.weight"]
    except KeyError as e:
        raise CheckpointError(f"the UNet under {UNET_PREFIX!r} lacks {e.args[0]!r}") from None
    facts: Facts = {"in_channels": conv_in[1], "out_channels": conv_out[0], "model_channels": conv_in[0]}
    facts |= _unet_levels(shapes, conv_in[0])
    middle = any(k.startswith("middle_block.") for k in shapes)
    facts["transformer_depth_middle"] = _depth(shapes, "middle_block.1.") if middle else None
    proj_in = [v for k, v in shapes.items() if k.endswith(".proj_in.weight")]
    context = [v[1] for k, v in shapes.items() if k.endswith(".attn2.to_k.weight")]
    facts["context_dim"] = context[0] if context else None
    facts["use_linear_in_transformer"] = bool(proj_in) and len(proj_in[0]) == 2
    label = shapes.get("label_emb.0.0.weight")
    facts["adm_in_channels"] = label[1] if label else None
    classes = shapes.get("label_emb.weight")  # the x4 upscaler's noise-level embedding
    facts["num_classes"] = classes[0] if classes else None
    facts["disable_self_attentions"] = _cross_only_levels(shapes)
    return facts


def _cross_only_levels(shapes: Shapes) -> tuple[bool, ...] | None:
    """Per down-path level, whether its `attn1` attends to the text (keys context_dim wide, not its own)."""
    levels, new_level = [], True
    for _, block in _blocks(shapes, "input_blocks").items():
        if "0.in_layers.2.weight" in block:
            if new_level:
                levels.append(False)
                new_level = False
            to_k = block.get("1.transformer_blocks.0.attn1.to_k.weight")
            levels[-1] = levels[-1] or (to_k is not None and to_k[0] != to_k[1])
        new_level = new_level or "0.op.weight" in block
    return tuple(levels) if any(levels) else None


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
                              "give it with --vae beside a --model instead")
    if any(k.startswith(_DIFFUSERS_UNET) for k in keys):
        raise CheckpointError("this is a UNet in diffusers naming (down_blocks./mid_block. keys): "
                              "give the whole diffusers folder (with model_index.json) instead")
    if _all_start(keys, _TEXT_ONLY):
        raise CheckpointError("this file holds only a text encoder, not a whole model")
    if "input_blocks.0.0.weight" in shapes:
        raise CheckpointError(f"this is a bare UNet without the {UNET_PREFIX!r} prefix, not a whole model")
    raise CheckpointError(f"no UNet: no keys start with {UNET_PREFIX!r} (first keys: {', '.join(keys[:3])})")
