"""The diffusers folder layout: parameter names both ways, and the config files diffusers reads.

Our names are the original single-file ones. Each model's renaming is one table generated from its
config: a row maps a module path in our naming (`input_blocks.4.1`) to its diffusers path
(`down_blocks.1.attentions.0`) and names a small leaf table for what sits inside that module
(`in_layers.0` -> `norm1`). Both directions read the same rows; the one reshape (the VAE's 1x1-conv
attention projections, linear layers in diffusers) is marked on its leaf table.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

import torch

from openldm.checkpoints.infer import folder_config
from openldm.checkpoints.io import CheckpointError, read_state_dict
from openldm.checkpoints.layout import TEXT_ENCODER_NAMES
from openldm.config import PRESETS, SIZE_EMBED_DIM, CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig

DIFFUSERS_VERSION = "0.42.1"  # the version whose folder format these configs follow
TRANSFORMERS_VERSION = "5.23.0"
_HF_TEXT_KEEP = ("text_model.", "text_projection.")


@dataclass(frozen=True)
class _Leaves:
    """Renames of sub-modules inside one module; `conv_as_linear` are 1x1 convs here, linear there."""

    names: Mapping[str, str] = field(default_factory=dict)
    conv_as_linear: frozenset[str] = frozenset()


_SAME = _Leaves()
_UNET_RESNET = _Leaves({
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
})
_VAE_RESNET = _Leaves({"nin_shortcut": "conv_shortcut"})
_VAE_ATTENTION = _Leaves(
    {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"},
    conv_as_linear=frozenset({"q", "k", "v", "proj_out"}),
)
Table = dict[str, tuple[str, _Leaves]]  # our module path -> (diffusers module path, leaves)


# --- the tables ----------------------------------------------------------------------------

def _unet_down(cfg: UNetConfig) -> Table:
    """`input_blocks.N` counts resnets, attentions and downsamplers level by level (0 is conv_in)."""
    rows: Table = {}
    block = 0
    for i, depths in enumerate(cfg.input_depths()):
        for j, depth in enumerate(depths):
            block += 1
            rows[f"input_blocks.{block}.0"] = (f"down_blocks.{i}.resnets.{j}", _UNET_RESNET)
            if depth:
                rows[f"input_blocks.{block}.1"] = (f"down_blocks.{i}.attentions.{j}", _SAME)
        if i < len(cfg.channel_mult) - 1:
            block += 1
            rows[f"input_blocks.{block}.0.op"] = (f"down_blocks.{i}.downsamplers.0.conv", _SAME)
    return rows


def _unet_up(cfg: UNetConfig) -> Table:
    """`output_blocks` run from the deepest level up, one more resnet per level than going down."""
    rows: Table = {}
    block = -1
    for i, depths in enumerate(cfg.output_depths()):
        for j, depth in enumerate(depths):
            block += 1
            rows[f"output_blocks.{block}.0"] = (f"up_blocks.{i}.resnets.{j}", _UNET_RESNET)
            if depth:
                rows[f"output_blocks.{block}.1"] = (f"up_blocks.{i}.attentions.{j}", _SAME)
        if i < len(cfg.channel_mult) - 1:  # the upsampler follows the attention when there is one
            upsampler = f"output_blocks.{block}.{2 if depths[-1] else 1}.conv"
            rows[upsampler] = (f"up_blocks.{i}.upsamplers.0.conv", _SAME)
    return rows


def _unet_table(cfg: UNetConfig) -> Table:
    rows: Table = {
        "time_embed.0": ("time_embedding.linear_1", _SAME),
        "time_embed.2": ("time_embedding.linear_2", _SAME),
        "input_blocks.0.0": ("conv_in", _SAME),
        "out.0": ("conv_norm_out", _SAME),
        "out.2": ("conv_out", _SAME),
    }
    if cfg.transformer_depth_middle is not None:
        rows |= {
            "middle_block.0": ("mid_block.resnets.0", _UNET_RESNET),
            "middle_block.1": ("mid_block.attentions.0", _SAME),
            "middle_block.2": ("mid_block.resnets.1", _UNET_RESNET),
        }
    if cfg.adm_in_channels is not None:  # SDXL's vector conditioning MLP
        rows["label_emb.0.0"] = ("add_embedding.linear_1", _SAME)
        rows["label_emb.0.2"] = ("add_embedding.linear_2", _SAME)
    if cfg.num_classes is not None:  # the x4 upscaler's noise-level embedding
        rows["label_emb"] = ("class_embedding", _SAME)
    return rows | _unet_down(cfg) | _unet_up(cfg)


def _vae_table(cfg: VAEConfig) -> Table:
    """The decoder's `up.N` counts from the lowest resolution's opposite end: diffusers reverses it."""
    levels = len(cfg.ch_mult)
    rows: Table = {"quant_conv": ("quant_conv", _SAME), "post_quant_conv": ("post_quant_conv", _SAME)}
    for side in ("encoder", "decoder"):
        for name, theirs, leaves in (
            ("conv_in", "conv_in", _SAME), ("conv_out", "conv_out", _SAME),
            ("norm_out", "conv_norm_out", _SAME), ("mid.block_1", "mid_block.resnets.0", _VAE_RESNET),
            ("mid.attn_1", "mid_block.attentions.0", _VAE_ATTENTION),
            ("mid.block_2", "mid_block.resnets.1", _VAE_RESNET),
        ):
            rows[f"{side}.{name}"] = (f"{side}.{theirs}", leaves)
    for i in range(levels):
        up = levels - 1 - i
        for j in range(cfg.num_res_blocks):
            rows[f"encoder.down.{i}.block.{j}"] = (f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET)
        for j in range(cfg.num_res_blocks + 1):
            rows[f"decoder.up.{i}.block.{j}"] = (f"decoder.up_blocks.{up}.resnets.{j}", _VAE_RESNET)
        if i < levels - 1:
            down = f"encoder.down_blocks.{i}.downsamplers.0.conv"
            rows[f"encoder.down.{i}.downsample.conv"] = (down, _SAME)
        if i > 0:
            rows[f"decoder.up.{i}.upsample.conv"] = (f"decoder.up_blocks.{up}.upsamplers.0.conv", _SAME)
    return rows


@cache
def _tables(component: str, config: ModelConfig) -> tuple[Table, Table]:
    """(ours -> diffusers, diffusers -> ours) for one model component."""
    if component == "unet":
        forward = _unet_table(config.unet)
    elif component == "vae":
        forward = _vae_table(config.vae)
    else:
        raise ValueError(f"no diffusers renaming for component {component!r} (expected 'unet' or 'vae')")
    return forward, invert(forward)


def invert(forward: Table) -> Table:
    """The same rows read from the diffusers side (ControlNet's table reuses this)."""
    backward: Table = {}
    for ours, (theirs, leaves) in forward.items():
        inverse = _Leaves(
            {v: k for k, v in leaves.names.items()},
            frozenset(leaves.names.get(n, n) for n in leaves.conv_as_linear),
        )
        backward[theirs] = (ours, inverse)
    return backward


# --- renaming --------------------------------------------------------------------------------

def _rename(key: str, table: Table) -> tuple[str, str | None]:
    """New key, and the leaf sub-module if the tensor is a conv-as-linear weight."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        row = table.get(".".join(parts[:cut]))
        if row is None:
            continue
        module, leaves = row
        sub, param = ".".join(parts[cut:-1]), parts[-1]
        reshape = sub if sub in leaves.conv_as_linear and param == "weight" else None
        sub = leaves.names.get(sub, sub)
        return ".".join(p for p in (module, sub, param) if p), reshape
    raise KeyError(key)


def _convert(state_dict: Mapping[str, torch.Tensor], table: Table, to_linear: bool) -> dict:
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        try:
            new_key, reshape = _rename(key, table)
        except KeyError:
            unknown.append(key)
            continue
        if reshape is not None:
            value = value[:, :, 0, 0] if to_linear else value[:, :, None, None]
        out[new_key] = value
    if unknown:
        shown = ", ".join(sorted(unknown)[:5])
        raise CheckpointError(f"{len(unknown)} keys have no diffusers counterpart, e.g. {shown}")
    return out


# --- text encoders: SD2's stops a layer early -----------------------------------------------

def drops_last_layer(cfg: CLIPTextConfig) -> bool:
    """Whether diffusers folders store this encoder without its last layer (SD2's OpenCLIP-H).

    diffusers' `StableDiffusionPipeline` feeds the UNet the final-normed *last* hidden state, so an
    encoder whose UNet input is the final-normed penultimate one is stored with `num_hidden_layers`
    one short: the published SD2 folders hold 23 of 24 layers (diffusers' `convert_from_ckpt.py`
    drops `resblocks.23`). SDXL's encoders keep every layer: its pipeline asks for `hidden_states[-2]`,
    and the pooled output needs the last layer.
    """
    return cfg.layer == "penultimate" and cfg.final_norm and cfg.projection_dim is None


def _layer(cfg: CLIPTextConfig, i: int) -> str:
    return f"text_model.encoder.layers.{cfg.num_layers + i if i < 0 else i}."


def _restore_last_layer(state: dict[str, torch.Tensor], cfg: CLIPTextConfig) -> dict[str, torch.Tensor]:
    """Give a folder that stopped a layer early its last layer back, as zeros.

    A pre-norm block whose output projections are zero is an exact identity, and the SD2 config
    never runs it anyway (it stops at the penultimate layer); CLIP skip 1 then equals skip 2.
    Folders that kept the layer (written by earlier openldm, or converted by hand) keep theirs.
    """
    last, before = _layer(cfg, -1), _layer(cfg, -2)
    if not drops_last_layer(cfg) or cfg.num_layers < 2 or any(k.startswith(last) for k in state):
        return state
    return state | {k.replace(before, last, 1): torch.zeros_like(v) for k, v in state.items()
                    if k.startswith(before)}


def to_diffusers(component: str, state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict:
    """Our (original single-file) names -> diffusers names; text encoders are HF-named already."""
    if component.startswith("text_encoder"):
        cfg = config.text_encoders[TEXT_ENCODER_NAMES.index(component)]
        dropped = _layer(cfg, -1) if drops_last_layer(cfg) else None
        return {k: v for k, v in state_dict.items() if dropped is None or not k.startswith(dropped)}
    return _convert(state_dict, _tables(component, config)[0], to_linear=True)


def from_diffusers(component: str, state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict:
    """Diffusers names -> ours: the same table read backwards."""
    if component.startswith("text_encoder"):  # transformers 5 saves CLIPTextModel without `text_model.`
        cfg = config.text_encoders[TEXT_ENCODER_NAMES.index(component)]
        state = {k if k.startswith(_HF_TEXT_KEEP) else f"text_model.{k}": v for k, v in state_dict.items()}
        return _restore_last_layer(state, cfg)
    return _convert(state_dict, _tables(component, config)[1], to_linear=False)


# --- config files --------------------------------------------------------------------------

def _level_layers(depths: tuple[int, ...], where: str) -> int | list[int]:
    """One level's depths as diffusers takes them: in a cross-attention level every resnet has some."""
    if 0 in depths and any(depths):
        raise ValueError(f"diffusers cannot express {where} depths {depths}: a level attends in every block "
                         "or in none")
    return depths[0] if len(set(depths)) == 1 else list(depths)


def _transformer_layers(cfg: UNetConfig) -> dict:
    """Per-level (or per-block) depths; diffusers takes the mid block's from the last level's first block."""
    down = [_level_layers(d, "down-path") for d in cfg.input_depths()]
    middle = cfg.transformer_depth_middle
    if middle is not None and down[-1] == 0:
        down[-1] = middle
    elif middle is not None and cfg.input_depths()[-1][0] != middle:
        raise ValueError(f"diffusers cannot express middle depth {middle} beside a last level of depths "
                         f"{cfg.input_depths()[-1]}")
    down = [d or 1 for d in down]
    layers: dict = {"transformer_layers_per_block": down}
    if cfg.transformer_depth_input or cfg.transformer_depth_output:  # diffusers wants both paths then
        layers["transformer_layers_per_block"] = [d if isinstance(d, list) else [d] * cfg.res_blocks(i)
                                                  for i, d in enumerate(down)]
        layers["reverse_transformer_layers_per_block"] = [
            list(d) if any(d) else [1] * len(d) for d in cfg.output_depths()]
    for level in cfg.output_depths():
        _level_layers(level, "up-path")
    return layers


def unet_config_json(config: ModelConfig) -> dict:
    """`UNet2DConditionModel` config. Its `attention_head_dim` is, historically, the head *count*."""
    cfg = config.unet
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    down = [any(d) for d in cfg.input_depths()]
    up = [any(d) for d in cfg.output_depths()]
    out = {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": config.image_size // config.vae.downsample_factor,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up],
        "mid_block_type": None if cfg.transformer_depth_middle is None else "UNetMidBlock2DCrossAttn",
        "block_out_channels": channels,
        "layers_per_block": cfg.num_res_blocks if isinstance(cfg.num_res_blocks, int) else
        list(cfg.num_res_blocks),
        **_transformer_layers(cfg),
        "attention_head_dim": [cfg.heads_at(c) for c in channels],
        "cross_attention_dim": cfg.context_dim, "norm_num_groups": cfg.norm_groups,
        "use_linear_projection": cfg.use_linear_in_transformer,
        "addition_embed_type": None, "addition_time_embed_dim": None,
        "projection_class_embeddings_input_dim": None,
        "num_class_embeds": cfg.num_classes,
        "only_cross_attention": [not cfg.self_attends(i) for i in range(len(channels))]
        if cfg.disable_self_attentions else False,
    }
    if cfg.adm_in_channels is not None:
        out["addition_embed_type"] = "text_time"
        out["addition_time_embed_dim"] = SIZE_EMBED_DIM
        out["projection_class_embeddings_input_dim"] = cfg.adm_in_channels
    return out


def vae_config_json(config: ModelConfig) -> dict:
    """`AutoencoderKL` config; the latent scale rides along as diffusers keeps it there."""
    cfg = config.vae
    if cfg.embed_dim != cfg.z_channels:
        raise ValueError("diffusers' AutoencoderKL needs embed_dim == z_channels")
    levels = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": config.image_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "layers_per_block": cfg.num_res_blocks,
        "latent_channels": cfg.z_channels, "norm_num_groups": cfg.norm_groups,
        "scaling_factor": config.latent_format.scale_factor,
        "shift_factor": config.latent_format.shift_factor or None,
    }


def text_encoder_config_json(cfg: CLIPTextConfig) -> dict:
    """transformers `CLIPTextConfig`; encoders with a projection load as `...WithProjection`."""
    layers = cfg.num_layers - int(drops_last_layer(cfg))  # SD2: 23, as published (see `drops_last_layer`)
    out = {
        "architectures": ["CLIPTextModelWithProjection" if cfg.projection_dim else "CLIPTextModel"],
        "model_type": "clip_text_model", "transformers_version": TRANSFORMERS_VERSION,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": layers,
        "num_attention_heads": cfg.num_heads, "max_position_embeddings": cfg.max_length,
        "hidden_act": cfg.activation, "layer_norm_eps": 1e-5,
        # What a plain `from_pretrained` computes in, whatever the weights' dtype: diffusers builds its
        # models in float32 and casts fp16 weights up; transformers 5 would keep them fp16 without this,
        # and the pipeline would then mix dtypes ("mat1 and mat2 must have the same dtype").
        "dtype": "float32",
        # CLIP vocabularies end with the start and end tokens (49406, 49407 in CLIP's own)
        "bos_token_id": cfg.vocab_size - 2, "eos_token_id": cfg.vocab_size - 1, "pad_token_id": cfg.pad_token,
    }
    if cfg.projection_dim:
        out["projection_dim"] = cfg.projection_dim
    return out


def scheduler_config_json(config: ModelConfig) -> dict:
    """Euler with SD's training schedule (`scaled_linear` is ldm's linear-in-sqrt schedule)."""
    return {
        "_class_name": "EulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": config.timesteps, "beta_start": config.linear_start,
        "beta_end": config.linear_end, "beta_schedule": "scaled_linear",
        "prediction_type": {"eps": "epsilon", "v": "v_prediction"}[config.prediction],
        "timestep_spacing": "leading", "steps_offset": 1, "interpolation_type": "linear",
    }


def low_res_scheduler_json(config: ModelConfig) -> dict:
    """The x4 upscaler's noise augmentation as diffusers keeps it: a DDPM scheduler of its own."""
    aug = config.low_res
    assert aug is not None
    return {
        "_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": aug.timesteps, "beta_start": aug.linear_start, "beta_end": aug.linear_end,
        "beta_schedule": "scaled_linear", "clip_sample": False, "variance_type": "fixed_small",
    }


def folder_names(config: ModelConfig) -> dict[str, str]:
    """Our component name -> diffusers folder. The refiner's only encoder is diffusers' second."""
    names = {"unet": "unet", "vae": "vae"}
    encoders = ("text_encoder_2",) if config.family == "sdxl_refiner" else ("text_encoder", "text_encoder_2")
    for i, folder in enumerate(encoders[: len(config.text_encoders)]):
        names[f"text_encoder{'_2' if i else ''}"] = folder
    return names


def _pipeline_class(config: ModelConfig) -> str:
    if config.family == "sdxl_refiner":
        return "StableDiffusionXLImg2ImgPipeline"
    if config.family == "x4":
        return "StableDiffusionUpscalePipeline"
    xl = "XL" if config.family == "sdxl" else ""
    return f"StableDiffusion{xl}{'Inpaint' if config.is_inpainting else ''}Pipeline"


def model_index_json(config: ModelConfig) -> dict:
    """`model_index.json`: which class loads each folder."""
    out: dict = {"_class_name": _pipeline_class(config), "_diffusers_version": DIFFUSERS_VERSION,
                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                 "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    if config.family in ("sd1", "sd2"):
        out |= {"safety_checker": [None, None], "feature_extractor": [None, None],
                "requires_safety_checker": False}
    elif config.low_res is not None:
        out |= {"low_res_scheduler": ["diffusers", "DDPMScheduler"],
                "max_noise_level": config.low_res.max_noise_level, "safety_checker": [None, None],
                "feature_extractor": [None, None], "watermarker": [None, None]}
    else:
        out |= {"text_encoder": [None, None], "tokenizer": [None, None]}
        out |= {"force_zeros_for_empty_prompt": True} if config.family == "sdxl" else {
            "requires_aesthetics_score": True}
    for name, folder in folder_names(config).items():
        if name.startswith("text_encoder"):
            te = config.text_encoders[int(name[-1] == "2")]
            arch = text_encoder_config_json(te)["architectures"][0]
            out[folder] = ["transformers", arch]
            out[folder.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    return out


# --- reading a diffusers folder ------------------------------------------------------------

def _per_level(value, levels: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _unet_signature(c: Mapping) -> tuple:
    """The facts of a `UNet2DConditionModel` config that tell presets apart (diffusers defaults)."""
    channels = tuple(c.get("block_out_channels", (320, 640, 1280, 1280)))
    heads = _per_level(c.get("num_attention_heads") or c.get("attention_head_dim", 8), len(channels))
    depth = [tuple(d) if isinstance(d, list) else d
             for d in _per_level(c.get("transformer_layers_per_block", 1), len(channels))]
    attention = ["CrossAttn" in t for t in c["down_block_types"]]
    return (
        c.get("in_channels", 4), c.get("out_channels", 4), channels, json.dumps(c.get("layers_per_block", 2)),
        c.get("cross_attention_dim", 1280), bool(c.get("use_linear_projection", False)),
        c.get("projection_class_embeddings_input_dim"),
        tuple((h, d) if a else None for a, h, d in zip(attention, heads, depth)), depth[-1],
        json.dumps(c.get("reverse_transformer_layers_per_block")),
        c.get("mid_block_type", "UNetMidBlock2DCrossAttn"), c.get("norm_num_groups", 32),
        c.get("num_class_embeds"),
        json.dumps(_per_level(c.get("only_cross_attention", False), len(channels))),
    )


def _folder_signature(configs: Mapping[str, Mapping]) -> tuple:
    """Signature of a folder given its per-folder config.json dicts."""
    vae = configs["vae"]
    encoders = tuple(sorted(
        (folder, c["hidden_size"], c["num_hidden_layers"], c.get("projection_dim") if "WithProjection"
         in c.get("architectures", [""])[0] else None, c.get("vocab_size", 49408))  # transformers' default
        for folder, c in configs.items() if folder.startswith("text_encoder")
    ))
    return (_unet_signature(configs["unet"]), tuple(vae["block_out_channels"]), vae["layers_per_block"],
            vae["latent_channels"], vae.get("norm_num_groups", 32), encoders)


def _preset_configs(config: ModelConfig) -> dict[str, dict]:
    configs = {"unet": unet_config_json(config), "vae": vae_config_json(config)}
    for name, folder in folder_names(config).items():
        if name.startswith("text_encoder"):
            configs[folder] = text_encoder_config_json(config.text_encoders[int(name[-1] == "2")])
    return configs


def _preset_signatures(config: ModelConfig) -> set[tuple]:
    """The folder our writer makes, and the same with every encoder layer kept (as older writers did)."""
    configs = _preset_configs(config)
    full = dict(configs)
    for name, folder in folder_names(config).items():
        if name.startswith("text_encoder"):
            layers = config.text_encoders[TEXT_ENCODER_NAMES.index(name)].num_layers
            full[folder] = configs[folder] | {"num_hidden_layers": layers}
    return {_folder_signature(configs), _folder_signature(full)}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: not a diffusers folder?") from None


def _scheduler_prediction(folder: Path) -> str:
    path = folder / "scheduler" / "scheduler_config.json"
    kind = _read_json(path).get("prediction_type", "epsilon") if path.exists() else "epsilon"
    return "v" if kind == "v_prediction" else "eps"


def detect_diffusers(folder: str | Path, prediction: str | None = None) -> ModelConfig:
    """The preset whose generated config files match this folder's; prediction from the scheduler."""
    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    present = [f for f in ("unet", "vae", "text_encoder", "text_encoder_2") if (index.get(f) or [None])[0]]
    configs = {f: _read_json(folder / f / "config.json") for f in present}
    seen = _folder_signature(configs)
    matches = [p for p in PRESETS.values() if seen in _preset_signatures(p)]
    wanted = prediction or _scheduler_prediction(folder)
    if not matches:
        try:
            return folder_config(configs, wanted).config
        except (KeyError, TypeError, IndexError, ZeroDivisionError) as e:
            raise CheckpointError(f"{folder}: no preset matches, and its config.json files describe no "
                                  f"SD-shaped model ({type(e).__name__}: {e})") from None
    if len({(p.family, p.unet, p.vae, p.text_encoders) for p in matches}) != 1:
        raise CheckpointError(f"{folder}: {len(matches)} presets match its config files "
                              f"({', '.join(p.name for p in matches)}); saw {seen}")
    same = [p for p in matches if p.prediction == wanted]
    return same[0] if same else replace(matches[0], prediction=wanted)


def _weight_files(folder: Path) -> list[Path]:
    """The component's weights, shards included; the plain files win over `.fp16` variants."""
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(folder.glob(pattern))
        plain = [f for f in files if f.name.count(".") == 1]
        if plain or files:
            return plain or files
    raise CheckpointError(f"no weights (*.safetensors or *.bin) in {folder}")


def read_component(folder: str | Path, name: str, config: ModelConfig) -> dict[str, torch.Tensor]:
    """One component of a diffusers folder, renamed into our layout."""
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(Path(folder) / folder_names(config)[name]):
        state |= read_state_dict(path)[0]
    return from_diffusers(name, state, config)


def read_diffusers(
    folder: str | Path, config: ModelConfig | None = None, prediction: str | None = None
) -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]]]:
    """A diffusers folder -> (its preset, component state dicts in our names)."""
    config = config or detect_diffusers(folder, prediction)
    return config, {name: read_component(folder, name, config) for name in folder_names(config)}
