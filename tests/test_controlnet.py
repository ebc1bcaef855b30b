"""ControlNet against diffusers' `ControlNetModel` (0.42.1), and its loading from every layout.

Our random weights go to diffusers through `checkpoints.controlnet.to_diffusers` and are loaded
strictly there; both must compute the same residuals, and our UNet must add them where diffusers'
`down_block_additional_residuals` / `mid_block_additional_residual` do.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from diffusers import ControlNetModel
from safetensors.torch import save_file

from openldm.checkpoints.controlnet import PREFIX, infer_config, load_controlnet, to_diffusers
from openldm.checkpoints.errors import CheckpointError
from openldm.config import CONTROLNET_PRESETS, ControlNetConfig
from openldm.models.controlnet import ControlNet
from tests.test_unet import build_pair, diffusers_config, inputs, randomize, sdxl_vector

TINY = [CONTROLNET_PRESETS[n] for n in ("tiny-sd1", "tiny-sd2", "tiny-sdxl")]
IDS = ["sd1", "sd2", "sdxl"]


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    logging.getLogger("diffusers").setLevel(logging.ERROR)


def controlnet_pair(cfg: ControlNetConfig, seed: int = 0) -> tuple[ControlNet, ControlNetModel]:
    """Our ControlNet with random weights (zero convs too), and diffusers' with the same weights."""
    ours = ControlNet(cfg)
    randomize(ours, seed)
    config = {
        k: v for k, v in diffusers_config(cfg.unet).items() if k not in ("out_channels", "up_block_types")
    }
    config |= {
        "conditioning_channels": cfg.hint_channels,
        "conditioning_embedding_out_channels": cfg.hint_widths,
    }
    theirs = ControlNetModel(**config)
    theirs.load_state_dict(to_diffusers(ours.state_dict(), cfg), strict=True)
    return ours.eval(), theirs.eval()


def control_inputs(cfg: ControlNetConfig, batch: int = 2, size: int = 8) -> dict:
    a = inputs(cfg.unet, batch=batch, size=size, timesteps=[3.0, 741.5][:batch])
    a["hint"] = torch.rand(
        batch,
        cfg.hint_channels,
        cfg.hint_factor * size,
        cfg.hint_factor * size,
        generator=torch.Generator().manual_seed(5),
    )
    a["y"] = sdxl_vector(a["text_embeds"], a["time_ids"]) if "time_ids" in a else None
    return a


@torch.no_grad()
def theirs_residuals(theirs: ControlNetModel, a: dict) -> list[torch.Tensor]:
    added = {"text_embeds": a["text_embeds"], "time_ids": a["time_ids"]} if "time_ids" in a else None
    down, mid = theirs(
        a["x"], a["timesteps"], a["context"], a["hint"], added_cond_kwargs=added, return_dict=False
    )
    return [*down, mid]


@pytest.mark.parametrize("cfg", TINY, ids=IDS)
@torch.no_grad()
def test_residuals_match_diffusers(cfg):
    ours, theirs = controlnet_pair(cfg)
    a = control_inputs(cfg)
    mine = ours(a["x"], a["hint"], a["timesteps"], a["context"], a["y"])
    ref = theirs_residuals(theirs, a)
    assert len(mine) == len(ref) == cfg.outputs
    scale = min(r.abs().max().item() for r in ref)
    assert scale > 0.05, f"residuals too small ({scale}) for the comparison to mean anything"
    # Residuals reach ~15 after a stack of random transformers: the error is relative to each one's max.
    err = max(((m - r).abs().max() / r.abs().max()).item() for m, r in zip(mine, ref))
    assert err <= 1e-5, f"{cfg.family}: max abs error {err:.3g} of the residual's largest value"


@pytest.mark.parametrize("cfg", TINY, ids=IDS)
@torch.no_grad()
def test_unet_adds_residuals_as_diffusers_does(cfg):
    ours, theirs = build_pair(cfg.unet)
    a = control_inputs(cfg)
    g = torch.Generator().manual_seed(9)
    residuals = [
        torch.randn(r.shape, generator=g)
        for r in ControlNet(cfg)(a["x"], a["hint"], a["timesteps"], a["context"], a["y"])
    ]
    added = {"text_embeds": a["text_embeds"], "time_ids": a["time_ids"]} if "time_ids" in a else None
    mine = ours(a["x"], a["timesteps"], a["context"], a["y"], control=residuals)
    ref = theirs(
        a["x"],
        a["timesteps"],
        a["context"],
        added_cond_kwargs=added,
        down_block_additional_residuals=residuals[:-1],
        mid_block_additional_residual=residuals[-1],
    ).sample
    plain = ours(a["x"], a["timesteps"], a["context"], a["y"])
    err = (mine - ref).abs().max().item()
    assert (mine - plain).abs().max() > 0.1, "the residuals changed nothing"
    assert err <= 1e-5, f"{cfg.family}: max abs error {err:.3g}"


def test_unet_refuses_the_wrong_number_of_residuals():
    cfg = TINY[0]
    ours, _ = build_pair(cfg.unet)
    a = control_inputs(cfg, batch=1)
    with pytest.raises(ValueError, match="control residuals"):
        ours(a["x"], a["timesteps"], a["context"], control=[torch.zeros(1)] * 3)


@pytest.mark.parametrize("cfg", TINY, ids=IDS)
def test_config_is_read_from_shapes(cfg):
    with torch.device("meta"):
        state = ControlNet(cfg).state_dict()
    assert infer_config({k: tuple(v.shape) for k, v in state.items()}) == cfg


def test_shallower_variant_is_read_as_what_it_is():
    """SDXL "small"/"mid" ControlNets keep the UNet's widths with fewer transformer layers."""
    base = CONTROLNET_PRESETS["tiny-sdxl"]
    small = replace(base, unet=replace(base.unet, transformer_depth=(0, 1, 1), transformer_depth_middle=1))
    with torch.device("meta"):
        state = ControlNet(small).state_dict()
    assert infer_config({k: tuple(v.shape) for k, v in state.items()}) == small != base


def _save_layouts(tmp_path, cfg: ControlNetConfig, model: ControlNet) -> dict:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    paths = {
        "prefixed": tmp_path / "c.safetensors",
        "bare": tmp_path / "bare.pth",
        "diffusers_file": tmp_path / "d.safetensors",
        "diffusers_folder": tmp_path / "folder",
    }
    save_file({PREFIX + k: v for k, v in state.items()}, paths["prefixed"])
    torch.save(state, paths["bare"])
    diffusers_state = {k: v.contiguous() for k, v in to_diffusers(state, cfg).items()}
    save_file(diffusers_state, paths["diffusers_file"])
    paths["diffusers_folder"].mkdir()
    save_file(diffusers_state, paths["diffusers_folder"] / "diffusion_pytorch_model.safetensors")
    return paths


@pytest.mark.parametrize("cfg", TINY, ids=IDS)
def test_every_layout_loads_to_the_same_weights(tmp_path, cfg):
    model = ControlNet(cfg)
    randomize(model, seed=2)
    for layout, path in _save_layouts(tmp_path, cfg, model).items():
        loaded = load_controlnet(path, cfg)
        assert loaded.cfg == cfg, layout
        got = loaded.state_dict()
        assert all(torch.equal(got[k], v) for k, v in model.state_dict().items()), layout


def test_refuses_what_is_not_a_controlnet(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, path)
    with pytest.raises(CheckpointError, match="is not a ControlNet"):
        load_controlnet(path)


def test_refuses_a_controlnet_of_another_family(tmp_path):
    sdxl, sd1 = CONTROLNET_PRESETS["tiny-sdxl"], CONTROLNET_PRESETS["tiny-sd1"]
    path = tmp_path / "c.safetensors"
    save_file({k: v.contiguous() for k, v in ControlNet(sdxl).state_dict().items()}, path)
    with pytest.raises(CheckpointError, match="cannot steer a sd1 model"):
        load_controlnet(path, sd1)
