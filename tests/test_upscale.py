"""The hires fix (`pipelines.upscale`): A1111's sizes, latent modes, second-pass settings, prompt schedule."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from openldm.pipelines import loading
from openldm.pipelines.params import UPSCALER_NAMES, GenerationParams, hires_size, upscaler_key
from openldm.pipelines.upscale import LATENT_MODES, enlarge
from tests.helpers import make_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
BASE = GenerationParams("a red circle", steps=2, hires_steps=4, cfg=5.0, seed=3, width=16, height=16,
                        hires=True, hires_strength=0.6)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, one_thread):
    return loading.load(make_checkpoint(tmp_path_factory.mktemp("model"), "tiny-sd1", seed=2))


def pixels(pipe, params: GenerationParams) -> np.ndarray:
    return np.asarray(pipe.generate(params)[0].image, dtype=np.int16)


# --- sizes and upscalers ---------------------------------------------------------------------

@pytest.mark.parametrize(("base", "settings", "final", "enlarged"), [
    ((512, 768), {"upscale_by": 2.0}, (1024, 1536), (1024, 1536)),
    ((512, 512), {"upscale_by": 1.37}, (696, 696), (696, 696)),  # int(701.44) = 701, floored to 8
    ((512, 768), {"hires_width": 1024}, (1024, 1536), (1024, 1536)),  # hr_resize_y 0: the aspect is kept
    ((512, 768), {"hires_height": 1024}, (680, 1024), (680, 1024)),  # 1024 * 512 // 768 = 682 -> 680
    ((512, 768), {"hires_width": 1024, "hires_height": 1024}, (1024, 1024), (1024, 1536)),  # cover, crop
    ((768, 512), {"hires_width": 1024, "hires_height": 1024}, (1024, 1024), (1536, 1024)),
])
def test_hires_size_follows_a1111(base, settings, final, enlarged):
    size = hires_size(*base, dataclasses.replace(BASE, **settings))
    assert (size.final, (size.width, size.height)) == (final, enlarged)


def test_a1111_upscaler_names_read_back_to_ours():
    assert {upscaler_key(name) for name in UPSCALER_NAMES.values()} == set(UPSCALER_NAMES)
    assert upscaler_key("latent (Bicubic Antialiased)") == "latent_bicubic_antialiased"
    with pytest.raises(ValueError, match="unknown upscaler 'R-ESRGAN 4x\\+'"):
        upscaler_key("R-ESRGAN 4x+")


def test_latent_modes_are_a1111s_interpolations(pipe):
    """Nearest doubles each latent pixel into a 2x2 block; the smooth modes differ from it and each other."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = {mode: enlarge(pipe, x, mode, 32, 32) for mode in LATENT_MODES}  # 32 px = 16 latent pixels
    assert torch.equal(out["latent_nearest"], x.repeat_interleave(2, 2).repeat_interleave(2, 3))
    bicubic = F.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False)
    assert (out["latent_bicubic"] - bicubic).abs().max() < 1e-6
    odd = {mode: enlarge(pipe, x, mode, 24, 24) for mode in LATENT_MODES}  # 8 -> 12: nearest-exact differs
    distinct = {round(float((odd[m] - odd["latent_nearest"]).abs().sum()), 3) for m in
                ("latent", "latent_bicubic", "latent_nearest_exact")}
    assert len(distinct) == 3 and 0.0 not in distinct


# --- the pipeline: sizes, crop and second-pass settings ------------------------------------------

def test_a_target_of_another_aspect_is_covered_then_cropped(pipe):
    result = pipe.generate(dataclasses.replace(BASE, hires_width=24, hires_height=16))[0]
    assert (result.image.size, result.mode, result.params.width) == ((24, 16), "upscale", 16)
    kept = pipe.generate(dataclasses.replace(BASE, hires_width=24))[0]  # height 0: keep the aspect
    assert kept.image.size == (24, 24)


@pytest.mark.parametrize("upscaler", ["latent_bicubic", "latent_nearest_exact", "lanczos"])
def test_each_upscaler_gives_its_own_image(pipe, upscaler):
    plain = pixels(pipe, BASE)
    image = pixels(pipe, dataclasses.replace(BASE, upscaler=upscaler))
    assert image.shape == (32, 32, 3) and np.abs(image - plain).max() > 0


@pytest.mark.parametrize(("field", "same", "other"), [
    ("hires_prompt", "a red circle", "a blue square"), ("hires_negative", "", "blurry"),
    ("hires_sampler", "euler", "DPM++ 2M"), ("hires_cfg", 5.0, 9.0),
])
def test_second_pass_settings_change_only_the_second_pass(pipe, field, same, other):
    plain = pixels(pipe, BASE)
    assert np.array_equal(pixels(pipe, dataclasses.replace(BASE, **{field: same})), plain)
    assert np.abs(pixels(pipe, dataclasses.replace(BASE, **{field: other})) - plain).max() > 0


# --- the second pass's prompt schedule (A1111 1.6: counts on from the first pass) -----------------

def test_hires_prompt_schedule_counts_on_from_the_first_pass(pipe):
    """10 + 10 steps: `[a:b:15]` and `[a:b:1.5]` both switch at hires step 5; `[a:b:0.5]` is done by then."""
    ten = dataclasses.replace(BASE, steps=10, hires_steps=10, hires_strength=1.0)

    def image(prompt: str, **rest) -> np.ndarray:
        return pixels(pipe, dataclasses.replace(ten, prompt=prompt, **rest))

    integer, fraction = image("[red:blue:15] circle"), image("[red:blue:1.5] circle")
    assert np.array_equal(integer, fraction)
    assert np.abs(integer - image("red circle")).max() > 0  # it switches ...
    assert np.abs(integer - image("red circle", hires_prompt="blue circle")).max() > 0  # ... not at once
    done = image("[red:blue:0.5] circle")
    assert np.array_equal(done, image("[red:blue:0.5] circle", hires_prompt="blue circle"))
    assert np.abs(done - image("[red:blue:0.5] circle", hires_prompt="[red:blue:1.5] circle")).max() > 0
