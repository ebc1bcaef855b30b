"""SDXL size/crop conditioning and the base -> refiner hand-off, against diffusers on tiny random models.

Parity: tiny-sdxl and tiny-sdxl-refiner (random weights) are written as diffusers folders by our
`save_diffusers` and loaded by both sides. diffusers runs `StableDiffusionXLPipeline(denoising_end=f)`,
then `StableDiffusionXLImg2ImgPipeline(denoising_start=f)` on its latents, with one generator passed to
both (its ancestral noise then continues one stream, as ours does), and the refiner built with the base's
VAE, as the diffusers docs do it (openldm decodes with the calling pipeline's VAE). The start is matched
as in tests/test_pipeline.py. openldm gives cond and uncond the same sizes and crop; diffusers' refiner
defaults its negative crop to (0, 0), so it is told `negative_crops_coords_top_left`.
Measured on CPU, float32, diffusers 0.42.1, torch 2.13.0+cpu, 32x32 px, 8 steps, CFG 7, switch 0.8,
original size 40x48, crop (4, 8), target size 24x32 (`pytest -s` prints them):

    case                         latent max abs err (largest latent)   pixel max abs err
    base + refiner, Euler        1.3e-4 (42)                          0/255
    base + refiner, Euler a      2.0e-4 (67)                          0/255
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from openldm import cli
from openldm.checkpoints.save import parts_from_single_file, save_diffusers
from openldm.config import get_preset
from openldm.diffusion.noise import initial_noise
from openldm.diffusion.registry import resolve
from openldm.diffusion.sigmas import switch_step
from openldm.pipelines import loading
from openldm.pipelines import pipeline as pl
from openldm.pipelines.infotext import parse_infotext, read_png
from openldm.pipelines.outputs import read_settings, save_result
from openldm.pipelines.params import GenerationParams, params_from_infotext
from tests.helpers import checkpoint_state_dict, make_checkpoint

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, NEGATIVE = "a red circle on a blue square", "blurry, green"
SIZE, STEPS, CFG, SEED, SWITCH = 32, 8, 7.0, 1234, 0.8
FEW = 4  # steps where only our own behaviour is checked
SIZES = {"original_size": (40, 48), "crop_coords": (4, 8), "target_size": (24, 32)}  # (w, h), (top, left)
PIXEL_TOLERANCE = 2  # the bar: 2/255
LATENT_TOLERANCE = 1e-4  # relative to the largest latent value, as in tests/test_pipeline.py
SCHEDULERS = {"euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, one_thread):
    """Diffusers folders of a tiny base and a tiny refiner with different random weights."""
    out = {}
    for seed, name in enumerate(("tiny-sdxl", "tiny-sdxl-refiner")):
        config = get_preset(name)
        out[name] = tmp_path_factory.mktemp("models") / name
        parts = parts_from_single_file(checkpoint_state_dict(config, extras=False, seed=seed), config)
        save_diffusers(parts, out[name], config=config)
    return out


@pytest.fixture(scope="module")
def pipes(folders):
    return loading.load(folders["tiny-sdxl"]), loading.load(folders["tiny-sdxl-refiner"])


def _params(**changes) -> GenerationParams:
    settings = {"negative": NEGATIVE, "steps": STEPS, "cfg": CFG, "sampler": "euler", "schedule": "leading",
                "seed": SEED, "width": SIZE, "height": SIZE}
    return GenerationParams(PROMPT, **(settings | changes))


def _pixels(result: pl.Result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int64)


# --- parity ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def references(folders):
    """diffusers' base and refiner pipelines, the refiner sharing the base's VAE."""
    base = diffusers.StableDiffusionXLPipeline.from_pretrained(folders["tiny-sdxl"])
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(folders["tiny-sdxl-refiner"],
                                                                        vae=base.vae)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    return base, refiner


def _with_scheduler(references, folders, sampler: str):
    for pipe, folder in zip(references, (folders["tiny-sdxl"], folders["tiny-sdxl-refiner"])):
        pipe.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_pretrained(
            folder, subfolder="scheduler", timestep_spacing="leading", steps_offset=1)
    return references


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_base_then_refiner_matches_diffusers(folders, pipes, references, sampler):
    base, refiner = pipes
    noise = initial_noise(SEED, (4, SIZE // 2, SIZE // 2))[None]
    sigma_0 = resolve(sampler)[0].sigmas("leading", STEPS, base.schedule)[0]
    params = _params(sampler=sampler, refiner_switch=SWITCH, **SIZES)
    ours = base.generate(params, latents=noise * (sigma_0**2 + 1).sqrt() / sigma_0, refiner=refiner)[0]

    ref_base, ref_refiner = _with_scheduler(references, folders, sampler)
    hw = {"original_size": SIZES["original_size"][::-1], "crops_coords_top_left": SIZES["crop_coords"]}
    common = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "num_inference_steps": STEPS,
              "guidance_scale": CFG, "output_type": "latent",
              "generator": torch.Generator().manual_seed(SEED)}  # one stream through both pipelines
    handed = ref_base(height=SIZE, width=SIZE, latents=noise.clone(), denoising_end=SWITCH,
                      target_size=SIZES["target_size"][::-1], **hw, **common).images
    ref_latents = ref_refiner(image=handed, denoising_start=SWITCH, **hw, **common,
                              negative_crops_coords_top_left=SIZES["crop_coords"]).images
    with torch.no_grad():
        decoded = ref_base.vae.decode(ref_latents / ref_base.vae.config.scaling_factor).sample
    ref_pixels = (ref_base.image_processor.postprocess(decoded, output_type="np")[0] * 255).round()

    latent_err = (ours.latent - ref_latents).abs().max().item()
    scale = ref_latents.abs().max().item()
    pixel_err = np.abs(_pixels(ours) - ref_pixels).max()
    report = (f"base + refiner {sampler}: latent max abs err {latent_err:.2e} (latents up to {scale:.1f}), "
              f"pixel max abs err {pixel_err:.0f}/255")
    print(report)
    assert latent_err <= LATENT_TOLERANCE * max(scale, 1.0), report
    assert pixel_err <= PIXEL_TOLERANCE, report


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.8, 0.9, 1.0])
@pytest.mark.parametrize("schedule", ["leading", "karras"])
def test_switch_step_is_diffusers_denoising_end(pipes, fraction, schedule):
    """The base keeps the steps whose timestep is >= round((1 - f) T), as diffusers' `denoising_end`."""
    base, _ = pipes
    sigmas = resolve("euler")[0].sigmas(schedule, STEPS, base.schedule)
    timesteps = base.schedule.sigma_to_t(sigmas[:-1]).round()
    cutoff = int(round(1000 - fraction * 1000))
    assert switch_step(sigmas, base.schedule, fraction) == int((timesteps >= cutoff).sum())
    assert switch_step(sigmas, base.schedule, 1.0) == STEPS and switch_step(sigmas, base.schedule, 0.0) == 0
    with pytest.raises(ValueError, match="refiner switch must be in"):
        switch_step(sigmas, base.schedule, 1.5)


# --- our own guarantees -----------------------------------------------------------------------

def test_switch_one_is_the_base_alone_and_a_refiner_changes_the_image(pipes):
    base, refiner = pipes
    alone = base.generate(_params(steps=FEW))[0]
    assert alone.params.refiner_model is None
    unused = base.generate(_params(steps=FEW, refiner_switch=1.0), refiner=refiner)[0]
    assert np.array_equal(_pixels(unused), _pixels(alone))
    refined = base.generate(_params(steps=FEW, refiner_switch=0.5), refiner=refiner)[0]
    again = base.generate(_params(steps=FEW, refiner_switch=0.5), refiner=refiner)[0]
    assert refined.params.refiner_model == "tiny-sdxl-refiner"
    assert np.array_equal(_pixels(refined), _pixels(again))
    assert np.abs(_pixels(refined) - _pixels(alone)).max() > 2


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_sde"])  # Gaussian and Brownian noise
def test_a_split_run_draws_the_noise_of_an_unsplit_one(pipes, sampler):
    """The base as its own refiner: the two halves together are exactly one run, ancestral noise included."""
    base, _ = pipes
    params = _params(sampler=sampler, schedule=None, steps=FEW, refiner_switch=0.5)
    whole = base.generate(params)[0]
    split = base.generate(params, refiner=base)[0]
    assert torch.equal(split.latent, whole.latent)


def test_step_callback_counts_through_the_hand_off(pipes):
    base, refiner = pipes
    steps = []
    base.txt2img("x", steps=FEW, seed=1, width=SIZE, height=SIZE, refiner=refiner, refiner_switch=0.5,
                 callback=lambda i, total, x: steps.append((i, total)))
    assert steps == [(i, FEW) for i in range(1, FEW + 1)]


def test_the_refiner_keeps_an_inpainting_mask(pipes):
    """The refiner runs the last steps, so it must hold the unmasked latents to the image's too."""
    base, refiner = pipes
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (0, 0, SIZE // 2, SIZE))  # repaint the left half: latent columns 0-7
    result = base.generate(_params(steps=FEW, refiner_switch=0.5, mask_blur=0.0), image=image, mask=mask,
                           refiner=refiner)[0]
    kept, original = result.latent[..., SIZE // 4 :], base.encode_image(image)[..., SIZE // 4 :]
    assert torch.allclose(kept, original, atol=1e-4 * original.abs().max().item())
    assert not torch.allclose(result.latent, base.encode_image(image), atol=1e-2)


def test_a_refiner_must_continue_the_same_latents(pipes, tmp_path):
    base, _ = pipes
    sd1 = loading.load(make_checkpoint(tmp_path, "tiny-sd1"))
    with pytest.raises(ValueError, match="tiny-sd1 cannot refine tiny-sdxl"):
        base.generate(_params(), refiner=sd1)


# --- size and crop conditioning ----------------------------------------------------------------

def test_size_conditioning_defaults_to_the_image_size(pipes):
    base, _ = pipes
    default = base.generate(_params(steps=2))[0]
    explicit = base.generate(_params(steps=2, original_size=(SIZE, SIZE), target_size=(SIZE, SIZE),
                                     crop_coords=(0, 0)))[0]
    assert torch.equal(default.latent, explicit.latent)
    for name, value in SIZES.items():
        changed = base.generate(_params(steps=2, **{name: value}))[0]
        assert (changed.latent - default.latent).abs().max() > 1e-3, f"{name} changed nothing"


def test_sizes_and_refiner_survive_the_png(pipes, tmp_path):
    base, refiner = pipes
    result = base.generate(_params(steps=2, refiner_switch=0.5, **SIZES), refiner=refiner)[0]
    path = save_result(result, tmp_path / "a.png", "tiny-sdxl", "0123456789")
    assert read_settings(path).params == result.params
    text, _ = read_png(path)
    assert "Original size: 40x48" in text and 'Crop coords: "4,8"' in text and "Target size: 24x32" in text
    assert "Refiner: tiny-sdxl-refiner, Refiner switch at: 0.5" in text
    from_text = params_from_infotext(*parse_infotext(text))
    names = ("original_size", "crop_coords", "target_size", "refiner_model", "refiner_switch")
    assert {n: getattr(from_text, n) for n in names} == {n: getattr(result.params, n) for n in names}


# --- command line --------------------------------------------------------------------------------

def test_cli_refiner_and_sizes_regenerate_from_the_png(folders, tmp_path, capsys):
    base, refiner = folders["tiny-sdxl"], folders["tiny-sdxl-refiner"]
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    argv = ["txt2img", PROMPT, "--model", base, "--refiner", refiner, "--refiner-switch", "0.5", "--steps", 2,
            "--width", SIZE, "--height", SIZE, "--original-size", "40x48", "--crop-coords", "4,8",
            "--target-size", "24x32", "--seed", 7, "-o", first]
    assert cli.main([str(a) for a in argv]) == 0
    params = read_settings(first).params
    assert (params.original_size, params.crop_coords, params.target_size) == ((40, 48), (4, 8), (24, 32))
    assert (params.refiner_model, params.refiner_switch) == ("tiny-sdxl-refiner", 0.5)
    argv = ["txt2img", "--from-png", first, "--model", base, "--refiner", refiner, "-o", again]
    assert cli.main([str(a) for a in argv]) == 0
    assert read_png(again) == read_png(first)

    assert cli.main([str(a) for a in ["txt2img", "--from-png", first, "--model", base, "-o", again]]) == 0
    assert "used the refiner tiny-sdxl-refiner; pass it with --refiner" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["txt2img", "x", "--model", str(base), "--original-size", "40", "-o", str(again)])
    assert "--original-size: expected WIDTHxHEIGHT, got '40'" in capsys.readouterr().err
