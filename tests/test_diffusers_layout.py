"""The diffusers renaming against diffusers' own single-file converters, and folders diffusers wrote."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPTextModelWithProjection

from openldm.checkpoints import diffusers_layout as dl
from openldm.checkpoints.io import CheckpointError
from openldm.checkpoints.layout import UNET_PREFIX, VAE_PREFIX
from openldm.checkpoints.load import build_component, load_components
from openldm.checkpoints.save import single_file_state_dict
from openldm.config import PRESETS
from openldm.models.clip import CLIPTextModel
from openldm.models.unet import UNetModel
from openldm.models.vae import AutoencoderKL

TINY = ["tiny-sd1", "tiny-sd1-inpaint", "tiny-sd2", "tiny-sdxl", "tiny-sdxl-refiner"]
ORACLES = {
    "unet": (convert_ldm_unet_checkpoint, UNET_PREFIX), "vae": (convert_ldm_vae_checkpoint, VAE_PREFIX),
}


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    logging.getLogger("diffusers").setLevel(logging.ERROR)


def _ours(component: str, config, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A state dict in our layout, every tensor distinct random numbers."""
    with torch.device(device):
        model = UNetModel(config.unet) if component == "unet" else AutoencoderKL(config.vae)
    if device == "meta":
        return dict(model.state_dict())
    return {key: torch.randn_like(value) for key, value in model.state_dict().items()}


def _config_json(component: str, config) -> dict:
    return getattr(dl, f"{component}_config_json")(config)


def _diffusers_model(component: str, config, device: str = "cpu"):
    cls = UNet2DConditionModel if component == "unet" else DiffusersVAE
    kwargs = {k: v for k, v in _config_json(component, config).items() if not k.startswith("_")}
    with torch.device(device):
        return cls(**kwargs)


@pytest.mark.parametrize("component", ["unet", "vae"])
@pytest.mark.parametrize("preset", TINY)
def test_matches_diffusers_single_file_converter(preset, component):
    config = PRESETS[preset]
    ours = _ours(component, config)
    convert, prefix = ORACLES[component]
    expected = convert({prefix + k: v for k, v in ours.items()}, _config_json(component, config))
    got = dl.to_diffusers(component, ours, config)
    assert got.keys() == expected.keys(), sorted(got.keys() ^ expected.keys())[:5]
    differing = [k for k in got if not torch.equal(got[k], expected[k])]
    assert not differing, differing[:5]


@pytest.mark.parametrize("component", ["unet", "vae"])
@pytest.mark.parametrize("preset", TINY)
def test_round_trip_is_exact(preset, component):
    config = PRESETS[preset]
    ours = _ours(component, config)
    back = dl.from_diffusers(component, dl.to_diffusers(component, ours, config), config)
    assert back.keys() == ours.keys()
    assert all(back[k].shape == ours[k].shape and torch.equal(back[k], ours[k]) for k in ours)


# Full-size models are built on the meta device (shapes only); the inpainting ones differ in one width.
FULL = ["sd15", "sd2-base", "sdxl-base", "sdxl-refiner"]


@pytest.mark.parametrize(("preset", "component"), [(p, "unet") for p in TINY + FULL] + [
    (p, "vae") for p in TINY + ["sd15"]])
def test_config_builds_the_model_our_weights_fit(preset, component):
    """Our config.json makes diffusers build exactly the parameters our renamed weights provide."""
    config = PRESETS[preset]
    device = "cpu" if preset in TINY else "meta"
    renamed = dl.to_diffusers(component, _ours(component, config, "meta"), config)
    theirs = _diffusers_model(component, config, device).state_dict()
    assert renamed.keys() == theirs.keys(), sorted(renamed.keys() ^ theirs.keys())[:5]
    wrong = [k for k in theirs if renamed[k].shape != theirs[k].shape]
    assert not wrong, wrong[:5]


@pytest.mark.parametrize("preset", TINY)
def test_text_encoder_config_builds_transformers_model_with_our_names(preset):
    config = PRESETS[preset]
    for encoder in config.text_encoders:
        cls = CLIPTextModelWithProjection if encoder.projection_dim else HFCLIPTextModel
        theirs = cls(HFCLIPTextConfig(**dl.text_encoder_config_json(encoder))).state_dict()
        theirs = dl.from_diffusers("text_encoder", theirs, config)  # transformers 5 drops `text_model.`
        ours = CLIPTextModel(encoder).state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_unknown_key_is_an_error():
    config = PRESETS["tiny-sd1"]
    with pytest.raises(CheckpointError, match="1 keys have no diffusers counterpart.*input_blocks.99"):
        dl.to_diffusers("unet", {"input_blocks.99.0.weight": torch.zeros(1)}, config)
    with pytest.raises(CheckpointError, match="down_blocks.7"):
        dl.from_diffusers("unet", {"down_blocks.7.resnets.0.conv1.weight": torch.zeros(1)}, config)


def test_text_encoders_pass_through():
    state = {"text_model.final_layer_norm.weight": torch.ones(3)}
    assert dl.to_diffusers("text_encoder_2", state, PRESETS["tiny-sdxl"]) == state


def _save_with_diffusers(folder, config) -> dict[str, dict[str, torch.Tensor]]:
    """A diffusers folder written by diffusers and transformers themselves, from our configs."""
    written = {}
    for name, sub in dl.folder_names(config).items():
        if name.startswith("text_encoder"):
            encoder = config.text_encoders[int(name[-1] == "2")]
            hf = HFCLIPTextConfig(**dl.text_encoder_config_json(encoder))
            model = (CLIPTextModelWithProjection if encoder.projection_dim else HFCLIPTextModel)(hf)
        else:
            model = _diffusers_model(name, config)
        model.save_pretrained(folder / sub)
        written[name] = {k: v.clone() for k, v in model.state_dict().items()}
    EulerDiscreteScheduler.from_config(dl.scheduler_config_json(config)).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(dl.model_index_json(config)))
    return written


@pytest.mark.parametrize("preset", ["tiny-sd1", "tiny-sd2-v", "tiny-sdxl"])
def test_reads_folder_saved_by_diffusers(tmp_path, preset):
    config = PRESETS[preset]
    written = _save_with_diffusers(tmp_path, config)
    found, parts = dl.read_diffusers(tmp_path)
    assert found == config
    for name, part in parts.items():
        build_component(name, config, "cpu").load_state_dict(part, strict=True)
        ours_named = part if name.startswith("text") else dl.to_diffusers(name, part, config)
        theirs = dl.from_diffusers(name, written[name], config) if name.startswith("text") else written[name]
        assert ours_named.keys() == theirs.keys()
        assert all(torch.equal(ours_named[k], theirs[k]) for k in theirs), name


def test_detection_takes_prediction_from_scheduler_or_caller(tmp_path):
    _save_with_diffusers(tmp_path, PRESETS["tiny-sd2"])
    assert dl.detect_diffusers(tmp_path).name == "tiny-sd2"
    assert dl.detect_diffusers(tmp_path, prediction="v").name == "tiny-sd2-v"
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"down_block_types": ["DownBlock2D"]}))
    with pytest.raises(CheckpointError, match="no preset matches.*describe no SD-shaped.*up_block_types"):
        dl.detect_diffusers(tmp_path)


def test_refiner_encoder_goes_to_the_second_folder():
    config = PRESETS["sdxl-refiner"]
    assert dl.folder_names(config)["text_encoder"] == "text_encoder_2"
    index = dl.model_index_json(config)
    assert index["text_encoder"] == [None, None]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert dl.scheduler_config_json(PRESETS["sd2-v"])["prediction_type"] == "v_prediction"


# --- SD2's text encoder: diffusers folders hold 23 of its 24 layers -----------------------------

def test_sd2_encoder_is_stored_as_diffusers_converts_it():
    """diffusers' single-file converter drops SD2's `resblocks.23`; the published config says 23 layers."""
    config = PRESETS["sd2-base"]
    ours = build_component("text_encoder", config).state_dict()  # meta: shapes only
    hf_config = HFCLIPTextConfig(**dl.text_encoder_config_json(config.text_encoders[0]))
    with torch.device("meta"):
        expected = convert_open_clip_checkpoint(HFCLIPTextModel(hf_config), single_file_state_dict(
            {"text_encoder": ours}, config))
    stored = dl.to_diffusers("text_encoder", ours, config)
    assert hf_config.num_hidden_layers == 23
    assert {k: v.shape for k, v in stored.items()} == {k: v.shape for k, v in expected.items()}
    layers = [dl.text_encoder_config_json(e)["num_hidden_layers"] for e in PRESETS["sdxl-base"].text_encoders]
    assert layers == [12, 32]  # SDXL reads hidden_states[-2] and pools the last layer: all kept


def test_sd2_folder_one_layer_short_loads_and_matches_transformers(tmp_path):
    config = PRESETS["tiny-sd2"]
    _save_with_diffusers(tmp_path, config)  # text_encoder/config.json: 1 of tiny-sd2's 2 layers
    encoder = load_components(tmp_path).text_encoders[0]
    hf = HFCLIPTextModel.from_pretrained(tmp_path / "text_encoder")
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = encoder(ids)[0], hf(ids).last_hidden_state
        last = encoder(ids, skip=1)[0]
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-5, f"max abs err {err:.2e}"
    assert torch.equal(last, ours)  # the restored last layer is zeros: an identity block


def test_sd2_folder_that_kept_every_layer_keeps_it(tmp_path):
    config = PRESETS["tiny-sd2"]
    _save_with_diffusers(tmp_path, config)
    full = dl.text_encoder_config_json(config.text_encoders[0]) | {"num_hidden_layers": 2}
    hf = HFCLIPTextModel(HFCLIPTextConfig(**full))
    hf.save_pretrained(tmp_path / "text_encoder")
    found, parts = dl.read_diffusers(tmp_path)
    assert found == config
    written = getattr(hf, "text_model", hf).encoder.layers[1].mlp.fc1.weight  # transformers 4 / 5
    assert torch.equal(parts["text_encoder"]["text_model.encoder.layers.1.mlp.fc1.weight"], written)
