"""TAESD against diffusers' AutoencoderTiny on random weights, in both weight layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from safetensors.torch import save_file

from openldm.checkpoints.io import CheckpointError
from openldm.models.taesd import TAESD, canonical_keys, from_state_dict, load_taesd

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference() -> AutoencoderTiny:
    torch.manual_seed(0)
    ref = AutoencoderTiny().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.05)  # default init decays the signal to ~0 through 20 blocks
    return ref


def _original_files(ref: AutoencoderTiny, folder) -> tuple:
    """The reference's weights written as the original taesd_encoder / taesd_decoder files (bare keys)."""
    ours = canonical_keys(ref.state_dict())
    paths = []
    for half in ("encoder", "decoder"):
        part = {k[len(half) + 1:]: v.contiguous() for k, v in ours.items() if k.startswith(half + ".")}
        paths.append(folder / f"taesd_{half}.safetensors")
        save_file(part, paths[-1])
    return tuple(paths)


def test_decode_and_encode_match_diffusers(reference, tmp_path):
    encoder_file, decoder_file = _original_files(reference, tmp_path)
    for model in (from_state_dict(reference.state_dict()), load_taesd(encoder_file, decoder_file)):
        z = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(1))
        image = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
        with torch.no_grad():
            decoded, want = model.decode(z), reference.decode(z).sample
            encoded, want_z = model.encode(image), reference.encode(image).latents
        err = (decoded - want).abs().max().item()
        assert err <= TOLERANCE, f"decode max abs error {err:.2e}"
        assert want.std() > 0.05, "the reference decode is flat: the test would not see a wrong layer"
        err = (encoded - want_z).abs().max().item()
        assert err <= TOLERANCE, f"encode max abs error {err:.2e}"


def test_a_decoder_file_alone_decodes_and_refuses_to_encode(reference, tmp_path):
    _, decoder_file = _original_files(reference, tmp_path)
    model = load_taesd(decoder_file)
    assert model.encoder is None
    assert model.decode(torch.zeros(1, 4, 4, 4)).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="no encoder"):
        model.encode(torch.zeros(1, 3, 32, 32))


def test_foreign_weights_are_refused_in_one_line():
    with pytest.raises(CheckpointError, match="not a TAESD weight: 'unet.conv.weight'"):
        from_state_dict({"unet.conv.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="do not fit"):
        from_state_dict({"decoder.1.weight": torch.zeros(64, 4, 3, 3)})


def test_pipeline_decodes_with_taesd_when_given(reference, tmp_path, one_thread):
    from helpers import make_checkpoint

    from openldm.pipelines import images as im
    from openldm.pipelines.loading import load

    pipe = load(make_checkpoint(tmp_path, "tiny-sd1"))
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    vae_image = np.asarray(pipe.decode(x)[0], dtype=np.int16)
    taesd = from_state_dict(reference.state_dict())
    pipe.use_decoder(taesd)
    got = np.asarray(pipe.decode(x)[0], dtype=np.int16)
    want = np.asarray(im.to_pil(reference.decode(x).sample)[0], dtype=np.int16)  # model-space latents in
    assert got.shape == (32, 32, 3) and np.abs(got - want).max() <= 1, "TAESD decode differs from diffusers'"
    assert vae_image.shape == (8, 8, 3), "the tiny VAE upsamples 2x: TAESD's 8x tells the two apart"
    with pytest.raises(ValueError, match="16 latent channels; this model's latents have 4"):
        pipe.use_decoder(TAESD(16))
    pipe.use_decoder(None)
    assert np.array_equal(np.asarray(pipe.decode(x)[0], dtype=np.int16), vae_image)


def test_previews_use_taesd_when_loaded_else_the_linear_map(reference):
    from openldm.pipelines.previews import preview_decoder

    def linear(x):
        return ["linear"]

    assert preview_decoder(None, linear) is linear
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    picture = preview_decoder(from_state_dict(reference.state_dict()), linear)(x)[0]
    with torch.no_grad():
        pixels = reference.decode(x).sample.clamp(-1, 1).add(1).mul(127.5).round()
    want = np.asarray(pixels.squeeze(0).permute(1, 2, 0))
    assert np.abs(np.asarray(picture, dtype=np.int16) - want.astype(np.int16)).max() <= 1
    decoder_only = TAESD(with_decoder=False)
    with pytest.raises(ValueError, match="no decoder"):
        preview_decoder(decoder_only, linear)
