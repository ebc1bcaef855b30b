"""A standalone VAE in place of the model's (A1111's SD VAE): every form, strict, recorded in the infotext."""

from __future__ import annotations

import hashlib

import pytest
import torch

from openldm.checkpoints import diffusers_layout as dl
from openldm.checkpoints.io import CheckpointError, write_safetensors_atomic
from openldm.checkpoints.load import load_components
from openldm.checkpoints.save import parts_from_single_file, save_diffusers
from openldm.config import SHAPES, TINY_SD1, get_preset
from openldm.pipelines.params import GenerationParams
from tests.helpers import checkpoint_state_dict, make_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny-sd1 model, and a second VAE (other weights) in each form a VAE file takes."""
    root = tmp_path_factory.mktemp("vae")
    model = make_checkpoint(root, TINY_SD1)
    other = parts_from_single_file(checkpoint_state_dict(TINY_SD1, seed=9, extras=False), TINY_SD1)
    vae = other["vae"]
    original = root / "vae-ft-mse.safetensors"  # bare encoder./decoder. keys, plus the training loss
    write_safetensors_atomic(original, vae | {"loss.logvar": torch.zeros(())})
    save_diffusers(other, root / "diffusers", config=TINY_SD1)
    named = root / "fp16-fix.safetensors"  # a VAE in diffusers naming, as the SDXL fp16-fix ships
    write_safetensors_atomic(named, dl.to_diffusers("vae", vae, TINY_SD1))
    return model, vae, {"original": original, "folder": root / "diffusers" / "vae", "diffusers-named": named}


@pytest.mark.parametrize("form", ["original", "folder", "diffusers-named"])
def test_each_form_replaces_the_models_vae(files, form):
    model, vae, paths = files
    path = paths[form]
    components = load_components(model, vae=path)
    state = components.vae.state_dict()
    assert state.keys() == vae.keys() and all(torch.equal(state[k], vae[k]) for k in vae)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*.safetensors")) if path.is_dir() else [path]:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(file.read_bytes())
    assert components.vae_file == (path.name, digest.hexdigest()[:10])


def test_a_vae_for_another_model_is_refused(files, tmp_path):
    model, _, _ = files
    shapes_vae = parts_from_single_file(checkpoint_state_dict(SHAPES, extras=False), SHAPES)["vae"]
    write_safetensors_atomic(tmp_path / "other.safetensors", shapes_vae)
    wanted = r"other.safetensors: not a VAE for tiny-sd1 \(.* wrongly shaped"
    with pytest.raises(CheckpointError, match=wanted):
        load_components(model, vae=tmp_path / "other.safetensors")


def test_infotext_records_vae_and_its_hash_after_the_model(files):
    from PIL import Image

    from openldm.pipelines.outputs import result_infotext

    class Result:  # what `result_infotext` reads of a pipeline `Result`
        params = GenerationParams("a cat", seed=1, width=32, height=32)
        image = Image.new("RGB", (32, 32))
        mode = "txt2img"

    text = result_infotext(Result(), "model", "0123456789", ("vae-ft-mse.safetensors", "abcdef0123"))
    assert "Model: model, VAE hash: abcdef0123, VAE: vae-ft-mse.safetensors" in text


def test_a_vae_of_another_latent_scale_is_refused_in_one_line(files, tmp_path):
    """tiny-sdxl's VAE has tiny-sd1's shapes but scales latents by 0.13025: its folder's config.json tells."""
    model, _, _ = files
    config = get_preset("tiny-sdxl")
    save_diffusers(parts_from_single_file(checkpoint_state_dict(config, extras=False), config),
                   tmp_path / "sdxl", config=config)
    wanted = r"vae: a VAE for latents scaled by 0.13025 \(its config.json\); tiny-sd1's are scaled by 0.18"
    with pytest.raises(CheckpointError, match=wanted):
        load_components(model, vae=tmp_path / "sdxl" / "vae")


def test_a_vae_with_other_latent_channels_is_refused_by_its_channels(files, tmp_path):
    model, vae, _ = files
    wide = dict(vae)
    wide["post_quant_conv.weight"] = torch.zeros(8, 8, 1, 1)
    write_safetensors_atomic(tmp_path / "wide.safetensors", wide)
    with pytest.raises(CheckpointError, match="wide.safetensors: a VAE with 8 latent channels; tiny-sd1's "
                       "latents have 4"):
        load_components(model, vae=tmp_path / "wide.safetensors")
