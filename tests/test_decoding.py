"""A NaN or inf is never written as an image: half VAEs that overflow retry in float32, the rest fail."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

import openldm
from openldm.models.vae_tiling import encode_images
from openldm.pipelines import images as im
from openldm.pipelines.decoding import NonFiniteError
from openldm.pipelines.params import GenerationParams
from tests.helpers import make_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("models"), "tiny-sd1")


def _latents() -> torch.Tensor:
    return torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))


def _overflowing(pipe, part: str = "decoder") -> None:
    """A VAE part's outputs near fp16's largest value (65504): some overflow in fp16, none in fp32."""
    conv = getattr(pipe.vae, part).conv_out
    with torch.no_grad():
        conv.weight.mul_(1000)
        conv.bias.fill_(65000)


def test_a_half_vae_that_overflows_decodes_again_in_float32(checkpoint):
    pipe = openldm.load(checkpoint, dtype=torch.float16)
    _overflowing(pipe)
    x = _latents()
    reference = copy.deepcopy(pipe.vae).float()  # the same fp16 weights, upcast exactly
    with torch.no_grad():
        half = pipe.vae.decode(pipe.config.latent_format.from_model(x).half())
        want = reference.decode(pipe.config.latent_format.from_model(x))
    assert not torch.isfinite(half).all(), "the weights must overflow in fp16 for this test to mean anything"
    with pytest.warns(UserWarning, match="overflowed in torch.float16"):
        pictures = pipe.decode(x)
    expected = im.to_pil(want)
    err = max(np.abs(np.asarray(p, np.int16) - np.asarray(e, np.int16)).max()
              for p, e in zip(pictures, expected))
    assert err == 0, f"retried decode differs from a float32 VAE by {err}/255"
    assert pipe.vae_dtype == torch.float32 and pipe.dtype == torch.float16  # the VAE alone moved


def test_a_half_vae_that_moved_to_float32_still_encodes(checkpoint):
    pipe = openldm.load(checkpoint, dtype=torch.float16)
    _overflowing(pipe)
    with pytest.warns(UserWarning):
        picture = pipe.decode(_latents()[:1])[0]
    assert pipe.encode_image(picture).dtype == torch.float32


def test_non_finite_latents_are_an_error_not_an_image(checkpoint):
    pipe = openldm.load(checkpoint)
    x = _latents()
    x[1, 2, 3, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"^sampling produced non-finite latents \(1 of 128 values"):
        pipe.decode(x)


def test_a_float32_vae_that_gives_nan_is_an_error(checkpoint):
    pipe = openldm.load(checkpoint)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"decoded non-finite pixels \(\d+ of \d+ values NaN or inf\) in "
                                             r"torch.float32"):
        pipe.generate(GenerationParams("x", steps=1, seed=1, cfg=5))


def test_a_half_vae_whose_encoder_overflows_encodes_again_in_float32(checkpoint):
    """img2img and inpainting start from `encode_image`: an overflow there must not pass for bad sampling.

    Tiled encodes take the same retry (`decoding._finite`); fp16 convolutions on the CPU are too slow to
    run one here."""
    pipe = openldm.load(checkpoint, dtype=torch.float16)
    _overflowing(pipe, "encoder")
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    reference = copy.deepcopy(pipe.vae).float()
    with torch.no_grad():
        half = pipe.vae.encode(x.half()).mode()
        want = pipe.config.latent_format.to_model(encode_images(reference, x).mode())
    assert not torch.isfinite(half).all(), "the weights must overflow in fp16 for this test to mean anything"
    with pytest.warns(UserWarning, match="overflowed in torch.float16"):
        got = pipe.encode_image(x)
    assert torch.equal(got, want), f"retried encode differs from a float32 VAE by {(got - want).abs().max()}"
    assert pipe.vae_dtype == torch.float32 and pipe.dtype == torch.float16


def test_a_float32_vae_that_encodes_nan_is_an_error_that_names_the_encoder(checkpoint):
    pipe = openldm.load(checkpoint)
    with torch.no_grad():
        pipe.vae.encoder.conv_out.bias[0] = float("nan")
    message = r"^the VAE encoded non-finite latents \(\d+ of \d+ values NaN or inf\) in torch.float32"
    with pytest.raises(NonFiniteError, match=message):
        pipe.img2img(Image.new("RGB", (32, 32), "red"), "x", steps=1, seed=1, cfg=5)
