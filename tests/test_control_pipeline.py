"""ControlNet runs against diffusers' `StableDiffusionControlNetPipeline` / `...XLControlNetPipeline`.

The base model is `test_pipeline`'s tiny random checkpoint as a diffusers folder; each ControlNet is
random (zero convs too, so that it changes the image), saved in the original layout for openldm and
converted for diffusers. Same starting noise, Euler, 8 steps, CFG 7 at 32x32 px; we compare final
latents (relative to the largest, as test_pipeline does) and 8-bit images. diffusers'
`control_guidance_start/end` keep a net on step i of N when i/N >= start and (i+1)/N <= end, which is
the rule `ControlUnit.acts_at` follows.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from openldm.checkpoints.controlnet import PREFIX
from openldm.config import controlnet_config
from openldm.diffusion.noise import initial_noise
from openldm.pipelines.control import ControlUnit
from openldm.pipelines.outputs import result_infotext
from openldm.pipelines.params import GenerationParams
from tests.test_controlnet import controlnet_pair
from tests.test_pipeline import (
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
