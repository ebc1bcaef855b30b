"""A whole `ModelConfig` from what a file shows, for checkpoints that match no preset.

Shapes (or a diffusers `config.json`) give the structure. What they cannot say comes, first found
wins, from: the file's own `openldm.config` metadata (written by `save` for non-preset models), the
hints a caller read elsewhere (a sidecar yaml's head counts), and last the family's convention, taken
from its full-size preset: SD1 has 8 heads per block, SD2 and SDXL 64-channel heads, every CLIP text
encoder 64-channel heads, every norm 32 groups. Each fact records where it came from, for `openldm info`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace

from openldm.checkpoints.io import CheckpointError
from openldm.config import (
    PRESETS,
    SD2_BASE,
    SD15,
    SD_X4_UPSCALER,
    SDXL_BASE,
    SDXL_REFINER,
    CLIPTextConfig,
    LatentFormat,
    ModelConfig,
    UNetConfig,
    VAEConfig,
    unet_from_blocks,
)

META_CONFIG = "openldm.config"  # the whole ModelConfig as JSON, for models no preset names
FAMILY_BASE = {"sd1": SD15, "sd2": SD2_BASE, "sdxl": SDXL_BASE, "sdxl_refiner": SDXL_REFINER,
               "x4": SD_X4_UPSCALER}
FAMILY_TITLE = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "sdxl_refiner": "SDXL-refiner",
                "x4": "SD x4-upscaler"}
HEAD_WIDTH = 64  # every CLIP text encoder SD uses, and the SD2/SDXL UNets
_TEXT_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "max_length")
HOW_TO_SUPPLY = ("give a sidecar yaml (--config, with num_heads or num_head_channels) or save the model "
                 "with openldm, which records it in the file's metadata")


@dataclass(frozen=True)
class Inferred:
    """A config and, per fact that shapes cannot show, where its value came from."""

    config: ModelConfig
    sources: dict[str, str]

    @property
    def label(self) -> str:
        """The preset's name when the config is one, else what `openldm info` calls a custom model."""
        return preset_name(self.config) or f"custom {FAMILY_TITLE[self.config.family]}-family (inferred)"


def preset_name(config: ModelConfig) -> str | None:
    """The preset this config equals, whatever its name says (one of the same prediction first)."""
    same = [p for p in PRESETS.values()
            if replace(p, prediction=config.prediction) == replace(config, name=p.name)]
    exact = [p for p in same if p.prediction == config.prediction]
    return (exact or same)[0].name if same else None


def named(config: ModelConfig) -> ModelConfig:
    """The config under its preset's name, or `custom-<family>`."""
    return replace(config, name=preset_name(config) or f"custom-{config.family}")


# --- conventions -----------------------------------------------------------------------------

def _divides(width: int, by: int) -> bool:
    return by > 0 and width % by == 0


def unet_heads(widths: list[int], family: str, hints: Mapping[str, object]) -> tuple[dict, str]:
    """(num_heads / num_head_channels fields, their source) for a UNet with attention at `widths`."""
    if "num_heads" in hints or "num_head_channels" in hints:
        fixed = {name: hints.get(name) for name in ("num_heads", "num_head_channels")}
        return fixed, "yaml"
    base = FAMILY_BASE[family].unet
    fixed = base.num_head_channels or base.num_heads
    if all(_divides(w, fixed) for w in widths):
        what = f"{fixed}-channel heads" if base.num_head_channels else f"{fixed} heads"
        return {"num_heads": base.num_heads, "num_head_channels": base.num_head_channels}, \
            f"{FAMILY_TITLE[family]} convention ({what})"
    raise CheckpointError(f"cannot tell the UNet's attention heads: the {FAMILY_TITLE[family]} convention "
                          f"({fixed}) does not divide the widths {widths}; {HOW_TO_SUPPLY}")


def norm_groups(widths: list[int], what: str) -> int:
    """SD's 32 GroupNorm groups, if every width splits into them."""
    if all(_divides(w, 32) for w in widths):
        return 32
    raise CheckpointError(f"cannot tell the {what}'s norm groups: 32 (SD's) does not divide its widths "
                          f"{widths}; {HOW_TO_SUPPLY}")


def text_encoder(family: str, index: int, facts: Mapping[str, object]) -> CLIPTextConfig:
    """The family's encoder at the sizes read from the file; heads are 64 channels wide."""
    base = FAMILY_BASE[family].text_encoders[index]
    hidden = int(facts["hidden_size"])  # type: ignore[call-overload]
    heads = facts.get("num_heads") or (hidden // HEAD_WIDTH if _divides(hidden, HEAD_WIDTH) else None)
    if heads is None:
        raise CheckpointError(f"cannot tell text encoder {index + 1}'s attention heads: its width {hidden} "
                              f"is no multiple of {HEAD_WIDTH}; {HOW_TO_SUPPLY}")
    vocab = int(facts["vocab_size"])  # type: ignore[call-overload]
    pad = base.pad_token if base.pad_token == 0 else vocab - 1  # CLIP-L pads with its end token, the last id
    sizes = {k: facts[k] for k in _TEXT_SIZES}
    projection = hidden if base.projection_dim else None
    return replace(base, **sizes, num_heads=heads, pad_token=pad,
                   projection_dim=facts.get("projection_dim", projection))


# --- the config as file metadata -------------------------------------------------------------

def config_metadata(config: ModelConfig) -> dict[str, str]:
    """`openldm.config` for a model no preset names (presets are recorded by name alone)."""
    return {} if preset_name(config) else {META_CONFIG: json.dumps(asdict(config), separators=(",", ":"))}


def _tuples(cls, data: Mapping) -> dict:
    """JSON lists back to the (nested) tuples a frozen config holds."""
    names = {f.name for f in fields(cls)}
    return {k: _deep_tuple(v) for k, v in data.items() if k in names}


def _deep_tuple(value):
    return tuple(_deep_tuple(v) for v in value) if isinstance(value, list) else value


def config_from_metadata(metadata: Mapping[str, str]) -> ModelConfig | None:
    """The `openldm.config` a file carries, if any."""
    text = metadata.get(META_CONFIG)
    if text is None:
        return None
    try:
        data = json.loads(text)
        return ModelConfig(**{
            **_tuples(ModelConfig, data), "unet": UNetConfig(**_tuples(UNetConfig, data["unet"])),
            "vae": VAEConfig(**_tuples(VAEConfig, data["vae"])),
            "text_encoders": tuple(CLIPTextConfig(**_tuples(CLIPTextConfig, t))
                                   for t in data["text_encoders"]),
            "latent_format": LatentFormat(**_tuples(LatentFormat, data["latent_format"])),
        })
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"the file's {META_CONFIG} metadata is not a model config ({e})") from None


# --- a diffusers folder's config.json files ---------------------------------------------------

# `UNet2DConditionModel` options that change the computation away from SD's, with SD's value.
_UNET_SD_VALUES = {
    "act_fn": "silu", "center_input_sample": False, "class_embed_type": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_scale_factor": 1, "norm_eps": 1e-5,
    "num_class_embeds": None, "only_cross_attention": False, "resnet_time_scale_shift": "default",
    "time_cond_proj_dim": None, "time_embedding_type": "positional", "attention_type": "default",
}


def _per_level(value, levels: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _folder_family(unet: Mapping, configs: Mapping[str, Mapping]) -> str:
    if unet.get("num_class_embeds"):
        return "x4"
    if unet.get("addition_embed_type") == "text_time":
        return "sdxl" if "text_encoder" in configs else "sdxl_refiner"
    return "sd2" if configs["text_encoder"].get("hidden_act") == "gelu" else "sd1"


def _block_depths(types: list[str], layers: list, blocks: list[int]) -> tuple[tuple[int, ...], ...]:
    """Per-level, per-block transformer depth (0 in a level without cross-attention)."""
    return tuple(tuple(_per_level(depth, n)) if "CrossAttn" in kind else (0,) * n
                 for kind, depth, n in zip(types, layers, blocks))


def _unet_heads(c: Mapping, widths: list[int], attends: list[bool], family: str) -> dict:
    heads = _per_level(c.get("num_attention_heads") or c.get("attention_head_dim", 8), len(widths))
    pairs = {(w, h) for w, h, a in zip(widths, heads, attends) if a}
    counts, channels = {h for _, h in pairs}, {w // h for w, h in pairs}
    if len(counts) <= 1 and (family == "sd1" or len(channels) > 1):
        return {"num_heads": counts.pop() if counts else 8, "num_head_channels": None}
    if len(channels) == 1:
        return {"num_heads": None, "num_head_channels": channels.pop()}
    raise CheckpointError(f"unet/config.json: heads {heads} over widths {widths} are neither one count nor "
                          "one width per head, which this UNet needs")


def _cross_only(value, levels: int) -> tuple[bool, ...] | None:
    flags = tuple(bool(v) for v in _per_level(value, levels))
    return flags if any(flags) else None


def unet_from_json(c: Mapping, family: str) -> UNetConfig:
    """`UNet2DConditionModel` config.json -> our UNet, refusing options SD never uses."""
    upscaler = family == "x4"  # its noise-level class embedding and cross-only levels are its own
    odd = {k: c[k] for k, sd in _UNET_SD_VALUES.items() if k in c and c[k] != sd
           and not (upscaler and k in ("num_class_embeds", "only_cross_attention"))}
    if odd:
        raise CheckpointError(f"unet/config.json sets {odd}, which SD-family UNets do not use")
    widths = list(c.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(widths)
    blocks = _per_level(c.get("layers_per_block", 2), levels)
    layers = _per_level(c.get("transformer_layers_per_block", 1), levels)
    down = _block_depths(list(c["down_block_types"]), layers, blocks)
    reverse = c.get("reverse_transformer_layers_per_block") or list(reversed(layers))
    up = _block_depths(list(c["up_block_types"]), list(reverse), [n + 1 for n in reversed(blocks)])
    has_middle = c.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None
    middle = _per_level(layers[-1], 1)[0] if has_middle else None
    attends = [any(d) for d in down]
    text_time = c.get("addition_embed_type") == "text_time"
    return unet_from_blocks(
        tuple(blocks), down, up, in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4),
        model_channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
        transformer_depth_middle=middle, context_dim=c.get("cross_attention_dim", 1280),
        use_linear_in_transformer=bool(c.get("use_linear_projection", False)),
        adm_in_channels=c.get("projection_class_embeddings_input_dim") if text_time else None,
        norm_groups=c.get("norm_num_groups", 32), num_classes=c.get("num_class_embeds"),
        disable_self_attentions=_cross_only(c.get("only_cross_attention", False), levels),
        **_unet_heads(c, widths, [a or i == levels - 1 and middle is not None for i, a in enumerate(attends)],
                      family),
    )


def vae_from_json(c: Mapping) -> VAEConfig:
    widths = list(c.get("block_out_channels", (64,)))
    latent = c.get("latent_channels", 4)
    return VAEConfig(
        in_channels=c.get("in_channels", 3), out_ch=c.get("out_channels", 3), ch=widths[0],
        ch_mult=tuple(w // widths[0] for w in widths), num_res_blocks=c.get("layers_per_block", 1),
        z_channels=latent, embed_dim=latent, norm_groups=c.get("norm_num_groups", 32),
    )


def _text_facts(c: Mapping, family: str, index: int) -> dict:
    base = FAMILY_BASE[family].text_encoders[index]
    dropped = base.layer == "penultimate" and base.final_norm and base.projection_dim is None  # SD2's layout
    projection = c.get("projection_dim") if "WithProjection" in (c.get("architectures") or [""])[0] else None
    return {
        "vocab_size": c.get("vocab_size", 49408), "hidden_size": c.get("hidden_size", 512),
        "intermediate_size": c.get("intermediate_size", 2048),
        "num_layers": c.get("num_hidden_layers", 12) + int(dropped),
        "max_length": c.get("max_position_embeddings", 77),
        "num_heads": c.get("num_attention_heads", 8), "projection_dim": projection,
    }


def folder_config(configs: Mapping[str, Mapping], prediction: str) -> Inferred:
    """The config a diffusers folder's config.json files describe, whatever its sizes."""
    family = _folder_family(configs["unet"], configs)
    base = FAMILY_BASE[family]
    folders = ("text_encoder_2",) if family == "sdxl_refiner" else ("text_encoder", "text_encoder_2")
    encoders = tuple(text_encoder(family, i, _text_facts(configs[f], family, i))
                     for i, f in enumerate(folders[: len(base.text_encoders)]))
    vae = configs["vae"]
    latent = replace(base.latent_format, scale_factor=vae.get("scaling_factor", 0.18215),  # keeps previews
                     shift_factor=vae.get("shift_factor") or 0.0, channels=vae.get("latent_channels", 4))
    config = replace(base, unet=unet_from_json(configs["unet"], family), vae=vae_from_json(vae),
                     text_encoders=encoders, latent_format=latent, prediction=prediction,
                     image_size=vae.get("sample_size", base.image_size))
    sources = {"everything": "the folder's config.json files", "text encoder layer and padding":
               f"{FAMILY_TITLE[family]} family convention"}
    return Inferred(named(config), sources)
