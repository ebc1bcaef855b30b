"""The server's model listing: families told without loading weights, and x4-upscaler models served."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from openldm import cli
from openldm.checkpoints.io import read_state_dict
from openldm.config import TINY_X4_UPSCALER
from openldm.pipelines.params import GenerationParams
from openldm.pipelines.render import load_renderer
from openldm.pipelines.x4 import X4Settings
from openldm.server import models
from openldm.server.config import ServerConfig
from openldm.server.models import ModelCatalog
from tests.server_helpers import Served, b64_png, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, one_thread):
    """tiny-sd1 as the default, a tiny-sd2 .ckpt, a tiny-sd1 diffusers folder, a tiny x4 upscaler."""
    folder = tmp_path_factory.mktemp("models")
    default = tiny_model(folder, "tiny")
    sd2 = folder / "sd2.safetensors"
    assert cli.main(["init", "tiny-sd2", str(sd2), "--seed", "1"]) == 0
    torch.save({"state_dict": read_state_dict(sd2)[0]}, folder / "sd2-pickle.ckpt")
    sd2.unlink()
    assert cli.main(["convert", str(default), str(folder / "sd1-diffusers"), "--to", "diffusers"]) == 0
    assert cli.main(["init", "tiny-x4-upscaler", str(folder / "x4.safetensors"), "--seed", "3"]) == 0
    (folder / "ControlNet").mkdir()
    tiny_model(folder / "ControlNet", "not-listed")  # the ControlNet folder is not a model folder
    return folder


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    served = Served(ServerConfig(data_dir=tmp_path_factory.mktemp("data"), default_model=models_dir /
                                 "tiny.safetensors", models_dir=models_dir, keep_models=2))
    yield served
    served.close()


def test_ckpt_files_and_diffusers_folders_have_their_family_and_size(server):
    listed = {m["name"]: (m["family"], m["size"]) for m in server.http.get("/v1/models").json()["models"]}
    assert listed == {"tiny": ("sd1", 32), "sd2-pickle": ("sd2", 32), "sd1-diffusers": ("sd1", 32),
                      "x4": ("x4", TINY_X4_UPSCALER.image_size)}, listed


def test_a_models_config_is_read_once_per_size_and_mtime(models_dir, monkeypatch):
    calls = []
    real = models.model_config
    monkeypatch.setattr(models, "model_config", lambda path: calls.append(path.name) or real(path))
    catalog = ModelCatalog(models_dir / "tiny.safetensors", models_dir, models_dir / "ControlNet")
    first = sorted(calls)
    catalog.refresh()
    assert first == ["sd1-diffusers", "sd2-pickle.ckpt", "tiny.safetensors", "x4.safetensors"]
    assert sorted(calls) == first, "a second scan read the models again"


def _small() -> Image.Image:
    return Image.fromarray(np.random.default_rng(5).integers(0, 256, (16, 24, 3), dtype=np.uint8))


def test_an_x4_model_upscales_as_the_python_api_does(server, models_dir):
    params = {"prompt": "a castle", "steps": 2, "seed": 7, "cfg": 5}
    reply = server.http.post("/v1/jobs", json={"mode": "upscale", "model": "x4", "image": b64_png(_small()),
                                               "params": params, "noise_level": 30})
    assert reply.status_code == 200, reply.text
    job = server.wait(reply.json()["id"])
    assert job["state"] == "done", job["error"]
    assert job["extras"]["x4"] == {"noise_level": 30, "tile": None, "tile_overlap": 16}
    assert job["total"] == 2, "the x4 run reported no steps"
    served = Image.open(io.BytesIO(server.http.get(job["images"][0]["url"]).content))
    renderer = load_renderer(models_dir / "x4.safetensors", device="cpu", log=lambda message: None)
    renderer.pipe.progress = False
    (local,) = renderer.render("upscale", GenerationParams.from_json(job["params"]), _small(),
                               x4=X4Settings(noise_level=30))
    local_image = Image.open(io.BytesIO(local.png))
    diff = np.abs(np.asarray(served, dtype=np.int16) - np.asarray(local_image, dtype=np.int16)).max()
    assert served.size == (96, 64) and diff == 0, f"max abs pixel difference {diff}"


@pytest.mark.parametrize("body, field, message", [
    ({"mode": "txt2img", "model": "x4"}, "model", "model x4 is an x4 upscaler: it only runs upscale jobs"),
    ({"mode": "upscale", "model": "x4", "hires": True}, "model", "x4 is an x4 upscaler"),
    ({"mode": "upscale", "model": "x4", "noise_level": 400}, "noise_level", "must be in [0, 350]"),
    ({"mode": "upscale", "model": "x4", "tile": 20}, "tile", "x4 tiles must be a multiple of 8"),
    ({"mode": "upscale", "model": "tiny", "noise_level": 20}, "noise_level", "for an x4-upscaler model"),
])
def test_x4_settings_are_checked_before_queueing(server, body, field, message):
    image = {"image": b64_png(_small())} if body["mode"] == "upscale" else {}
    reply = server.http.post("/v1/jobs", json=body | image | {"params": {"prompt": "x", "steps": 1}})
    assert reply.status_code == 422 and message in reply.json()["error"], reply.text
    assert reply.json()["field"] == field
