"""Folders openldm writes, loaded by diffusers' own pipelines: no warnings, and openldm's image.

Covers what `test_pipeline.py` (tiny SD1, SD2-v, SDXL, inpainting) does not: the embedded model (own
596-token vocabulary, 8- and 4-group norms) and a non-preset architecture (BK-SDM-like: one res
block per level, no middle block). Both start from the same noise, 4 Euler steps at 32x32 px;
diffusers 0.42.1 / transformers 5.23.0, CPU, fp32. Measured: embedded 0/255, BK-SDM-like 0/255.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import openldm
from openldm.checkpoints.save import parts_from_single_file, random_state_dict, save_diffusers
from openldm.config import TINY_SD1
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


def _load_quietly(folder: Path):
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
            ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    ref.set_progress_bar_config(disable=True)
    complaints = records + [str(w.message) for w in caught]
    return ref, [c for c in complaints if not any(word in c for word in ENVIRONMENT)]


def _compare(pipe: pl.Pipeline, folder: Path, cfg: float) -> float:
    ref, complaints = _load_quietly(folder)
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
