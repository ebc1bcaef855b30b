"""ControlNet units through the server: webuiapi's `ControlNetUnit`s and native `controls` give the
images the Python API gives for the same units, and what the server lacks is refused by name."""

from __future__ import annotations

import io

import numpy as np
import pytest
import webuiapi
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from openldm.checkpoints.controlnet import PREFIX
from openldm.config import TINY_SD1, controlnet_config
from openldm.models.controlnet import ControlNet
from openldm.pipelines.control import ControlUnit
from openldm.pipelines.params import GenerationParams
from openldm.pipelines.preprocessors import Thresholds, preprocess
from openldm.pipelines.render import load_renderer
from openldm.server.config import ServerConfig
from tests.server_helpers import Served, b64_png, tiny_model
from tests.test_unet import randomize

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 32
# webuiapi 0.9.17's txt2img has a mutable default `alwayson_scripts={}` that it writes the units into, so a
# later call without units would send them again: every call with units here passes its own dict.


@pytest.fixture(scope="module")
def folders(tmp_path_factory, one_thread):
    models = tmp_path_factory.mktemp("models")
    tiny_model(models, "tiny")
    (models / "ControlNet").mkdir()
    for name, seed in (("control_tiny_canny", 7), ("control_tiny_scribble", 8)):
        net = ControlNet(controlnet_config(TINY_SD1))
        randomize(net, seed=seed)
        save_file({PREFIX + k: v.contiguous() for k, v in net.state_dict().items()},
                  models / "ControlNet" / f"{name}.safetensors")
    return models


@pytest.fixture(scope="module")
def served(folders, tmp_path_factory):
    server = Served(ServerConfig(data_dir=tmp_path_factory.mktemp("data"),
                                 default_model=folders / "tiny.safetensors", models_dir=folders))
    yield server
    server.close()


@pytest.fixture(scope="module")
def renderer(folders):
    renderer = load_renderer(folders / "tiny.safetensors", device="cpu", log=lambda message: None)
    renderer.pipe.progress = False
    return renderer


@pytest.fixture
def api(served):
    return webuiapi.WebUIApi(host="127.0.0.1", port=served.port, sampler="Euler", steps=2)


def _drawing() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), "white")
    ImageDraw.Draw(image).ellipse([6, 6, 26, 26], outline="black", width=2)
    return image


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _local(renderer, folders, params: GenerationParams, units: list[ControlUnit]) -> tuple[Image.Image, str]:
    (result,) = renderer.render("txt2img", params, controls=units)
    image = Image.open(io.BytesIO(result.png))
    return image, image.info["parameters"]


def test_webuiapi_controlnet_unit_gives_the_python_apis_image(api, renderer, folders):
    unit = webuiapi.ControlNetUnit(image=_drawing(), module="canny", model="control_tiny_canny",
                                   weight=0.7, resize_mode="Crop and Resize", threshold_a=100,
                                   threshold_b=200, guidance_start=0.0, guidance_end=0.5, control_mode=1)
    result = api.txt2img(prompt="a cat", width=SIZE, height=SIZE, seed=3, cfg_scale=5,
                         controlnet_units=[unit], alwayson_scripts={})
    ours = ControlUnit(folders / "ControlNet" / "control_tiny_canny.safetensors",
                       preprocess("canny", _drawing(), Thresholds(100, 200)), weight=0.7, end=0.5,
                       resize_mode="crop", mode="prompt", preprocessor="canny")
    params = GenerationParams(prompt="a cat", seed=3, steps=2, cfg=5.0, width=SIZE, height=SIZE,
                              sampler="Euler")
    local, infotext = _local(renderer, folders, params, [ours])
    plain, _ = _local(renderer, folders, params, [])
    diff = np.abs(_pixels(result.image) - _pixels(local)).max()
    assert diff == 0, f"max abs pixel difference {diff} between the server's and the Python API's image"
    assert np.abs(_pixels(plain) - _pixels(local)).max() > 0, "the unit did not change the image"
    line = ('ControlNet 0: "Module: canny, Model: control_tiny_canny, Weight: 0.7, Resize Mode: Crop and '
            'Resize, Guidance Start: 0, Guidance End: 0.5, Control Mode: My prompt is more important"')
    assert line in result.info["infotexts"][0] and line in infotext


def test_the_extensions_discovery_routes(api, served):
    titles = api.controlnet_model_list()
    assert [t.split(" [")[0] for t in titles] == ["control_tiny_canny", "control_tiny_scribble"]
    assert all(t.endswith("]") for t in titles) and api.controlnet_version() == 2
    assert {"none", "canny", "invert", "blur_gaussian"} <= set(api.controlnet_module_list())
    assert "depth_midas" not in api.controlnet_module_list()
    names = [m["name"] for m in served.http.get("/v1/models").json()["models"]]
    assert names == ["tiny"], "the ControlNet folder's files are not models"


@pytest.mark.parametrize("change, field, message", [
    ({"module": "depth_midas"}, "module", "'depth_midas' is not supported"),
    ({"module": "openpose_full"}, "module", "'openpose_full' is not supported"),
    ({"model": "control_v11p_sd15_depth [fef5e48e]"}, "model", "no ControlNet 'control_v11p_sd15_depth"),
    ({"model": "../tiny"}, "model", "no ControlNet '../tiny'"),
    ({"control_mode": "Louder"}, "control_mode", "'Louder' is not one the extension has"),
    ({"mask": "abc"}, "mask", "unit masks are not supported"),
    ({"module": "tile_resample", "threshold_a": 2}, "threshold_a", "down-sampling rate 2 > 1"),
])
def test_units_we_cannot_run_are_refused_by_name(served, change, field, message):
    unit = webuiapi.ControlNetUnit(image=_drawing(), module="canny", model="control_tiny_canny").to_dict()
    body = {"prompt": "x", "steps": 1, "width": SIZE, "height": SIZE,
            "alwayson_scripts": {"ControlNet": {"args": [unit | change]}}}
    before = served.http.get("/v1/jobs").json()["total"]
    reply = served.http.post("/sdapi/v1/txt2img", json=body)
    assert reply.status_code == 422 and message in reply.json()["error"], reply.text
    assert reply.json()["field"] == f"alwayson_scripts.controlnet.args.0.{field}"
    assert served.http.get("/v1/jobs").json()["total"] == before, "a refused request was queued"


def test_a_disabled_unit_changes_nothing(served, api):
    unit = webuiapi.ControlNetUnit(image=_drawing(), module="depth_midas", model="nope", enabled=False)
    plain = api.txt2img(prompt="a dog", width=SIZE, height=SIZE, seed=4)
    off = api.txt2img(prompt="a dog", width=SIZE, height=SIZE, seed=4, controlnet_units=[unit],
                      alwayson_scripts={})
    assert np.abs(_pixels(plain.image) - _pixels(off.image)).max() == 0
    assert "ControlNet" not in off.info["infotexts"][0]


def test_an_img2img_unit_without_an_image_takes_the_init_image(api):
    """As the extension does; a txt2img unit without one is refused by name."""
    picture = _drawing().rotate(90)
    given = webuiapi.ControlNetUnit(image=picture, module="invert", model="control_tiny_scribble",
                                    resize_mode="Just Resize")
    missing = webuiapi.ControlNetUnit(module="invert", model="control_tiny_scribble",
                                      resize_mode="Just Resize")
    runs = [api.img2img(images=[picture], prompt="a tree", width=SIZE, height=SIZE, seed=5,
                        denoising_strength=0.6, controlnet_units=[unit], alwayson_scripts={})
            for unit in (given, missing)]
    assert np.abs(_pixels(runs[0].image) - _pixels(runs[1].image)).max() == 0
    assert "ControlNet 0: \"Module: invert" in runs[1].info["infotexts"][0]
    with pytest.raises(RuntimeError, match="a txt2img ControlNet unit needs an image"):
        api.txt2img(prompt="a tree", width=SIZE, height=SIZE, controlnet_units=[missing],
                    alwayson_scripts={})


def test_a_native_job_with_two_units(served, renderer, folders):
    drawing = b64_png(_drawing())
    controls = [
        {"model": "control_tiny_canny", "image": drawing, "preprocessor": "canny", "weight": 0.8,
         "end": 0.5, "thresholds": {"low": 50, "high": 150}},
        {"model": "control_tiny_scribble", "image": drawing, "preprocessor": "invert", "weight": 0.6,
         "start": 0.5, "control_mode": "control", "resize_mode": "fill"},
    ]
    params = {"prompt": "a house", "seed": 9, "steps": 2, "cfg": 5, "width": SIZE, "height": SIZE}
    reply = served.http.post("/v1/jobs", json={"params": params, "controls": controls})
    assert reply.status_code == 200, reply.text
    job = served.wait(reply.json()["id"])
    assert job["state"] == "done", job["error"]
    assert [(c["model"], c["preprocessor"], c["weight"]) for c in job["extras"]["controls"]] == [
        ("control_tiny_canny", "canny", 0.8), ("control_tiny_scribble", "invert", 0.6)]
    served_image = Image.open(io.BytesIO(served.http.get(job["images"][0]["url"]).content))
    cn = folders / "ControlNet"
    edges, strokes = preprocess("canny", _drawing(), Thresholds(50, 150)), preprocess("invert", _drawing())
    units = [ControlUnit(cn / "control_tiny_canny.safetensors", edges, weight=0.8, end=0.5,
                         preprocessor="canny"),
             ControlUnit(cn / "control_tiny_scribble.safetensors", strokes, weight=0.6, start=0.5,
                         mode="control", resize_mode="fill", preprocessor="invert")]
    local, infotext = _local(renderer, folders, GenerationParams.from_json(job["params"]), units)
    diff = np.abs(_pixels(served_image) - _pixels(local)).max()
    assert diff == 0, f"max abs pixel difference {diff} between the served job and the Python API"
    assert served_image.info["parameters"] == infotext
    assert "ControlNet 1: \"Module: invert, Model: control_tiny_scribble, Weight: 0.6" in infotext


@pytest.mark.parametrize("change, status, message", [
    ({"model": "../ControlNet/control_tiny_canny"}, 404, "no ControlNet '../ControlNet/control_tiny_canny'"),
    ({"preprocessor": "depth"}, 422, "controls.0: preprocessor 'depth' needs model weights"),
    ({"start": 0.8, "end": 0.2}, 422, "controls.0: control start 0.8 and end 0.2"),
    ({"copies": 5}, 422, "5 ControlNet units is over max_controls=4"),
])
def test_bad_native_units_are_refused_before_queueing(served, change, status, message):
    copies = change.get("copies", 1)
    unit = {"model": "control_tiny_canny", "image": b64_png(_drawing())} | change
    unit.pop("copies", None)
    reply = served.http.post("/v1/jobs", json={"params": {"prompt": "x"}, "controls": [unit] * copies})
    assert reply.status_code == status and message in reply.json()["error"], reply.text


def test_controlnet_names_titles_and_file_names_resolve_only_in_the_folder(folders):
    from openldm.server.controls import ControlNetCatalog
    from openldm.server.models import UnknownModel

    catalog = ControlNetCatalog(folders / "ControlNet")
    entry = catalog.get("control_tiny_canny")
    assert entry.family == "sd1" and entry.title.startswith("control_tiny_canny [")
    for name in (entry.title, "control_tiny_canny [d14c016b]", "control_tiny_canny.safetensors"):
        assert catalog.get(name) == entry, name
    for name in ("../tiny", str(entry.path), "tiny", "control_tiny"):
        with pytest.raises(UnknownModel, match="no ControlNet"):
            catalog.get(name)
