from collections import defaultdict
from dataclasses import fields, replace
from functools import cache

import pytest
import torch

from openldm.checkpoints import diffusers_layout as dl
from openldm.checkpoints.detect import checkpoint_facts, detect, infer_shapes, preset_facts
from openldm.checkpoints.infer import FAMILY_BASE, config_metadata
from openldm.checkpoints.io import CheckpointError
from openldm.checkpoints.layout import UNET_PREFIX, VAE_PREFIX
from openldm.checkpoints.load import build_component
from openldm.config import (
    PRESETS,
    SD2_BASE,
    SD2_V,
    SD15,
    TINY_SD1,
    TINY_SD2,
    TINY_SD2_V,
    TINY_SDXL,
    unet_from_blocks,
)
from tests.helpers import checkpoint_shapes, extra_tensors


def _fields(unet) -> dict:
    skip = {"num_res_blocks", "transformer_depth", "transformer_depth_input", "transformer_depth_output",
            "transformer_depth_middle"}
    return {f.name: getattr(unet, f.name) for f in fields(unet) if f.name not in skip}


@cache
def _shapes(name: str) -> dict[str, tuple[int, ...]]:
    config = PRESETS[name]
    extras = {k: tuple(v.shape) for k, v in extra_tensors(config).items()}
    return checkpoint_shapes(config) | extras


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_detects_as_itself(name):
    config = PRESETS[name]
    assert checkpoint_facts(_shapes(name)) == preset_facts(config)
    assert detect(_shapes(name), prediction=config.prediction) == config


def test_only_the_prediction_pairs_share_a_shape_set():
    groups = defaultdict(list)
    for config in PRESETS.values():
        groups[tuple(sorted(preset_facts(config).items()))].append(config.name)
    shared = sorted(sorted(names) for names in groups.values() if len(names) > 1)
    assert shared == [["sd2-base", "sd2-v"], ["tiny-sd2", "tiny-sd2-v"]]


def test_prediction_picks_between_same_shaped_presets():
    assert detect(_shapes("sd2-base")) == SD2_BASE
    assert detect(_shapes("sd2-v"), prediction="v") == SD2_V
    assert detect(_shapes("tiny-sd2")) == TINY_SD2
    assert detect(_shapes("tiny-sd2-v"), prediction="v") == TINY_SD2_V
    v_sd1 = detect(_shapes("sd15"), prediction="v")  # no v preset: the family's preset, v-predicting
    assert (v_sd1.name, v_sd1.prediction, v_sd1.unet) == ("sd15", "v", SD15.unet)


def test_unet_alone_is_enough_to_detect():
    unet_only = {k: v for k, v in _shapes("tiny-sd1").items() if k.startswith(UNET_PREFIX)}
    assert detect(unet_only) == TINY_SD1


def test_a_fact_no_source_gives_is_an_error_naming_it():
    shapes = dict(_shapes("tiny-sd1"))  # not tiny-sd1 any more, and 32-wide text: heads unknown
    for key in [k for k in shapes if k.endswith("attn2.to_k.weight")]:
        shapes[key] = (shapes[key][0], 48)
    with pytest.raises(CheckpointError, match=r"text encoder 1's attention heads: its width 32 .* metadata"):
        detect(shapes)
    unet_only = {k: v for k, v in shapes.items() if k.startswith(UNET_PREFIX)}
    with pytest.raises(CheckpointError, match=r"family is unknown; .*unet\.context_dim=48"):
        detect(unet_only)


def _wide_text(encoder):
    """A text encoder 64 channels wide: the CLIP convention then gives its heads."""
    projection = 64 if encoder.projection_dim else None
    return replace(encoder, hidden_size=64, num_heads=1, projection_dim=projection)


# Shapes like the distilled (SSD-1B, Vega) and block-removed (BK-SDM) models people use.
_CUSTOM = {
    "ssd1b-like": replace(
        TINY_SDXL, text_encoders=tuple(map(_wide_text, TINY_SDXL.text_encoders)),
        unet=unet_from_blocks((2, 2, 2), ((0, 0), (1, 1), (2, 1)), ((2, 1, 1), (1, 1, 2), (0, 0, 0)),
                              **_fields(TINY_SDXL.unet), transformer_depth_middle=2),
    ),
    "bk-sdm-like": replace(
        TINY_SD1, text_encoders=(_wide_text(TINY_SD1.text_encoders[0]),),
        unet=replace(TINY_SD1.unet, num_res_blocks=(1, 2), transformer_depth_middle=None, context_dim=64,
                     num_heads=8),
    ),
}


@pytest.mark.parametrize("name", list(_CUSTOM))
def test_non_preset_shapes_infer_the_whole_config(name):
    config = _CUSTOM[name]
    inferred = infer_shapes(checkpoint_shapes(config))
    want = replace(config, name=f"custom-{config.family}", unet=replace(
        config.unet, num_heads=FAMILY_BASE[config.family].unet.num_heads,
        num_head_channels=FAMILY_BASE[config.family].unet.num_head_channels),
        latent_format=FAMILY_BASE[config.family].latent_format,
        image_size=FAMILY_BASE[config.family].image_size)
    assert inferred.config == want
    assert inferred.label == f"custom {'SDXL' if config.family == 'sdxl' else 'SD1'}-family (inferred)"
    assert "convention" in inferred.sources["unet heads"]


def test_recorded_config_wins_and_must_fit_the_shapes():
    config = replace(TINY_SD1, name="mine", unet=replace(TINY_SD1.unet, num_res_blocks=(1, 2)))
    metadata = config_metadata(config)
    assert detect(checkpoint_shapes(config), metadata=metadata) == config
    with pytest.raises(CheckpointError, match="disagrees with its tensors: unet.num_res_blocks=1"):
        other = replace(config, unet=replace(config.unet, num_res_blocks=1))
        detect(checkpoint_shapes(other), metadata=metadata)
    assert config_metadata(TINY_SD1) == {}  # presets are recorded by name


def test_inpainting_is_told_apart_by_in_channels():
    assert detect(_shapes("tiny-sd1-inpaint")).is_inpainting
    assert not detect(_shapes("tiny-sd1")).is_inpainting


def _part_shapes(name: str, component: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in build_component(component, PRESETS[name]).state_dict().items()}


def _rejected(shapes) -> str:
    with pytest.raises(CheckpointError) as info:
        detect(shapes)
    return str(info.value)


@pytest.mark.parametrize("key", [
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
    "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
    "diffusion_model.input_blocks.1.1.proj_in.lora_up.weight",
])
def test_lora_files_are_refused_as_lora(key):
    shapes = {key: (4, 320), "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}
    assert "LoRA" in _rejected(shapes)


def test_partial_files_are_refused_by_what_they_are():
    assert "empty" in _rejected({})
    vae = _part_shapes("tiny-sd1", "vae")
    assert "only a VAE" in _rejected(vae)
    assert "only a VAE" in _rejected({VAE_PREFIX + k: v for k, v in vae.items()})
    assert "only a text encoder" in _rejected(_part_shapes("tiny-sd1", "text_encoder"))
    sd2 = {k: v for k, v in _shapes("tiny-sd2").items() if k.startswith("cond_stage_model.")}
    assert "only a text encoder" in _rejected(sd2)
    unet = build_component("unet", TINY_SD1).state_dict()
    diffusers_unet = {k: tuple(v.shape) for k, v in dl.to_diffusers("unet", unet, TINY_SD1).items()}
    assert "diffusers naming" in _rejected(diffusers_unet)
    assert "bare UNet" in _rejected(_part_shapes("tiny-sd1", "unet"))
    assert "no UNet" in _rejected({"something.else": (3,)})


def test_detect_accepts_torch_sizes():
    sizes = {k: torch.Size(v) for k, v in _shapes("tiny-sdxl").items()}
    assert detect(sizes).name == "tiny-sdxl"
