"""VAETiling: the setting, and decode/encode through it (whole, tiled, sliced, or tiled when needed)."""

from __future__ import annotations

import pytest
import torch

from openldm.models.vae_tiling import VAETiling, decode_latents, decode_tile, encode_images, encode_tile
from tests.test_vae import TINY, lone_tile_errors, max_err, random_vae


@pytest.fixture(scope="module")
def vae():
    return random_vae(TINY)


def test_tiled_decode_is_close_to_untiled(vae):
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = decode_latents(vae, z, VAETiling(mode="off"))
        tiles = decode_latents(vae, z, VAETiling(mode="on", tile_size=16, overlap=6))
        covering = decode_latents(vae, z, VAETiling(mode="on", tile_size=32, overlap=6))
        lone = lone_tile_errors(vae.decode, z, whole, 16, 1, 2)
    assert torch.equal(covering, whole), f"one tile over the whole latent: max abs {max_err(covering, whole)}"
    mean_err, scale = (tiles - whole).abs().mean().item(), whole.abs().mean().item()
    # Random weights: every tile's GroupNorms see their own statistics (see test_vae); blending must
    # still beat each tile alone.
    assert tiles.shape == whole.shape and mean_err < min(lone), (
        f"tiled vs whole: max abs {max_err(tiles, whole):.3f}, mean abs {mean_err:.4f}, lone tiles {lone}, "
        f"mean |image| {scale:.4f}")


def test_sliced_decode_and_encode_equal_batched(vae):
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    off, sliced = VAETiling(mode="off"), VAETiling(mode="off", sliced=True)
    decoded = max_err(decode_latents(vae, z, sliced), decode_latents(vae, z, off))
    encoded = max_err(encode_images(vae, x, sliced).mean, encode_images(vae, x, off).mean)
    assert decoded < 1e-5 and encoded < 1e-5, f"sliced vs batched max abs: decode {decoded}, encode {encoded}"


def test_auto_tiles_only_when_the_estimate_exceeds_what_is_free(vae):
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    auto = VAETiling(mode="auto", tile_size=16, overlap=4)
    assert decode_tile(vae, z, auto, available=2**40) is None
    assert decode_tile(vae, z, auto, available=2**20) == 16
    assert encode_tile(vae, x, auto, available=2**40) is None
    assert encode_tile(vae, x, auto, available=2**20) == 16
    assert decode_tile(vae, z, VAETiling(mode="off"), available=1) is None
    squeezed = decode_latents(vae, z, auto, available=2**20)
    assert torch.equal(squeezed, decode_latents(vae, z, VAETiling(mode="on", tile_size=16, overlap=4)))
    roomy = decode_latents(vae, z, auto, available=2**40)
    assert torch.equal(roomy, decode_latents(vae, z, VAETiling("off")))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": "sometimes"}, "must be one of auto, on, off"),
    ({"tile_size": 4}, "at least 8"),
    ({"tile_size": 32, "overlap": 16}, r"overlap must be in \[0, 16\)"),
])
def test_bad_settings_fail_with_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VAETiling(**kwargs)


def test_tiled_encode_needs_whole_cells(vae):
    with pytest.raises(ValueError, match="multiple of 2"):
        encode_images(vae, torch.zeros(1, 3, 63, 64), VAETiling(mode="on", tile_size=16, overlap=4))
