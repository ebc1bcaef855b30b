from collections import defaultdict
from functools import cache

import pytest
import torch

from openldm.checkpoints import diffusers_layout as dl
from openldm.checkpoints.detect import checkpoint_facts, detect, preset_facts
from openldm.checkpoints.io import CheckpointError
from openldm.checkpoints.layout import UNET_PREFIX, VAE_PREFIX
from openldm.checkpoints.load import build_component
from openldm.config import PRESETS, SD2_BASE, SD2_V, SD15, TINY_SD1, TINY_SD2, TINY_SD2_V
from tests.helpers import checkpoint_shapes, extra_tensors


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


def test_no_match_names_the_facts_seen():
    shapes = dict(_shapes("tiny-sd1"))
    for key in [k for k in shapes if k.endswith("attn2.to_k.weight")]:
        shapes[key] = (shapes[key][0], 48)
    with pytest.raises(CheckpointError, match=r"no preset matches .*unet\.context_dim=48"):
        detect(shapes)


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
