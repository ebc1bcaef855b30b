"""VAETiling: the setting, and decode/encode through it (whole, tiled, sliced, or tiled when needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

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


# --- the setting reached end to end: `openldm txt2img --vae-tiling ...` on a tiny checkpoint ------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.helpers import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("models"), "tiny-sd1")


def _txt2img(checkpoint, folder, *options) -> list[np.ndarray]:
    """The images of a 64 px run written into `folder`, in order."""
    from openldm import cli

    folder.mkdir()
    argv = ["txt2img", "a red circle", "--model", checkpoint, "--steps", "2", "--cfg", "5", "--seed", "7",
            "--width", "64", "--height", "64", "-o", f"{folder}/", *options]
    assert cli.main([str(a) for a in argv]) == 0
    images = []
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("RGB")).astype(np.int16))
    return images


@pytest.mark.usefixtures("one_thread")
def test_cli_tiled_decode_is_close_to_whole_and_recorded(checkpoint, tmp_path):
    """64 px on tiny-sd1 (factor 2) is a 32 x 32 latent: 16-pixel tiles make 3 x 3 overlapping tiles."""
    from openldm.pipelines.infotext import read_png

    [whole] = _txt2img(checkpoint, tmp_path / "whole", "--vae-tiling", "off")
    [tiled] = _txt2img(checkpoint, tmp_path / "tiled", "--vae-tiling", "on", "--vae-tile-size", "16",
                       "--vae-tile-overlap", "6")
    [covering] = _txt2img(checkpoint, tmp_path / "covering", "--vae-tiling", "on", "--vae-tile-size", "32")
    [other] = _txt2img(checkpoint, tmp_path / "other", "--vae-tiling", "off", "--seed", "8")
    diff, seeds = np.abs(tiled - whole), np.abs(other - whole).mean()
    # Random weights: each tile's GroupNorms see their own statistics, so tiles differ from the whole
    # (test_tiled_decode_is_close_to_untiled). Measured: mean abs 4.2 (max 30) of 255, against 70
    # between two seeds. The bound: under 8 levels, and under a tenth of what another seed changes.
    assert 0 < diff.mean() < min(8, seeds / 10) and np.abs(covering - whole).max() == 0, (
        f"tiled vs whole: mean abs {diff.mean():.3f}, max abs {diff.max()} of 255 (another seed: mean abs "
        f"{seeds:.1f}); one covering tile: max abs {np.abs(covering - whole).max()}")
    text, exact = read_png(tmp_path / "tiled" / "txt2img.png")
    assert "VAE tiling: on, VAE tile size: 16, VAE tile overlap: 6" in text, text
    assert exact["params"]["vae_tile_size"] == 16
    [again] = _txt2img(checkpoint, tmp_path / "again", "--from-png", tmp_path / "tiled" / "txt2img.png")
    assert np.array_equal(again, tiled), "--from-png of a tiled image must tile the same way"
    assert "VAE tile" not in read_png(tmp_path / "whole" / "txt2img.png")[0]


@pytest.mark.usefixtures("one_thread")
def test_cli_sliced_decode_equals_batched(checkpoint, tmp_path):
    batched = _txt2img(checkpoint, tmp_path / "batched", "--batch-size", "2", "--vae-tiling", "off")
    sliced = _txt2img(checkpoint, tmp_path / "sliced", "--batch-size", "2", "--vae-slicing")
    assert len(batched) == len(sliced) == 2
    diffs = [int(np.abs(b - s).max()) for b, s in zip(batched, sliced)]
    assert max(diffs) <= 1, f"sliced vs batched max abs per image: {diffs} of 255"
