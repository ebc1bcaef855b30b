"""The `openldm` command on tiny presets, and diffusers/transformers loading the folders it writes."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from openldm.checkpoints import diffusers_layout as dl
from openldm.checkpoints.io import read_metadata, read_state_dict
from openldm.checkpoints.layout import split_state_dict
from openldm.checkpoints.load import load_components
from openldm.cli import main
from openldm.config import PRESETS
from tests.helpers import make_checkpoint


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _init(capsys, tmp_path, preset: str, *extra: str):
    path = tmp_path / f"{preset}.safetensors"
    code, out, _ = _run(capsys, "init", preset, path, "--seed", "3", *extra)
    assert code == 0 and f"random {preset} weights" in out
    return path


def _tensors(path) -> dict[str, torch.Tensor]:
    return read_state_dict(path)[0]


@pytest.mark.parametrize("preset", ["tiny-sd1", "tiny-sdxl"])
def test_init_then_info_json(capsys, tmp_path, preset):
    path = _init(capsys, tmp_path, preset)
    code, out, _ = _run(capsys, "info", path, "--json")
    facts = json.loads(out)
    config = PRESETS[preset]
    parts, rest = split_state_dict(_tensors(path), config)
    assert code == 0 and not rest
    assert (facts["preset"], facts["family"], facts["prediction"]) == (preset, config.family, "eps")
    assert facts["parameters"] == {name: sum(t.numel() for t in p.values()) for name, p in parts.items()}
    assert facts["dtypes"] == {"float32": sum(len(p) for p in parts.values())}
    assert facts["ema"] is False and facts["metadata"]["openldm.preset"] == preset


def test_init_is_reproducible_and_takes_a_dtype(capsys, tmp_path):
    a = _init(capsys, tmp_path / "a", "tiny-sd2")
    b = _init(capsys, tmp_path / "b", "tiny-sd2")
    assert a.read_bytes() == b.read_bytes()
    half = _init(capsys, tmp_path / "c", "tiny-sd2", "--dtype", "bf16")
    assert {t.dtype for t in _tensors(half).values()} == {torch.bfloat16}


def test_info_table_and_prediction_flag(capsys, tmp_path):
    path = _init(capsys, tmp_path, "tiny-sd2")
    code, out, _ = _run(capsys, "info", path, "--prediction", "v")
    assert code == 0
    assert "tiny-sd2-v (family sd2, v prediction)" in out
    assert "unet" in out and "EMA" in out


def test_single_file_to_diffusers_and_back_keeps_every_used_tensor(capsys, tmp_path):
    source = _init(capsys, tmp_path, "tiny-sd2")  # OpenCLIP encoder: renamed both ways
    folder = tmp_path / "diffusers"
    code, out, _ = _run(capsys, "convert", source, folder, "--to", "diffusers")
    assert code == 0 and "verified: re-read all" in out and "without its last layer" in out
    code, out, _ = _run(capsys, "info", folder, "--json")
    assert json.loads(out)["preset"] == "tiny-sd2" and json.loads(out)["layout"] == "diffusers"
    back = tmp_path / "back.safetensors"
    code, out, _ = _run(capsys, "convert", folder, back, "--to", "single-file")
    assert code == 0 and "verified" in out
    original, again = _tensors(source), _tensors(back)
    assert again.keys() == original.keys()
    dropped = "cond_stage_model.model.transformer.resblocks.1."  # as published SD2 folders: zeros here
    assert all(torch.equal(again[k], original[k]) for k in original if not k.startswith(dropped))
    assert all(not again[k].any() for k in again if k.startswith(dropped))


def test_fp16_conversion_halves_the_size(capsys, tmp_path):
    source = _init(capsys, tmp_path, "tiny-sd1")
    half = tmp_path / "half.safetensors"
    code, out, _ = _run(capsys, "convert", source, half, "--to", "single-file", "--dtype", "fp16")
    assert code == 0 and "after the cast to fp16" in out
    ratio = half.stat().st_size / source.stat().st_size
    assert 0.49 < ratio < 0.52, ratio
    assert {t.dtype for t in _tensors(half).values()} == {torch.float16}
    assert read_metadata(half)["openldm.seed"] == "3"  # the source header is carried over


def test_prune_ema(capsys, tmp_path):
    source = make_checkpoint(tmp_path, "tiny-sd1", ema=True)
    code, out, _ = _run(capsys, "info", source, "--json")
    assert json.loads(out)["ema"] is True
    pruned = tmp_path / "pruned.safetensors"
    assert _run(capsys, "convert", source, pruned, "--to", "single-file", "--prune-ema")[0] == 0
    before, after = _tensors(source), _tensors(pruned)
    assert any(k.startswith("model_ema.") for k in before)
    assert after.keys() == {k for k in before if not k.startswith("model_ema.")}


@pytest.mark.parametrize("argv", [
    ("info", "{tmp}/missing.safetensors"),
    ("info", "{tmp}/garbage.safetensors"),
    ("convert", "{tmp}/missing.ckpt", "{tmp}/out", "--to", "diffusers"),
    ("info", "{tmp}"),  # a folder that is not a diffusers folder
])
def test_bad_paths_give_one_line_and_exit_2(capsys, tmp_path, argv):
    (tmp_path / "garbage.safetensors").write_bytes(b"not a checkpoint at all")
    code, out, err = _run(capsys, *(a.format(tmp=tmp_path) for a in argv))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"openldm {argv[0]}: error: ") and "Traceback" not in err


# --- diffusers and transformers load what we write ------------------------------------------

def _input_ids(batch: int, length: int) -> torch.Tensor:
    ids = torch.randint(1, 49406, (batch, length))
    ids[:, 0] = 49406
    ids[:, 5:] = 49407  # end token, then end-token padding (the first end token is pooled)
    return ids


def _check_text_encoders(folder, components):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    ids = _input_ids(2, components.config.text_encoders[0].max_length)
    for i, (ours, cfg) in enumerate(zip(components.text_encoders, components.config.text_encoders)):
        refiner = components.config.family == "sdxl_refiner"
        sub = "text_encoder_2" if refiner else ["text_encoder", "text_encoder_2"][i]
        cls = CLIPTextModelWithProjection if cfg.projection_dim else CLIPTextModel
        theirs, info = cls.from_pretrained(folder / sub, local_files_only=True, output_loading_info=True)
        assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        hidden, pooled = ours(ids)
        with torch.no_grad():
            out = theirs.eval()(ids, output_hidden_states=True)
        # The folder stores SD2's encoder a layer short, so its last layer is our penultimate one.
        expected = out.hidden_states[-1 if cfg.layer == "last" or dl.drops_last_layer(cfg) else -2]
        if cfg.final_norm:
            # transformers 5 flattened `CLIPTextModel` (no `text_model`); the projection model keeps it.
            text_model = theirs.text_model if cfg.projection_dim else theirs
            expected = text_model.final_layer_norm(expected)
        torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=0)
        if cfg.projection_dim:
            torch.testing.assert_close(pooled, out.text_embeds, atol=1e-5, rtol=0)


def _unet_inputs(config, unet):
    x = torch.randn(2, config.unet.in_channels, 8, 8)
    t = torch.tensor([10.0, 500.0])
    context = torch.randn(2, 7, config.unet.context_dim)
    extra, y = {}, None
    if config.unet.adm_in_channels:  # SDXL: pooled text + Fourier-embedded sizes, as diffusers builds it
        pooled = config.unet.adm_in_channels - unet.add_time_proj.num_channels * 6
        extra = {"text_embeds": torch.randn(2, pooled), "time_ids": torch.rand(2, 6) * 1024}
        sizes = unet.add_time_proj(extra["time_ids"].flatten()).reshape(2, -1)
        y = torch.cat([extra["text_embeds"], sizes], dim=1)
    return x, t, context, y, extra


@pytest.mark.parametrize("preset", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
def test_diffusers_and_transformers_load_our_folder(capsys, tmp_path, preset):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    folder = tmp_path / "diffusers"
    assert _run(capsys, "convert", _init(capsys, tmp_path, preset), folder, "--to", "diffusers")[0] == 0
    components = load_components(tmp_path / f"{preset}.safetensors")
    config = components.config
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True).eval()
    x, t, context, y, extra = _unet_inputs(config, unet)
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=context, added_cond_kwargs=extra).sample
        torch.testing.assert_close(components.unet(x, t, context, y), expected, atol=1e-5, rtol=0)
        vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True).eval()
        image = torch.rand(1, 3, 16, 16) * 2 - 1
        _check_vae(components.vae, vae, image)
        _check_text_encoders(folder, components)


def _check_vae(ours, theirs, image):
    moments = theirs.encode(image).latent_dist
    torch.testing.assert_close(ours.encode(image).mean, moments.mean, atol=1e-5, rtol=0)
    z = moments.mean
    torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, atol=1e-5, rtol=0)
