import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from openldm.checkpoints import diffusers_layout as dl
from openldm.checkpoints.io import CheckpointError, read_state_dict, write_safetensors_atomic
from openldm.checkpoints.layout import TEXT_ENCODER_NAMES, UNET_PREFIX, VAE_PREFIX
from openldm.checkpoints.ldm_config import check_against, read_ldm_config
from openldm.checkpoints.load import all_finite, load_components
from openldm.checkpoints.openclip import openclip_to_hf
from openldm.checkpoints.save import parts_from_single_file
from openldm.config import (
    PRESETS,
    SD2_V,
    SD15,
    SDXL_BASE,
    SDXL_REFINER,
    TINY_SD1,
    TINY_SD2,
    TINY_SD2_V,
    TINY_SDXL,
    ModelConfig,
)
from tests.helpers import EMA_OFFSET, checkpoint_state_dict, make_checkpoint

# --- original yaml configs -----------------------------------------------------------------
# The facts of the public v1-inference.yaml, v2-inference-v.yaml, sd_xl_base.yaml and
# sd_xl_refiner.yaml, reduced to the fields we read.

_SD1_UNET = {
    "in_channels": 4, "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8, "transformer_depth": 1,
    "context_dim": 768, "use_spatial_transformer": True,
}
_SD2_UNET = {**_SD1_UNET, "num_heads": -1, "num_head_channels": 64, "context_dim": 1024,
             "use_linear_in_transformer": True}
_SDXL_UNET = {
    "adm_in_channels": 2816, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 4],
    "num_head_channels": 64, "use_linear_in_transformer": True, "transformer_depth": [1, 2, 10],
    "context_dim": 2048,
}
_REFINER_UNET = {
    "adm_in_channels": 2560, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
    "model_channels": 384, "attention_resolutions": [4, 2], "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "use_linear_in_transformer": True,
    "transformer_depth": 4, "context_dim": [1280, 1280, 1280, 1280],
}


def _ldm(unet: dict, conditioner: str, scale: float = 0.18215, **extra) -> dict:
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "scale_factor": scale, **extra,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "cond_stage_config": {"target": f"ldm.modules.encoders.modules.{conditioner}"},
    }}}


def _sgm(unet: dict, embedders: list[str], scaling: str = "EpsScaling") -> dict:
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": 0.13025,
        "denoiser_config": {"params": {"scaling_config": {
            "target": f"sgm.modules.diffusionmodules.denoiser_scaling.{scaling}"}}},
        "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "conditioner_config": {"params": {"emb_models": [
            {"target": f"sgm.modules.encoders.modules.{e}"} for e in embedders]}},
    }}}


def _write_yaml(path, doc: dict):
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("doc, config, prediction, family", [
    (_ldm(_SD1_UNET, "FrozenCLIPEmbedder"), SD15, "eps", "sd1"),
    (_ldm(_SD2_UNET, "FrozenOpenCLIPEmbedder", parameterization="v"), SD2_V, "v", "sd2"),
    (_sgm(_SDXL_UNET, ["FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2", "ConcatTimestepEmbedderND"]),
     SDXL_BASE, "eps", "sdxl"),
    (_sgm(_REFINER_UNET, ["FrozenOpenCLIPEmbedder2", "ConcatTimestepEmbedderND"]),
     SDXL_REFINER, "eps", "sdxl_refiner"),
])
def test_public_configs_read_and_agree_with_their_presets(tmp_path, doc, config, prediction, family):
    ldm = read_ldm_config(_write_yaml(tmp_path / "model.yaml", doc))
    assert (ldm.prediction, ldm.family) == (prediction, family)
    check_against(ldm, config)  # raises if any stated fact differs


def test_sgm_v_scaling_means_v_prediction(tmp_path):
    doc = _sgm(_SDXL_UNET, ["FrozenCLIPEmbedder"], scaling="VScaling")
    assert read_ldm_config(_write_yaml(tmp_path / "v.yaml", doc)).prediction == "v"


def test_a_yaml_of_another_family_is_refused(tmp_path):
    ldm = read_ldm_config(_write_yaml(tmp_path / "v1.yaml", _ldm(_SD1_UNET, "FrozenCLIPEmbedder")))
    with pytest.raises(CheckpointError, match=r"v1\.yaml describes another model.*family: yaml sd1, "
                       r"checkpoint sdxl.*context_dim: yaml 768, checkpoint 2048"):
        check_against(ldm, SDXL_BASE)


def test_bad_yaml_files_are_checkpoint_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("model: [unclosed")
    (tmp_path / "b.yaml").write_text("just: text\n")
    for name in ("a.yaml", "b.yaml", "missing.yaml"):
        with pytest.raises(CheckpointError, match=f"{name}: not an ldm/sgm model config"):
            read_ldm_config(tmp_path / name)
    doc = _ldm(_SD1_UNET, "FrozenCLIPEmbedder", parameterization="x0")
    with pytest.raises(CheckpointError, match="'x0' is not supported"):
        read_ldm_config(_write_yaml(tmp_path / "x0.yaml", doc))


def _tiny_yaml(path, config: ModelConfig, parameterization: str = "eps"):
    """An ldm yaml stating a tiny preset's facts, the way the public ones state the full-size ones."""
    u = config.unet
    unet = {"in_channels": u.in_channels, "out_channels": u.out_channels, "model_channels": u.model_channels,
            "channel_mult": list(u.channel_mult), "num_res_blocks": u.num_res_blocks,
            "attention_resolutions": [2**i for i, d in enumerate(u.transformer_depth) if d],
            "transformer_depth": max(u.transformer_depth), "context_dim": u.context_dim,
            "num_heads": u.num_heads or -1, "num_head_channels": u.num_head_channels or -1,
            "use_linear_in_transformer": u.use_linear_in_transformer}
    conditioner = "FrozenCLIPEmbedder" if config.family == "sd1" else "FrozenOpenCLIPEmbedder"
    return _write_yaml(path, _ldm(unet, conditioner, parameterization=parameterization))


# --- loading single files ------------------------------------------------------------------

def _unet_param(components, key="input_blocks.0.0.weight"):
    return components.unet.state_dict()[key]


@pytest.mark.parametrize("name, fmt", [("tiny-sd1", "safetensors"), ("tiny-sd2", "ckpt"),
                                       ("tiny-sdxl", "safetensors")])
def test_single_file_loads_every_tensor_where_it_belongs(tmp_path, name, fmt):
    config = PRESETS[name]
    path = make_checkpoint(tmp_path, config, fmt=fmt)
    c = load_components(path)
    assert c.config == config and (c.source, c.layout, c.ema, c.prediction_from) == (
        path, "single_file", False, "default")
    expected = parts_from_single_file(checkpoint_state_dict(config, extras=False), config)
    loaded = {"unet": c.unet, "vae": c.vae} | dict(zip(TEXT_ENCODER_NAMES, c.text_encoders))
    assert loaded.keys() == expected.keys()
    for part, module in loaded.items():
        state = module.state_dict()
        assert state.keys() == expected[part].keys(), part
        for key, value in state.items():
            assert not value.is_meta and torch.equal(value, expected[part][key]), f"{part}.{key}"
    assert not c.unet.training


def test_openclip_encoder_is_converted_from_the_original_names(tmp_path):
    state = checkpoint_state_dict(TINY_SD2)
    path = tmp_path / "sd2.safetensors"
    write_safetensors_atomic(path, state)
    prefix = "cond_stage_model.model."
    openclip = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    openclip = {k: v for k, v in openclip.items() if k not in ("logit_scale", "text_projection")}
    hf = openclip_to_hf(openclip, TINY_SD2.text_encoders[0])
    loaded = load_components(path).text_encoders[0].state_dict()
    assert loaded.keys() == hf.keys()
    assert all(torch.equal(loaded[k], hf[k]) for k in hf)


def test_dtype_casts_floating_weights(tmp_path):
    c = load_components(make_checkpoint(tmp_path, TINY_SD1), dtype=torch.float16)
    dtypes = {t.dtype for m in (c.unet, c.vae, *c.text_encoders) for t in m.state_dict().values()
              if t.is_floating_point()}
    assert dtypes == {torch.float16}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_as_stored(tmp_path, dtype):
    path = make_checkpoint(tmp_path, TINY_SD2, dtype=dtype)
    c = load_components(path)
    dtypes = {t.dtype for m in (c.unet, c.vae, *c.text_encoders) for t in m.state_dict().values()
              if t.is_floating_point()}
    assert dtypes == {dtype}
    stored = read_state_dict(path)[0][UNET_PREFIX + "input_blocks.0.0.weight"]
    assert torch.equal(_unet_param(c), stored)


def test_ema_weights_are_used_by_default_and_raw_on_request(tmp_path):
    path = make_checkpoint(tmp_path, TINY_SD1, ema=True)
    raw = read_state_dict(path)[0][UNET_PREFIX + "input_blocks.0.0.weight"]
    with_ema = load_components(path)
    assert with_ema.ema and torch.equal(_unet_param(with_ema), raw + EMA_OFFSET)
    without = load_components(path, ema=False)
    assert not without.ema and torch.equal(_unet_param(without), raw)
    vae_key = "encoder.conv_in.weight"  # EMA only ever replaces the UNet
    assert torch.equal(with_ema.vae.state_dict()[vae_key], without.vae.state_dict()[vae_key])


def test_ema_requested_but_absent_or_incomplete(tmp_path):
    with pytest.raises(CheckpointError, match="ema=True, but the file has no EMA weights"):
        load_components(make_checkpoint(tmp_path, TINY_SD1), ema=True)
    state = checkpoint_state_dict(TINY_SD1, ema=True)
    del state["model_ema.diffusion_modelout2weight"]
    path = write_safetensors_atomic(tmp_path / "partial.safetensors", state)
    with pytest.raises(CheckpointError, match=r"EMA UNet .*1 missing keys: model_ema\.diffusion_modelout2"):
        load_components(path)
    assert not load_components(path, ema=False).ema


# --- prediction sources --------------------------------------------------------------------

def test_prediction_comes_from_option_then_metadata_then_yaml(tmp_path):
    plain = make_checkpoint(tmp_path, TINY_SD2, name="plain")
    assert load_components(plain).config == TINY_SD2
    tagged = make_checkpoint(tmp_path, TINY_SD2, name="tagged", metadata={"openldm.prediction": "v"})
    c = load_components(tagged)
    assert (c.config, c.prediction_from) == (TINY_SD2_V, "metadata")
    c = load_components(tagged, prediction="eps")
    assert (c.config, c.prediction_from) == (TINY_SD2, "option")
    modelspec = make_checkpoint(tmp_path, TINY_SD2, name="spec", metadata={"modelspec.prediction_type": "v"})
    assert load_components(modelspec).config == TINY_SD2_V
    _tiny_yaml(tmp_path / "plain.yaml", TINY_SD2, parameterization="v")  # sidecar beside plain
    c = load_components(plain)
    assert (c.config, c.prediction_from) == (TINY_SD2_V, "yaml")
    _tiny_yaml(tmp_path / "tagged.yaml", TINY_SD2, parameterization="eps")
    assert load_components(tagged).config == TINY_SD2_V  # metadata beats the yaml
    other = _tiny_yaml(tmp_path / "other.yml", TINY_SD2, parameterization="eps")
    assert load_components(plain, config_file=other).config == TINY_SD2


def test_mismatched_sidecar_is_refused(tmp_path):
    path = make_checkpoint(tmp_path, TINY_SDXL)
    _tiny_yaml(tmp_path / "tiny-sdxl.yaml", TINY_SD1)
    with pytest.raises(CheckpointError, match="describes another model.*family: yaml sd1, checkpoint sdxl"):
        load_components(path)


def test_unknown_prediction_value_is_refused(tmp_path):
    path = make_checkpoint(tmp_path, TINY_SD1, metadata={"openldm.prediction": "x0"})
    with pytest.raises(CheckpointError, match="unknown prediction type 'x0'"):
        load_components(path)


# --- bad files -----------------------------------------------------------------------------

def _write(tmp_path, state, name="bad"):
    return write_safetensors_atomic(tmp_path / f"{name}.safetensors", state)


def test_missing_keys_are_listed(tmp_path):
    state = checkpoint_state_dict(TINY_SD1)
    del state[VAE_PREFIX + "decoder.norm_out.bias"]
    with pytest.raises(CheckpointError, match=r"vae does not fit .*1 missing keys: decoder\.norm_out\.bias"):
        load_components(_write(tmp_path, state))


def test_many_missing_keys_are_counted_not_all_listed(tmp_path):
    state = {k: v for k, v in checkpoint_state_dict(TINY_SD1).items() if ".mid." not in k}
    with pytest.raises(CheckpointError, match=r"vae does not fit .*\d+ missing keys: .*\.\.\. and \d+ more"):
        load_components(_write(tmp_path, state))


@pytest.mark.parametrize("key, listed", [
    (UNET_PREFIX + "input_blocks.0.0.extra", "unet does not fit the model: 1 unexpected keys: input_blocks"),
    ("cond_stage_model.mystery", "checkpoint does not fit the model: 1 unexpected keys: cond_stage_model"),
    ("something_else.weight", "checkpoint does not fit the model: 1 unexpected keys: something_else.weight"),
    ("model_ema.not_a_unet_weight", "EMA UNet does not fit the model: 1 unexpected keys: model_ema.not_a"),
])
def test_unexpected_keys_are_listed(tmp_path, key, listed):
    state = checkpoint_state_dict(TINY_SD1, ema="model_ema" in key)
    state[key] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=re.escape(listed)):
        load_components(_write(tmp_path, state))


def test_nan_weights_warn_with_their_names(tmp_path):
    state = checkpoint_state_dict(TINY_SD1)
    state[VAE_PREFIX + "decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
    state[UNET_PREFIX + "out.2.bias"][0] = float("inf")
    with pytest.warns(UserWarning) as record:
        load_components(_write(tmp_path, state))
    messages = [str(w.message) for w in record]
    assert any("unet: NaN or inf in 1 tensors: out.2.bias" in m for m in messages), messages
    assert any("vae: NaN or inf in 1 tensors: decoder.conv_out.weight" in m for m in messages), messages


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_finite_screen_is_exact_when_the_sum_overflows(dtype):
    big = torch.full((64,), torch.finfo(dtype).max, dtype=dtype)  # finite, but its sum is inf
    assert all_finite(big) and all_finite(-big) and all_finite(torch.zeros(0, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 63):
            t = big.clone()
            t[where] = bad
            assert not all_finite(t), (bad, where)
    mixed = torch.tensor([float("inf"), -float("inf"), 1.0], dtype=dtype)  # the sum is NaN, not inf
    assert not all_finite(mixed)


def test_non_model_files_are_refused_when_loading(tmp_path):
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}
    with pytest.raises(CheckpointError, match="LoRA"):
        load_components(_write(tmp_path, lora, "lora"))
    vae = {k[len(VAE_PREFIX):]: v for k, v in checkpoint_state_dict(TINY_SD1).items()
           if k.startswith(VAE_PREFIX)}
    with pytest.raises(CheckpointError, match="only a VAE"):
        load_components(_write(tmp_path, vae, "vae"))
    good = make_checkpoint(tmp_path, TINY_SD1)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors: corrupt or truncated"):
        load_components(cut)


def test_a_file_without_text_encoder_says_so(tmp_path):
    state = {k: v for k, v in checkpoint_state_dict(TINY_SD1).items() if not k.startswith("cond_stage")}
    with pytest.raises(CheckpointError, match="has no text_encoder"):
        load_components(_write(tmp_path, state))


# --- diffusers folders ---------------------------------------------------------------------

def _write_folder(root, config: ModelConfig, suffix: str = ".safetensors"):
    """A diffusers folder from a random single-file state dict, written with diffusers_layout.

    Returns what the folder holds in our names (SD2's encoder without its last layer: zeros there).
    """
    parts = parts_from_single_file(checkpoint_state_dict(config, extras=False), config)
    held = {}
    for name, folder in dl.folder_names(config).items():
        state = dl.to_diffusers(name, parts[name], config)
        held[name] = dl.from_diffusers(name, state, config)
        if name.startswith("text_encoder"):
            conf = dl.text_encoder_config_json(config.text_encoders[TEXT_ENCODER_NAMES.index(name)])
            stem = "model"
        else:
            conf, stem = getattr(dl, f"{name}_config_json")(config), "diffusion_pytorch_model"
        (root / folder).mkdir(parents=True)
        (root / folder / "config.json").write_text(json.dumps(conf))
        if suffix.endswith(".bin"):
            torch.save(state, root / folder / f"{stem}{suffix}")
        else:
            write_safetensors_atomic(root / folder / f"{stem}{suffix}", state)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(dl.scheduler_config_json(config)))
    (root / "model_index.json").write_text(json.dumps(dl.model_index_json(config)))
    return held


@pytest.mark.parametrize("config, suffix", [(TINY_SD1, ".safetensors"), (TINY_SD2_V, ".fp16.safetensors"),
                                            (TINY_SDXL, ".bin")])
def test_diffusers_folder_loads_the_same_weights(tmp_path, config, suffix):
    parts = _write_folder(tmp_path / "model", config, suffix)
    c = load_components(tmp_path / "model")
    assert c.config == config and c.layout == "diffusers" and c.prediction_from == "scheduler"
    loaded = {"unet": c.unet, "vae": c.vae} | dict(zip(TEXT_ENCODER_NAMES, c.text_encoders))
    for part, module in loaded.items():
        state = module.state_dict()
        assert state.keys() == parts[part].keys(), part
        assert all(torch.equal(state[k], parts[part][k]) for k in state), part
    assert load_components(tmp_path / "model", prediction="eps").config.prediction == "eps"


# --- memory --------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_full_size_sd15_peak_memory(tmp_path):
    """Peak RSS of loading a random full-size SD1.5 fp16 file, measured in a fresh process."""
    path = make_checkpoint(tmp_path, SD15, dtype=torch.float16)
    size_mib = path.stat().st_size / 2**20
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork and exec, so the child would
    # report this (pytest) process's peak, which just built the full-size model, instead of its own.
    script = textwrap.dedent(f"""
        import time
        from openldm.checkpoints.load import load_components
        start = time.perf_counter()
        c = load_components({str(path)!r})
        hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
        print(time.perf_counter() - start, int(hwm.split()[1]) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    seconds, peak_mib = map(float, out.stdout.split())
    print(f"file {size_mib:.0f} MiB, load {seconds:.1f} s, peak RSS {peak_mib:.0f} MiB")
    assert peak_mib < size_mib + 1024, f"peak RSS {peak_mib:.0f} MiB for a {size_mib:.0f} MiB file"
