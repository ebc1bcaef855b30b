"""A run's description: batch seed numbering, the mode, and a callback that interrupts cleanly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import openldm
from openldm.pipelines.params import GenerationParams
from openldm.pipelines.run import Interrupted, batch_params, run_mode
from tests.helpers import make_checkpoint

IMAGE, MASK = Image.new("RGB", (32, 32)), Image.new("L", (32, 32))
SHAPE = (1, 4, 16, 16)  # one tiny-sd1 latent of 32x32 px (its VAE halves the size)


def test_batch_b_starts_at_seed_plus_b_times_batch_size_and_wraps():
    params = GenerationParams("x", seed=2**32 - 3, subseed=10, batch_size=2, batch_count=3)
    batches = batch_params(params)
    assert [(b.seed, b.subseed, b.batch_count) for b in batches] == [
        (2**32 - 3, 10, 1), (2**32 - 1, 12, 1), (1, 14, 1)]


@pytest.mark.parametrize(("image", "mask", "outpaint", "mode", "expected"), [
    (None, None, (0, 0, 0, 0), None, "txt2img"),
    (IMAGE, None, (0, 0, 0, 0), None, "img2img"),
    (IMAGE, MASK, (0, 0, 0, 0), None, "inpaint"),
    (IMAGE, None, (8, 0, 0, 0), "img2img", "outpaint"),
    (None, None, (0, 0, 0, 0), "upscale", "upscale"),
    (IMAGE, None, (0, 0, 0, 0), "upscale", "upscale"),
])
def test_the_mode_is_given_or_what_the_inputs_make(image, mask, outpaint, mode, expected):
    assert run_mode(GenerationParams("x", outpaint=outpaint), image, mask, mode) == expected


@pytest.mark.parametrize(("image", "mask", "mode", "message"), [
    (None, None, "inpaint", "^inpaint does not fit the inputs: no image make a txt2img run$"),
    (IMAGE, MASK, "img2img", "^img2img does not fit the inputs: an image and a mask make a inpaint run$"),
    (None, None, "paint", "^unknown mode 'paint'; one of txt2img, img2img"),
])
def test_a_mode_that_does_not_fit_the_inputs_is_one_line(image, mask, mode, message):
    with pytest.raises(ValueError, match=message):
        run_mode(GenerationParams("x"), image, mask, mode)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, one_thread):
    return openldm.load(make_checkpoint(tmp_path_factory.mktemp("models"), "tiny-sd1"))


def test_an_interrupting_callback_keeps_finished_batches_and_calls_the_model_no_more(pipe):
    params = GenerationParams("a cat", steps=3, seed=4, cfg=5.0, batch_count=3)
    calls, steps = [], []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))

    def stop_in_the_second_batch(step, total, denoised):
        steps.append((step, tuple(denoised.shape)))
        if len(steps) == total + 1:
            raise Interrupted

    try:
        results = pipe.generate(params, callback=stop_in_the_second_batch)
    finally:
        handle.remove()
    assert steps == [(1, SHAPE), (2, SHAPE), (3, SHAPE), (1, SHAPE)]
    assert len(calls) == 4  # one batched (cond + uncond) UNet call per step; none after the interrupt
    assert [r.params.seed for r in results] == [4]
    alone = pipe.generate(GenerationParams("a cat", steps=3, seed=4, cfg=5.0))[0]
    assert np.array_equal(np.asarray(results[0].image), np.asarray(alone.image))
