"""`--control` on the CLI and the weight-free preprocessors, on a tiny random checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from openldm.checkpoints.controlnet import PREFIX
from openldm.config import TINY_SD1, controlnet_config
from openldm.models.controlnet import ControlNet
from openldm.pipelines.preprocessors import Thresholds, invert, preprocess
from tests.test_cli_generate import FAST, model, pixels, run, settings  # noqa: F401  (model: the fixture)
from tests.test_unet import randomize

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory):
    net = ControlNet(controlnet_config(TINY_SD1))
    randomize(net, seed=7)
    path = tmp_path_factory.mktemp("cn") / "control_tiny_canny.safetensors"
    save_file({PREFIX + k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return path


def _drawing(tmp_path) -> str:
    image = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(image).ellipse([6, 6, 26, 26], outline="black", width=2)
    path = tmp_path / "drawing.png"
    image.save(path)
    return str(path)


def test_control_changes_the_image_and_is_recorded(model, controlnet, tmp_path):  # noqa: F811
    drawing = _drawing(tmp_path)
    plain, steered = tmp_path / "plain.png", tmp_path / "steered.png"
    assert run("txt2img", "a cat", "--model", model, "--seed", 1, *FAST, "-o", plain) == 0
    assert run("txt2img", "a cat", "--model", model, "--seed", 1, *FAST, "-o", steered,
               "--control", f"{controlnet}:{drawing}:0.7:0:0.5", "--control-preprocess", "canny",
               "--control-mode", "prompt") == 0
    assert np.abs(pixels(plain).astype(int) - pixels(steered)).max() > 10
    text = settings(steered)
    assert ('ControlNet 0: "Module: canny, Model: control_tiny_canny, Weight: 0.7, Resize Mode: Just Resize, '
            'Guidance Start: 0, Guidance End: 0.5, Control Mode: My prompt is more important"') in text


@pytest.mark.parametrize("spec, message", [
    ("only-a-file", "is not FILE:IMAGE"),
    ("a:b:heavy", "must be numbers"),
])
def test_bad_control_spec_is_one_line(model, spec, message, capsys):  # noqa: F811
    with pytest.raises(SystemExit):
        run("txt2img", "x", "--model", model, "--control", spec)
    assert message in capsys.readouterr().err


def test_missing_control_image_and_non_controlnet_are_one_line(model, controlnet, tmp_path, capsys):  # noqa: F811
    missing = tmp_path / "no.png"
    assert run("txt2img", "x", "--model", model, *FAST, "--control", f"{controlnet}:{missing}") == 2
    assert "control image not found" in capsys.readouterr().err
    assert run("txt2img", "x", "--model", model, *FAST, "-o", tmp_path / "o.png",
               "--control", f"{model}:{_drawing(tmp_path)}") == 2
    err = capsys.readouterr().err
    assert "is not a ControlNet" in err and len(err.strip().splitlines()) == 1


def test_canny_finds_the_edges_of_a_square():
    image = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(image).rectangle([8, 8, 23, 23], fill=255)
    edges = np.asarray(preprocess("canny", image, Thresholds(100, 200)))[..., 0]
    assert edges[8:24, 8].max() == 255 and edges[16, 16] == 0 and edges[2, 2] == 0
    assert set(np.unique(edges)) <= {0, 255}


def test_invert_and_tile_blur():
    image = Image.new("RGB", (8, 8), (250, 250, 250))
    assert np.asarray(invert(image)).max() == 5
    spot = Image.new("RGB", (16, 16))
    spot.putpixel((8, 8), (255, 255, 255))
    blurred = np.asarray(preprocess("tile_blur", spot, Thresholds(sigma=2.0)))[..., 0]
    assert 0 < blurred[8, 8] < 255 and blurred[8, 10] > 0


def test_preprocessors_that_need_weights_say_so():
    with pytest.raises(ValueError, match="needs model weights"):
        preprocess("depth", Image.new("RGB", (8, 8)))
    with pytest.raises(ValueError, match="unknown preprocessor"):
        preprocess("sharpen", Image.new("RGB", (8, 8)))
