"""Writing checkpoints: exact round trips, casts, EMA pruning, atomic folders, verification that bites."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from openldm.checkpoints import diffusers_layout as dl
from openldm.checkpoints import save
from openldm.checkpoints.detect import detect
from openldm.checkpoints.io import CheckpointError, read_metadata, read_state_dict
from openldm.checkpoints.load import load_components
from openldm.config import PRESETS, TINY_SD2_V
from tests.helpers import checkpoint_state_dict, make_checkpoint


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("preset", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
def test_single_file_split_and_join_are_inverse(preset):
    """Includes the OpenCLIP text encoders: HF names and back to OpenCLIP, bit for bit."""
    config = PRESETS[preset]
    state = save.random_state_dict(config, seed=1)
    parts = save.parts_from_single_file(state, config)
    assert all(not k.startswith("transformer.") for name in parts if "text" in name for k in parts[name])
    assert _equal(save.single_file_state_dict(parts, config), state)


def test_random_state_dict_is_seeded_and_well_scaled():
    config = PRESETS["tiny-sdxl"]
    a, b = save.random_state_dict(config, seed=1), save.random_state_dict(config, seed=1)
    assert _equal(a, b)
    c = save.random_state_dict(config, seed=2, dtype=torch.bfloat16)
    key = "model.diffusion_model.out.2.weight"
    assert not torch.equal(c[key].float(), a[key])
    assert {t.dtype for t in c.values() if t.is_floating_point()} == {torch.bfloat16}
    assert detect({k: tuple(v.shape) for k, v in a.items()}) == config
    weight = a["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]  # 32 -> 32, 3x3
    assert abs(weight.std().item() * (32 * 9) ** 0.5 - 1) < 0.05, weight.std().item()
    assert torch.all(a["model.diffusion_model.input_blocks.1.0.in_layers.0.weight"] == 1)
    assert torch.all(a["model.diffusion_model.input_blocks.1.0.in_layers.0.bias"] == 0)


def test_components_write_back_to_the_same_file(tmp_path):
    source = make_checkpoint(tmp_path, "tiny-sd2", extras=False)
    components = load_components(source)
    out = save.save_single_file(components, tmp_path / "out.safetensors")
    assert _equal(read_state_dict(out)[0], read_state_dict(source)[0])
    assert read_metadata(out)[save.META_PRESET] == "tiny-sd2"


def test_fp16_cast_halves_the_file_and_verifies(tmp_path):
    state = save.random_state_dict(PRESETS["tiny-sd1"])
    full = save.save_single_file(state, tmp_path / "full.safetensors")
    half = save.save_single_file(state, tmp_path / "half.safetensors", dtype=torch.float16)
    ratio = half.stat().st_size / full.stat().st_size
    assert 0.49 < ratio < 0.52, ratio
    assert {t.dtype for t in read_state_dict(half)[0].values()} == {torch.float16}
    assert save.verify_single_file(half, state, dtype=torch.float16) == len(state)
    with pytest.raises(CheckpointError, match=r"\d+ differing"):
        save.verify_single_file(half, state)  # without the cast the values differ


def test_verification_catches_a_changed_or_missing_tensor(tmp_path):
    state = save.random_state_dict(PRESETS["tiny-sd1"])
    key = "model.diffusion_model.out.2.bias"
    tampered = dict(state) | {key: state[key] + 1e-3}
    save_file(tampered, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match=rf"1 differing \(e.g. {key}\)"):
        save.verify_single_file(tmp_path / "a.safetensors", state)
    save_file({k: v for k, v in state.items() if k != key}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match=rf"1 missing \(e.g. {key}\)"):
        save.verify_single_file(tmp_path / "b.safetensors", state)


def test_prune_ema_drops_only_the_ema_copy(tmp_path):
    state = checkpoint_state_dict("tiny-sd1", ema=True)
    ema_keys = {k for k in state if k.startswith(save.EMA_PREFIX)}
    assert len(ema_keys) > 100
    kept = save.save_single_file(state, tmp_path / "kept.safetensors")
    pruned = save.save_single_file(state, tmp_path / "pruned.safetensors", prune_ema=True)
    assert read_state_dict(kept)[0].keys() == state.keys()
    assert read_state_dict(pruned)[0].keys() == state.keys() - ema_keys
    assert save.verify_single_file(pruned, state, prune_ema=True) == len(state) - len(ema_keys)


def test_metadata_records_the_prediction_for_reloading(tmp_path):
    state = save.random_state_dict(TINY_SD2_V)
    path = save.save_single_file(state, tmp_path / "v.safetensors", config=TINY_SD2_V, metadata={"note": "x"})
    assert read_metadata(path) == {"note": "x", **save.model_metadata(TINY_SD2_V)}
    components = load_components(path)  # the keys alone would say tiny-sd2 (eps)
    assert (components.config.name, components.prediction_from) == ("tiny-sd2-v", "metadata")


@pytest.mark.parametrize("preset", ["tiny-sd2-v", "tiny-sdxl"])
def test_diffusers_folder_round_trip(tmp_path, preset):
    metadata = save.model_metadata(PRESETS[preset])
    components = load_components(make_checkpoint(tmp_path, preset, metadata=metadata))
    folder = save.save_diffusers(components, tmp_path / "out")
    index = json.loads((folder / "model_index.json").read_text())
    for name in ("unet", "vae", "text_encoder"):
        assert index[name][0] in ("diffusers", "transformers")
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "tokenizer" / "vocab.json").is_file()
    parts = save.component_parts(components)
    count = save.verify_diffusers(folder, parts, components.config)
    assert count == sum(len(p) for p in parts.values())
    again = load_components(folder)
    assert again.config == components.config
    for name, part in save.component_parts(again).items():  # SD2's dropped last layer reads back as zeros
        stored = dl.from_diffusers(name, dl.to_diffusers(name, parts[name], again.config), again.config)
        assert _equal(part, stored), name


def test_diffusers_folder_is_written_atomically(tmp_path, monkeypatch):
    components = load_components(make_checkpoint(tmp_path, "tiny-sd1"))
    write = save._write_component

    def fail_on_vae(root, name, *args):
        if name == "vae":
            raise OSError("disk full")
        write(root, name, *args)

    monkeypatch.setattr(save, "_write_component", fail_on_vae)
    with pytest.raises(OSError, match="disk full"):
        save.save_diffusers(components, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-sd1.safetensors"]
    monkeypatch.undo()
    save.save_diffusers(components, tmp_path / "out")
    save.save_diffusers(components, tmp_path / "out", dtype=torch.float16)  # replaces the folder whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny-sd1.safetensors"]
    unet = read_state_dict(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")[0]
    assert {t.dtype for t in unet.values()} == {torch.float16}


def test_refuses_to_replace_a_folder_that_is_not_a_diffusers_folder(tmp_path):
    components = load_components(make_checkpoint(tmp_path, "tiny-sd1"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a diffusers folder"):
        save.save_diffusers(components, tmp_path / "home")
    assert (tmp_path / "home" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "tiny-sd1.safetensors"]
