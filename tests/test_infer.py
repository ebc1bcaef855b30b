"""Checkpoints of SD-shaped architectures no preset has: diffusers builds them, openldm loads them.

Random-weight models are built by diffusers 0.42.1 / transformers 5.23 from configs shaped like
SSD-1B and Vega (distilled SDXL: fewer transformer blocks, other counts on the up path), BK-SDM (one
res block per level, no middle block) and a 2-level width-32 SD1 with a 2-layer text encoder; saved
with `save_pretrained`, loaded by openldm from the folder and from the single file openldm writes.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPTextModelWithProjection

from openldm.checkpoints import diffusers_layout as dl
from openldm.checkpoints.infer import Inferred, preset_name
from openldm.checkpoints.load import load_components
from openldm.checkpoints.save import save_diffusers, save_single_file

TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 49408, "max_position_embeddings": 77}
SD1_UNET = {"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
            "attention_head_dim": 8, "layers_per_block": 2, "norm_num_groups": 32}
SDXL_UNET = {
    "block_out_channels": [32, 64, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D",
                                                             "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 64,
    "attention_head_dim": [2, 4, 4], "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 32 + 6 * 256,
}
ARCHITECTURES = {
    "tiny-sd1-2level": ("sd1", SD1_UNET),
    "bk-sdm-like": ("sd1", SD1_UNET | {"layers_per_block": 1, "mid_block_type": None,
                                       "down_block_types": ["CrossAttnDownBlock2D"] * 2,
                                       "up_block_types": ["CrossAttnUpBlock2D"] * 2}),
    "ssd-1b-like": ("sdxl", SDXL_UNET | {
        "transformer_layers_per_block": [[1, 1], [1, 2], [2, 1]],
        "reverse_transformer_layers_per_block": [[2, 1, 1], [1, 1, 2], [1, 1, 1]]}),
    "vega-like": ("sdxl", SDXL_UNET | {"layers_per_block": [1, 1, 2],
                                       "transformer_layers_per_block": [1, 1, 2]}),
}


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    logging.getLogger("diffusers").setLevel(logging.ERROR)


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight N(0, 1/fan_in), so no zero-initialised layer hides a wrong connection."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (p[0].numel() if p.ndim > 1 else 4) ** -0.5)
    return model.eval()


def _diffusers_folder(folder, family: str, unet_config: dict) -> dict[str, torch.nn.Module]:
    """Save a random-weight model with diffusers' and transformers' own `save_pretrained`."""
    models = {"unet": _randomise(UNet2DConditionModel(**unet_config), 0),
              "vae": _randomise(DiffusersVAE(block_out_channels=[32, 64], layers_per_block=1,
                                             down_block_types=["DownEncoderBlock2D"] * 2,
                                             up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32), 1)}
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    encoders = ["text_encoder"] if family == "sd1" else ["text_encoder", "text_encoder_2"]
    for i, name in enumerate(encoders):
        if i:
            models[name] = _randomise(CLIPTextModelWithProjection(HFCLIPTextConfig(
                **TEXT, hidden_act="gelu", projection_dim=32)), 3)
        else:
            models[name] = _randomise(HFCLIPTextModel(HFCLIPTextConfig(**TEXT)), 2)
        index[name] = ["transformers", type(models[name]).__name__]
    for name, model in models.items():
        model.save_pretrained(folder / name)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(index))
    return models


def _unet_inputs(config):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    t = torch.tensor([10.0, 700.0])
    context = torch.randn(2, 7, config.unet.context_dim, generator=generator)
    adm = config.unet.adm_in_channels
    y = torch.randn(2, adm, generator=generator) if adm else None
    return x, t, context, y


def _theirs_unet(unet, x, t, context, y):
    extra = None
    if y is not None:  # SDXL: pooled text, then the six size numbers' embeddings, as `added_cond_kwargs`
        extra = {"text_embeds": y[:, :32], "time_ids": torch.tensor([[32, 32, 0, 0, 32, 32]] * 2).float()}
        y = torch.cat([y[:, :32], unet.add_time_proj(extra["time_ids"].flatten()).reshape(2, -1)], dim=1)
    return unet(x, t, context, added_cond_kwargs=extra).sample, y


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_diffusers_built_architecture_loads_and_matches(tmp_path, name):
    family, unet_config = ARCHITECTURES[name]
    theirs = _diffusers_folder(tmp_path / "folder", family, unet_config)
    ours = load_components(tmp_path / "folder")
    assert preset_name(ours.config) is None and ours.config.name == f"custom-{family}"
    assert Inferred(ours.config, {}).label.startswith("custom ")
    x, t, context, y = _unet_inputs(ours.config)
    with torch.no_grad():
        expected, y = _theirs_unet(theirs["unet"], x, t, context, y)
        err = _max_err(ours.unet(x, t, context, y), expected)
        assert err <= 1e-5, f"UNet max abs error {err:.2e}"
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
        err = _max_err(ours.vae.decode(z), theirs["vae"].decode(z).sample)
        assert err <= 1e-5, f"VAE decode max abs error {err:.2e}"
        ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(7))
        out = theirs["text_encoder"](ids, output_hidden_states=True)  # SDXL: penultimate, not normed
        want = out.last_hidden_state if family == "sd1" else out.hidden_states[-2]
        err = _max_err(ours.text_encoders[0](ids)[0], want)
        assert err <= 1e-5, f"text encoder max abs error {err:.2e}"
    # The same model as an original single file: strict load, every tensor equal.
    single = save_single_file(ours, tmp_path / "model.safetensors")
    again = load_components(single)
    assert again.config == ours.config
    pairs = zip((ours.unet, ours.vae, *ours.text_encoders), (again.unet, again.vae, *again.text_encoders))
    for a, b in pairs:
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    _check_folder_we_write(tmp_path, ours)


def _check_folder_we_write(tmp_path, ours) -> None:
    """Every computation-changing field diffusers reads from our config.json equals its source's."""
    save_diffusers(ours, tmp_path / "out")
    for sub in ("unet", "vae"):
        source = UNet2DConditionModel if sub == "unet" else DiffusersVAE
        a = dict(source.load_config(tmp_path / "folder" / sub))
        b = dict(source.load_config(tmp_path / "out" / sub))
        a_full, b_full = source.from_config(a).config, source.from_config(b).config
        skip = {"_diffusers_version", "_use_default_values", "sample_size", "_name_or_path"}
        differing = {k: (a_full[k], b_full.get(k)) for k in a_full
                     if k not in skip and not _same(k, a_full, b_full)}
        assert not differing, f"{sub}: {differing}"
    assert load_components(tmp_path / "out").config == ours.config
    assert dl.detect_diffusers(tmp_path / "out") == ours.config


def _same(key: str, a, b) -> bool:
    """Equal, or per-level / per-block forms that expand to the same numbers."""
    if json.dumps(a[key]) == json.dumps(b.get(key)):
        return True
    if key == "attention_head_dim":
        levels = len(a["block_out_channels"])
        return [a[key]] * levels == b[key] or a[key] == [b[key]] * levels
    depths = ("transformer_layers_per_block", "reverse_transformer_layers_per_block", "layers_per_block")
    if key not in depths:
        return False
    return _expand(a, key) == _expand(b, key)


def _expand(c, key):
    levels = len(c["block_out_channels"])
    blocks = c["layers_per_block"]
    blocks = list(blocks) if isinstance(blocks, (list, tuple)) else [blocks] * levels
    if key == "layers_per_block":
        return list(blocks)
    value = c[key]
    if value is None:  # diffusers' default: the down path reversed
        value = list(reversed(c["transformer_layers_per_block"]))
        blocks = [n + 1 for n in reversed(blocks)]
    elif key == "reverse_transformer_layers_per_block":
        blocks = [n + 1 for n in reversed(blocks)]
    value = value if isinstance(value, (list, tuple)) else [value] * levels
    return [list(v) if isinstance(v, (list, tuple)) else [v] * n for v, n in zip(value, blocks)]
