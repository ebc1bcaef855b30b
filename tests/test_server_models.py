"""The server's model listing: families told without loading weights, and x4-upscaler models served."""

from __future__ import annotations

import pytest
import torch

from openldm import cli
from openldm.checkpoints.io import read_state_dict
from openldm.config import TINY_X4_UPSCALER
from openldm.server import models
from openldm.server.config import ServerConfig
from openldm.server.models import ModelCatalog
from tests.server_helpers import Served, tiny_model

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
