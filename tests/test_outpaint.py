"""Outpainting: the canvas grows by the pixels asked for, the new area is inpainted, the original stays."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from openldm import cli
from openldm.pipelines import loading
from openldm.pipelines.images import extend_canvas
from openldm.pipelines.infotext import read_png
from openldm.pipelines.outputs import read_settings, save_result
from openldm.pipelines.params import GenerationParams
from tests.helpers import make_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
EXTEND = (8, 0, 0, 16)  # left, right, top, bottom: 24x32 -> 32x48


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp("models")
    return {name: make_checkpoint(folder, name) for name in ("tiny-sd1", "tiny-sd1-inpaint")}


@pytest.fixture(scope="module")
def pipes(checkpoints):
    return {name: loading.load(path) for name, path in checkpoints.items()}


def _picture() -> Image.Image:
    """24x32: left half dark red, right half light blue, a white square in the middle."""
    array = np.zeros((32, 24, 3), dtype=np.uint8)
    array[:, :12], array[:, 12:] = (120, 20, 20), (150, 200, 240)
    array[12:20, 8:16] = 255
    return Image.fromarray(array)


def _params(**changes) -> GenerationParams:
    settings = {"steps": 3, "seed": 11, "outpaint": EXTEND, "mask_blur": 0.0} | changes
    return GenerationParams("a red house", **settings)


def _regions(picture: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(the original's place, everything else) as boolean masks of the extended canvas."""
    left, _, top, _ = EXTEND
    inside = np.zeros((picture.height, picture.width), dtype=bool)
    inside[top : top + 32, left : left + 24] = True
    return inside, ~inside


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd1-inpaint"])
def test_outpainting_grows_the_canvas_and_paints_only_the_new_area(pipes, name):
    picture = _picture()
    result = pipes[name].generate(_params(), image=picture)[0]
    assert result.image.size == (32, 48) and (result.params.width, result.params.height) == (32, 48)
    assert result.mode == "outpaint" and result.params.outpaint == EXTEND
    out = np.asarray(result.image, dtype=int)
    inside, outside = _regions(result.image)
    assert np.array_equal(out[inside].reshape(32, 24, 3), np.asarray(picture, dtype=int))
    stretched, _ = extend_canvas(picture, left=8, bottom=16)
    changed = np.abs(out - np.asarray(stretched, dtype=int)).max(axis=-1)[outside]
    assert (changed > 8).mean() > 0.5, "the new area still looks like the stretched edges"


def test_a_blurred_seam_keeps_the_original_away_from_it(pipes):
    picture = _picture()
    result = pipes["tiny-sd1"].generate(_params(mask_blur=2.0), image=picture)[0]
    out = np.asarray(result.image, dtype=int)
    far = out[0:24, 16:32]  # at least 8 px from both seams (left at x=8, bottom at y=32)
    assert np.array_equal(far, np.asarray(picture, dtype=int)[0:24, 8:24])
    seam = out[0:32, 8]  # the original's first column, under the blurred edge of the mask
    assert not np.array_equal(seam, np.asarray(picture, dtype=int)[:, 0])


def test_a_mask_of_the_image_is_painted_too(pipes):
    picture = _picture()
    mask = Image.new("L", picture.size, 0)
    mask.paste(255, (0, 0, 24, 8))  # also repaint the top 8 rows of the original
    result = pipes["tiny-sd1"].generate(_params(), image=picture, mask=mask)[0]
    out, original = np.asarray(result.image, dtype=int), np.asarray(picture, dtype=int)
    assert np.array_equal(out[8:32, 8:32], original[8:32])
    assert np.abs(out[0:8, 8:32] - original[0:8]).max() > 8
    with pytest.raises(ValueError, match="mask size 8x8 does not match the image size 24x32"):
        pipes["tiny-sd1"].generate(_params(), image=picture, mask=Image.new("L", (8, 8)))


def test_sizes_that_are_not_multiples_of_8_are_refused(pipes):
    with pytest.raises(ValueError, match=r"makes 28x48: choose the pixels added"):
        pipes["tiny-sd1"].generate(_params(outpaint=(4, 0, 0, 16)), image=_picture())
    with pytest.raises(ValueError, match="outpainting extends an image"):
        pipes["tiny-sd1"].generate(_params())
    with pytest.raises(ValueError, match=r"outpaint \(-8, 0, 0, 0\) is out of range"):  # GenerationParams
        pipes["tiny-sd1"].generate(_params(outpaint=(-8, 0, 0, 0)), image=_picture())


def test_the_png_records_the_extension(pipes, tmp_path):
    picture = _picture()
    result = pipes["tiny-sd1"].generate(_params(steps=2), image=picture)[0]
    path = save_result(result, tmp_path / "a.png", "tiny", "0123456789")
    text, _ = read_png(path)
    assert 'Outpaint: "8,0,0,16"' in text and "Size: 32x48" in text
    again = pipes["tiny-sd1"].generate(read_settings(path).params, image=picture)[0]
    assert np.array_equal(np.asarray(again.image), np.asarray(result.image))


# --- command line --------------------------------------------------------------------------------

def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def test_cli_outpaint(checkpoints, tmp_path, capsys):
    model, source = checkpoints["tiny-sd1"], tmp_path / "in.png"
    _picture().save(source)
    out, again, plain = tmp_path / "out.png", tmp_path / "again.png", tmp_path / "plain.png"
    fast = ["--model", model, "--steps", 2, "--mask-blur", 0]
    assert run("outpaint", source, "a red house", "--extend", "8,0,0,16", *fast, "-o", out) == 0
    with Image.open(out) as image:
        assert image.size == (32, 48)
        assert np.array_equal(np.asarray(image)[0:32, 8:32], np.asarray(_picture()))
    assert "Outpaint" in read_png(out)[0]
    assert run("outpaint", source, "--from-png", out, "--model", model, "-o", again) == 0
    assert read_png(again) == read_png(out)
    assert run("txt2img", "--from-png", out, "--model", model, "-o", plain) == 0  # does not extend
    assert read_settings(plain).params.outpaint == (0, 0, 0, 0)
    capsys.readouterr()

    assert run("outpaint", source, "x", *fast, "-o", tmp_path / "none.png") == 2
    assert "nothing to outpaint: give --extend LEFT,RIGHT,TOP,BOTTOM" in capsys.readouterr().err
    assert run("outpaint", source, "x", "--extend", "4,0,0,0", *fast, "-o", tmp_path / "odd.png") == 2
    assert "makes 28x32: choose the pixels added so that the new size is a multiple of 8" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        run("outpaint", source, "x", "--extend", "8,8", *fast)
    assert "expected LEFT,RIGHT,TOP,BOTTOM, got '8,8'" in capsys.readouterr().err
    assert not list(tmp_path.glob("none*")) and not list(tmp_path.glob("odd*"))


def test_cli_help_documents_outpaint(capsys):
    with pytest.raises(SystemExit):
        cli.main(["outpaint", "--help"])
    text = capsys.readouterr().out
    assert "--extend LEFT,RIGHT,TOP,BOTTOM" in text and "multiple of 8" in text and "--mask-blur" in text
