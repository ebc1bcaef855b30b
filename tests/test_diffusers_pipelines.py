"""Folders diffusers' own pipelines load, both ways: no warnings, and the same image.

Our folders, for what `test_pipeline.py` (tiny SD1, SD2-v, SDXL, inpainting) does not cover: the
embedded model (own 596-token vocabulary, 8- and 4-group norms), a non-preset architecture (BK-SDM-like:
one res block per level, no middle block) and an fp16 folder loaded plainly (one dtype throughout).
Folders diffusers 0.42.1 + transformers 5.23.0 `save_pretrained` (tokenizer.json only; fp32 and fp16).
Both start from the same noise, 4 Euler steps at 32x32 px, CPU, fp32 compute. Measured (max abs pixel
error): embedded 0/255, BK-SDM-like 0/255, saved by diffusers: tiny-sd1 fp32 0, fp16 0, tiny-sd2-v
fp32 1, tiny-sdxl fp16 0 (`pytest -s` prints them).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import openldm
from openldm.checkpoints.save import parts_from_single_file, random_state_dict, save_diffusers
from openldm.config import TINY_SD1, get_preset
from openldm.diffusion.noise import initial_noise
from openldm.diffusion.registry import resolve
from openldm.pipelines import pipeline as pl
from openldm.pipelines.params import GenerationParams

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")
EMBEDDED = Path(openldm.__file__).parent / "weights" / "shapes"
PROMPT, NEGATIVE, STEPS, SEED, SIZE = "a red circle on a blue square", "green", 4, 7, 32
ENVIRONMENT = ("accelerate", "torchvision")  # notices about this machine's packages, not about the folder
BK_SDM_LIKE = replace(TINY_SD1, name="bk-sdm-like", unet=replace(
    TINY_SD1.unet, num_res_blocks=1, transformer_depth_middle=None))


def _pipeline_class(folder: Path):
    xl = "XL" in json.loads((folder / "model_index.json").read_text())["_class_name"]
    return diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline


def _load_quietly(folder: Path, **options):
    """diffusers' pipeline from our folder; every warning it or transformers gives is returned too."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                records.append(record.getMessage())

    handler = Collect()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ref = _pipeline_class(folder).from_pretrained(folder, **options)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    ref.set_progress_bar_config(disable=True)
    complaints = records + [str(w.message) for w in caught]
    return ref, [c for c in complaints if not any(word in c for word in ENVIRONMENT)]


def _compare(pipe: pl.Pipeline, folder: Path, cfg: float, ref=None) -> float:
    ref, complaints = (ref, []) if ref is not None else _load_quietly(folder)
    assert not complaints, complaints
    f = pipe.config.vae.downsample_factor
    noise = initial_noise(SEED, (pipe.config.latent_format.channels, SIZE // f, SIZE // f))[None]
    sigma_0 = resolve("euler")[0].sigmas("leading", STEPS, pipe.schedule)[0]
    params = GenerationParams(PROMPT, negative=NEGATIVE, steps=STEPS, cfg=cfg, sampler="euler",
                              schedule="leading", seed=SEED, width=SIZE, height=SIZE)
    ours = pipe.generate(params, latents=noise * (sigma_0**2 + 1).sqrt() / sigma_0)[0]
    image = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=cfg, height=SIZE,
                width=SIZE, latents=noise.clone(), output_type="np").images[0]
    err = float(np.abs(np.asarray(ours.image, dtype=np.float64) - (image * 255).round()).max())
    print(f"{pipe.config.name}: pixel max abs err {err:.0f}/255")
    return err


def test_embedded_model_folder_we_write_gives_diffusers_our_image(tmp_path):
    pipe = openldm.load(EMBEDDED)
    save_diffusers(pipe.components, tmp_path / "shapes")
    err = _compare(pipe, tmp_path / "shapes", pipe.config.guidance)
    assert err <= 1, f"embedded model: pixel max abs err {err:.0f}/255"


def test_non_preset_folder_we_write_gives_diffusers_our_image(tmp_path):
    parts = parts_from_single_file(random_state_dict(BK_SDM_LIKE, seed=3), BK_SDM_LIKE)
    save_diffusers(parts, tmp_path / "bk", config=BK_SDM_LIKE)
    pipe = openldm.load(tmp_path / "bk")
    assert pipe.config.name == "custom-sd1" and pipe.config.unet == BK_SDM_LIKE.unet
    err = _compare(pipe, tmp_path / "bk", 7.0)
    assert err <= 1, f"BK-SDM-like: pixel max abs err {err:.0f}/255"
    assert pipe.components.unet.middle_block is None


@pytest.mark.parametrize(("preset", "dtype"), [("tiny-sd1", torch.float32), ("tiny-sd1", torch.float16),
                                               ("tiny-sd2-v", torch.float32), ("tiny-sdxl", torch.float16)])
def test_folder_diffusers_saves_gives_openldm_diffusers_image(tmp_path, preset, dtype):
    """diffusers + transformers 5 `save_pretrained` (tokenizer.json only), fp32 or fp16 weights."""
    config = get_preset(preset)
    parts = parts_from_single_file(random_state_dict(config, seed=4), config)
    save_diffusers(parts, tmp_path / "ours", config=config)
    ref, _ = _load_quietly(tmp_path / "ours")
    ref.to(dtype).save_pretrained(tmp_path / "theirs")
    assert not (tmp_path / "theirs" / "tokenizer" / "vocab.json").exists()  # transformers 5: tokenizer.json
    ref, complaints = _load_quietly(tmp_path / "theirs", dtype=torch.float32)
    assert not complaints, complaints
    pipe = openldm.load(tmp_path / "theirs")
    assert pipe.config == config
    err = _compare(pipe, tmp_path / "theirs", 7.0, ref)
    assert err <= 1, f"{preset} saved by diffusers in {dtype}: pixel max abs err {err:.0f}/255"


def test_fp16_folder_we_write_loads_in_one_dtype(tmp_path):
    """A plain `from_pretrained` of our fp16 folder computes in float32 throughout (no mixed dtypes)."""
    parts = parts_from_single_file(random_state_dict(TINY_SD1, seed=5), TINY_SD1)
    save_diffusers(parts, tmp_path / "half", config=TINY_SD1, dtype=torch.float16)
    ref, complaints = _load_quietly(tmp_path / "half")
    assert not complaints, complaints
    assert {ref.unet.dtype, ref.vae.dtype, ref.text_encoder.dtype} == {torch.float32}
    err = _compare(openldm.load(tmp_path / "half"), tmp_path / "half", 7.0, ref)
    assert err <= 1, f"fp16 folder: pixel max abs err {err:.0f}/255"
