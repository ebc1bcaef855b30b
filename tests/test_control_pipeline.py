"""ControlNet runs against diffusers' `StableDiffusionControlNetPipeline` / `...XLControlNetPipeline`.

The base model is `test_pipeline`'s tiny random checkpoint as a diffusers folder; each ControlNet is
random (zero convs too, so that it changes the image), saved in the original layout for openldm and
converted for diffusers. Same starting noise, Euler, 8 steps, CFG 7 at 32x32 px; we compare final
latents (relative to the largest, as test_pipeline does) and 8-bit images. diffusers'
`control_guidance_start/end` keep a net on step i of N when i/N >= start and (i+1)/N <= end, which is
the rule `ControlUnit.acts_at` follows.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from openldm.checkpoints.controlnet import PREFIX, from_diffusers, load_controlnet
from openldm.checkpoints.save import parts_from_single_file, save_diffusers
from openldm.config import SD15, controlnet_config
from openldm.diffusion.noise import initial_noise
from openldm.diffusion.registry import resolve
from openldm.pipelines import loading
from openldm.pipelines.control import ControlUnit
from openldm.pipelines.outputs import result_infotext
from openldm.pipelines.params import GenerationParams
from tests.helpers import checkpoint_state_dict
from tests.test_controlnet import control_inputs, controlnet_pair, theirs_residuals
from tests.test_pipeline import (
    CFG,
    NEGATIVE,
    PROMPT,
    REF_ARGS,
    SAMPLERS,
    SEED,
    SIZE,
    _compare,
    _decode,
    _diffusers_start,
    _latent_shape,
    _ours,
    _with_scheduler,
    models,  # noqa: F401  (the fixture)
)
from tests.test_unet import diffusers_config, randomize

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")
EULER = SAMPLERS["euler"]


def _control_image(seed: int) -> Image.Image:
    """Shapes on black, as a canny or scribble map looks."""
    image = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(image)
    g = np.random.default_rng(seed)
    for _ in range(3):
        x0, y0 = g.integers(0, SIZE // 2, 2)
        draw.rectangle([int(x0), int(y0), int(x0) + 12, int(y0) + 10], outline=(255, 255, 255), width=2)
    return image


def _controlnets(tmp_path, pipe, count: int, seeds=(11, 12)):
    """(paths of original-layout files, diffusers ControlNetModels) on the same random weights."""
    paths, theirs = [], []
    for i in range(count):
        ours, ref = controlnet_pair(controlnet_config(pipe.config), seed=seeds[i])
        path = tmp_path / f"cn{i}.safetensors"
        save_file({PREFIX + k: v.contiguous() for k, v in ours.state_dict().items()}, path)
        paths.append(path)
        theirs.append(ref)
    return paths, theirs


def _reference(ref, controlnets, images, preset: str, **kwargs):
    cls = (
        diffusers.StableDiffusionXLControlNetPipeline
        if "sdxl" in preset
        else diffusers.StableDiffusionControlNetPipeline
    )
    net = controlnets[0] if len(controlnets) == 1 else controlnets
    pipe = cls.from_pipe(ref, controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    pipe.folder = ref.folder
    return _with_scheduler(pipe, EULER), (images[0] if len(images) == 1 else images), kwargs


CASES = {
    "one": dict(weights=(0.8,), starts=(0.0,), ends=(1.0,)),
    "two-start-end": dict(weights=(1.0, 0.6), starts=(0.0, 0.25), ends=(0.5, 1.0)),
    "guess": dict(weights=(1.0,), starts=(0.0,), ends=(1.0,), guess=True),
}


@pytest.mark.parametrize("preset", ["tiny-sd1", "tiny-sdxl"])
@pytest.mark.parametrize("case", list(CASES))
def test_controlnet_matches_diffusers(models, tmp_path, preset, case):  # noqa: F811
    spec = CASES[case]
    pipe, ref = models(preset)
    count = len(spec["weights"])
    paths, theirs = _controlnets(tmp_path, pipe, count)
    images = [_control_image(s) for s in range(count)]
    guess = spec.get("guess", False)
    units = [
        ControlUnit(p, im, w, s, e, guess=guess)
        for p, im, w, s, e in zip(paths, images, spec["weights"], spec["starts"], spec["ends"])
    ]
    noise = initial_noise(SEED, _latent_shape(pipe))[None]
    ours = _ours(pipe, EULER, _diffusers_start(pipe, EULER, noise), controls=units)
    plain = _ours(pipe, EULER, _diffusers_start(pipe, EULER, noise))
    control_pipe, image, _ = _reference(ref, theirs, images, preset)
    one = count == 1
    ref_latents = control_pipe(
        **REF_ARGS,
        height=SIZE,
        width=SIZE,
        latents=noise.clone(),
        image=image,
        guess_mode=guess,
        controlnet_conditioning_scale=spec["weights"][0] if one else list(spec["weights"]),
        control_guidance_start=spec["starts"][0] if one else list(spec["starts"]),
        control_guidance_end=spec["ends"][0] if one else list(spec["ends"]),
    ).images
    assert (ours.latent - plain.latent).abs().max() > 0.1, "the ControlNet changed nothing"
    _compare(f"controlnet {preset} {case}", ours, control_pipe, ref_latents)
    pixel_err = np.abs(np.asarray(ours.image, dtype=np.float64) - _decode(control_pipe, ref_latents)).max()
    assert pixel_err <= 1, (
        f"controlnet {preset} {case}: pixel max abs err {pixel_err:.0f}/255 (the bar: 1/255)"
    )


def test_infotext_records_each_unit(models, tmp_path):  # noqa: F811
    pipe, _ = models("tiny-sd1")
    paths, _ = _controlnets(tmp_path, pipe, 2)
    units = [
        ControlUnit(paths[0], _control_image(0), 0.5, 0.1, 0.9, resize_mode="crop", preprocessor="canny"),
        ControlUnit(paths[1], _control_image(1), mode="prompt"),
    ]
    result = pipe.generate(GenerationParams("a", steps=2, seed=1, width=SIZE, height=SIZE), controls=units)[0]
    text = result_infotext(result)
    assert (
        'ControlNet 0: "Module: canny, Model: cn0, Weight: 0.5, Resize Mode: Crop and Resize, '
        'Guidance Start: 0.1, Guidance End: 0.9, Control Mode: Balanced"'
    ) in text
    assert 'ControlNet 1: "Module: none, Model: cn1, Weight: 1, Resize Mode: Just Resize' in text
    assert "Control Mode: My prompt is more important" in text


def test_control_modes_scale_as_the_a1111_extension():
    image = _control_image(0)
    model = "control_v11p_sd15_canny.safetensors"  # never loaded: the scales are the unit's own
    balanced, prompt, control = (
        ControlUnit(model, image, 0.5, mode=m) for m in ("balanced", "prompt", "control")
    )
    assert balanced.scales(13) == [0.5] * 13
    assert prompt.scales(13)[-1] == 0.5 and prompt.scales(13)[0] == pytest.approx(0.5 * 0.825**12)
    assert prompt.scales(10)[-1] == pytest.approx(0.5 * 0.825**3)  # SDXL: the first 10 of the 13
    assert (balanced.cond_only, prompt.cond_only, control.cond_only) == (False, False, True)
    guess = ControlUnit(model, image, 2.0, guess=True)
    assert guess.cond_only and guess.scales(3) == pytest.approx([0.2, 2.0 * 10**-0.5, 2.0])


def test_schedule_fractions_follow_diffusers():
    unit = ControlUnit("x", _control_image(0), start=0.25, end=0.5)
    assert [unit.acts_at(i, 8) for i in range(8)] == [False, False, True, True, False, False, False, False]
    with pytest.raises(ValueError, match="start 0.6 and end 0.5: need"):
        ControlUnit("x", _control_image(0), start=0.6, end=0.5)


# --- full size (slow) -------------------------------------------------------------------------

FULL_SIZE, FULL_STEPS = 256, 4  # 4 steps: unit 0 of "two-start-end" acts on steps 0-1, unit 1 on 1-3
FULL_CASES = ("one", "two-start-end")


def _full_controlnet(seed: int, path):
    """diffusers' ControlNetModel from the SD1.5 config, every weight random, saved in the original layout."""
    cfg = controlnet_config(SD15)
    drop = ("out_channels", "up_block_types")
    unet = {k: v for k, v in diffusers_config(cfg.unet).items() if k not in drop}
    theirs = diffusers.ControlNetModel(**unet, conditioning_channels=cfg.hint_channels,
                                       conditioning_embedding_out_channels=cfg.hint_widths)
    randomize(theirs, seed)
    save_file({PREFIX + k: v.contiguous() for k, v in from_diffusers(theirs.state_dict()).items()}, path)
    return theirs.eval()


@torch.no_grad()
def _check_residuals(i: int, mine, ref) -> None:
    """Our loaded ControlNet against diffusers' at 256 px: relative to each residual's largest value."""
    for t in (999.0, 500.0, 20.0):
        a = control_inputs(controlnet_config(SD15), batch=1, size=FULL_SIZE // 8)
        a["timesteps"] = torch.tensor([t])
        got, want = mine(a["x"], a["hint"], a["timesteps"], a["context"], None), theirs_residuals(ref, a)
        abs_err = max((g - w).abs().max().item() for g, w in zip(got, want))
        rel_err = max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want))
        report = (f"full-size SD1.5 ControlNet {i} residuals t={t:g}: max abs err {abs_err:.2e} (residuals "
                  f"up to {max(w.abs().max().item() for w in want):.3g}), relative {rel_err:.2e}")
        print(report)
        assert min(w.abs().max().item() for w in want) > 0.05, f"residuals too small to compare: {report}"
        assert rel_err <= 1e-5, report


def _full_images(case: str) -> list[Image.Image]:
    return [_control_image(s).resize((FULL_SIZE, FULL_SIZE), Image.NEAREST)
            for s in range(len(CASES[case]["weights"]))]


def _full_units(nets, case: str) -> list[ControlUnit]:
    spec = CASES[case]
    return [ControlUnit(m, im, w, s, e) for m, im, w, s, e in
            zip(nets, _full_images(case), spec["weights"], spec["starts"], spec["ends"])]


def _full_ours(folder, nets, noise: torch.Tensor) -> dict:
    """Each case's result from openldm, with its time; the pipeline is freed when this returns."""
    pipe = loading.load(folder)
    sigma_0 = resolve(EULER.sampler)[0].sigmas(EULER.schedule, FULL_STEPS, pipe.schedule)[0]
    start = noise * (sigma_0**2 + 1).sqrt() / sigma_0  # diffusers' start (see test_pipeline's docstring)
    params = GenerationParams(PROMPT, negative=NEGATIVE, steps=FULL_STEPS, cfg=CFG, sampler=EULER.sampler,
                              schedule=EULER.schedule, seed=SEED, width=FULL_SIZE, height=FULL_SIZE)
    out = {}
    for case in FULL_CASES:
        clock = time.perf_counter()
        result = pipe.generate(params, latents=start, controls=_full_units(nets, case))[0]
        out[case] = (result, time.perf_counter() - clock)
    return out


def _full_theirs(ref, controlnets, case: str, noise: torch.Tensor):
    """diffusers' pipeline for the case and its final latents, with its time."""
    spec, images = CASES[case], _full_images(case)
    one = len(images) == 1
    control_pipe, image, _ = _reference(ref, controlnets[: len(images)], images, "sd15")
    clock = time.perf_counter()
    latents = control_pipe(
        **(REF_ARGS | {"num_inference_steps": FULL_STEPS}), height=FULL_SIZE, width=FULL_SIZE,
        latents=noise.clone(), image=image,
        controlnet_conditioning_scale=spec["weights"][0] if one else list(spec["weights"]),
        control_guidance_start=spec["starts"][0] if one else list(spec["starts"]),
        control_guidance_end=spec["ends"][0] if one else list(spec["ends"]),
    ).images
    return control_pipe, latents, time.perf_counter() - clock


@pytest.mark.slow
def test_full_size_sd15_controlnet_matches_diffusers(tmp_path):
    """Random full-size SD1.5 and two SD1.5 ControlNets: residuals, then images at 256 px, 4 Euler steps.

    Memory stays near 10 GB: openldm's side runs, and is freed, before diffusers' base model is loaded.
    """
    clock = time.perf_counter()
    folder = tmp_path / "sd15"
    save_diffusers(parts_from_single_file(checkpoint_state_dict(SD15, extras=False), SD15), folder,
                   config=SD15)
    paths = [tmp_path / f"cn{i}.safetensors" for i in range(2)]
    theirs = [_full_controlnet(11 + i, p) for i, p in enumerate(paths)]
    ours = [load_controlnet(p, controlnet_config(SD15)) for p in paths]
    print(f"random full-size SD1.5 and two ControlNets built, saved in {time.perf_counter() - clock:.0f} s")
    for i, (mine, ref) in enumerate(zip(ours, theirs)):
        _check_residuals(i, mine, ref)
    f = SD15.vae.downsample_factor
    noise = initial_noise(SEED, (4, FULL_SIZE // f, FULL_SIZE // f))[None]
    results = _full_ours(folder, ours, noise)
    del ours
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ref.folder = folder
    for case in FULL_CASES:
        control_pipe, latents, took = _full_theirs(ref, theirs, case, noise)
        result, ours_took = results[case]
        label = f"full-size SD1.5 controlnet {case} (openldm {ours_took:.0f} s, diffusers {took:.0f} s)"
        _compare(label, result, control_pipe, latents)
        pixel_err = np.abs(np.asarray(result.image, dtype=np.float64) - _decode(control_pipe, latents)).max()
        assert pixel_err <= 1, f"{label}: pixel max abs err {pixel_err:.0f}/255 (the bar: 1/255)"
