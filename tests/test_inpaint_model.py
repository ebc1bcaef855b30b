"""An inpainting model (UNet in_channels 9) in txt2img, img2img and hires fix, where no mask is given.

As AUTOMATIC1111 does, the extra UNet input is then a mask of ones (everything to be painted) and the
latent of the image times (1 - mask): an all-zeros, mid-grey image.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from openldm.config import TINY_SD1_INPAINT
from openldm.pipelines import loading
from openldm.pipelines import pipeline as pl
from tests.helpers import make_checkpoint

WIDTH, HEIGHT = 48, 32  # not the preset's native 32x32
SETTINGS = {"steps": 3, "seed": 7, "cfg": 5.0, "width": WIDTH, "height": HEIGHT}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> pl.Pipeline:
    pipe = loading.load(make_checkpoint(tmp_path_factory.mktemp("models"), TINY_SD1_INPAINT))
    assert pipe.config.name == "tiny-sd1-inpaint" and pipe.config.is_inpainting
    return pipe


def _picture(width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    image = Image.new("RGB", (width, height), (200, 40, 30))
    ImageDraw.Draw(image).ellipse((8, 4, width - 8, height - 4), fill=(20, 60, 220))
    return image


def _unet_inputs(pipe: pl.Pipeline, run) -> list[torch.Tensor]:
    """Every `x` the UNet is called with while `run()` runs."""
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        run()
    finally:
        handle.remove()
    return seen


def _grey_latent(pipe: pl.Pipeline, rows: int, cols: int) -> torch.Tensor:
    """The model-space latent (rows x cols) of an all-zeros, mid-grey image."""
    f = pipe.config.vae.downsample_factor
    with torch.no_grad():
        z = pipe.vae.encode(torch.zeros(1, 3, rows * f, cols * f)).mean
    return pipe.config.latent_format.to_model(z)


@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
def test_runs_without_a_mask_at_the_requested_size(pipe, mode):
    if mode == "txt2img":
        images = pipe.txt2img("a cat", batch_size=2, **SETTINGS)
    else:
        images = pipe.img2img(_picture(64, 40), "a cat", batch_size=2, strength=0.6, **SETTINGS)
    assert [im.size for im in images] == [(WIDTH, HEIGHT)] * 2


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "hires"])
def test_unet_gets_a_mask_of_ones_and_the_grey_latent(pipe, mode):
    runs = {
        "txt2img": lambda: pipe.txt2img("a cat", **SETTINGS),
        "img2img": lambda: pipe.img2img(_picture(), "a cat", strength=0.6, **SETTINGS),
        "hires": lambda: pipe.upscale("a cat", upscale_by=1.5, hires_steps=2, **SETTINGS),
    }
    inputs = _unet_inputs(pipe, runs[mode])
    assert inputs and all(x.shape[1] == 9 for x in inputs), [tuple(x.shape) for x in inputs]
    for x in inputs:
        assert torch.equal(x[:, 4], torch.ones_like(x[:, 4])), "the mask channel must be all ones"
        err = (x[:, 5:] - _grey_latent(pipe, *x.shape[-2:])).abs().max().item()
        assert err < 1e-6, f"masked-image channels differ from the grey image's latent by {err}"
    f = pipe.config.vae.downsample_factor
    hires_latent = (HEIGHT * 3 // 2 // f, WIDTH * 3 // 2 // f)  # the second pass, at upscale_by 1.5
    assert any(x.shape[-2:] == hires_latent for x in inputs) == (mode == "hires")


def test_a_given_mask_still_reaches_the_unet(pipe):
    """With a mask (inpainting proper), channel 4 is that mask, not the all-ones default."""
    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, WIDTH // 2 - 1, HEIGHT - 1), fill=255)  # left half
    inputs = _unet_inputs(pipe, lambda: pipe.inpaint(_picture(), mask, "a cat", mask_blur=0, **SETTINGS))
    x = inputs[0]
    assert x.shape[1] == 9
    half = WIDTH // 2 // pipe.config.vae.downsample_factor  # latent columns of the left half
    assert torch.equal(x[:, 4, :, :half], torch.ones_like(x[:, 4, :, :half]))
    assert torch.equal(x[:, 4, :, half:], torch.zeros_like(x[:, 4, :, half:]))
