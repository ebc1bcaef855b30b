"""`openldm serve` and the generating commands' `--server`: the same files as a local run, without torch."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openldm import cli
from openldm.client import RemoteRenderer, server_url
from openldm.config import TINY_SD1
from openldm.server.config import ServerConfig, ServerLimits
from tests.server_helpers import Served, b64_png, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--steps", "2", "--cfg", "5", "--seed", "11", "--subseed", "3"]  # both seeds: equal files


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread):
    return tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    served = Served(ServerConfig(data_dir=tmp_path_factory.mktemp("data"), default_model=model))
    yield served
    served.close()


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


@pytest.fixture
def picture(tmp_path):
    array = np.zeros((32, 24, 3), dtype=np.uint8)
    array[:, :12] = (120, 20, 20)
    array[:, 12:] = (150, 200, 240)
    Image.fromarray(array).save(tmp_path / "in.png")
    mask = np.zeros((32, 24), dtype=np.uint8)
    mask[8:24, 4:20] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path / "in.png", tmp_path / "mask.png"


# --- the files are the ones a local run writes, byte for byte ----------------------------------

@pytest.mark.parametrize("command", ["txt2img", "img2img", "inpaint", "outpaint"])
def test_a_served_run_writes_the_same_files_as_a_local_one(command, model, server, picture, tmp_path, capsys):
    image, mask = picture
    inputs = {"txt2img": [], "img2img": [image], "inpaint": [image, mask], "outpaint": [image]}[command]
    extra = ["--extend", "0,8,0,0"] if command == "outpaint" else []
    settings = [command, *inputs, "a red circle", *FAST, *extra, "--batch-size", 2, "--n-iter", 2]
    assert run(*settings, "--model", model, "-o", tmp_path / "here" / "a.png") == 0
    assert run(*settings, "--server", server.url, "-o", tmp_path / "served" / "a.png") == 0
    here = sorted((tmp_path / "here").iterdir())
    served = sorted((tmp_path / "served").iterdir())
    assert [p.name for p in served] == [p.name for p in here] == [f"a-000{i}.png" for i in range(1, 5)]
    for a, b in zip(here, served):
        assert a.read_bytes() == b.read_bytes()
    out = capsys.readouterr().out
    assert "[4/4] wrote" in out and "(seed 14)" in out


def test_the_client_reads_the_server_address_from_the_environment(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENLDM_SERVER", server.url.removeprefix("http://"))
    assert run("txt2img", "a blue square", *FAST, "-o", tmp_path / "a.png") == 0
    with Image.open(tmp_path / "a.png") as image:
        assert image.size == (32, 32)


def test_a_client_run_never_imports_torch(server, tmp_path):
    """What makes a served run fast: the client process does not start torch, nor numpy or Pillow, at all
    (the files come as the server wrote them)."""
    out = tmp_path / "a.png"
    code = ("import sys; from openldm import cli; "
            f"code = cli.main(['txt2img', 'a red circle', '--steps', '2', '--server', {server.url!r}, "
            f"'-o', {str(out)!r}]); "
            "print(sorted({'torch', 'numpy', 'PIL'} & set(sys.modules)) or 'NO TORCH'); sys.exit(code)")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "NO TORCH" in done.stdout and out.is_file()


def test_api_reports_the_default_model(server, model):
    facts = RemoteRenderer(server.url).model()
    assert (facts["name"], facts["family"], facts["default"]) == ("tiny", "sd1", True)
    assert facts["filename"] == "tiny.safetensors" and len(facts["hash"]) == 10


# --- failures are one line, and leave no file ---------------------------------------------------

@pytest.mark.parametrize(("command", "options", "message"), [
    ("txt2img", ["--sampler", "nope"], "unknown sampler 'nope'"),
    ("txt2img", ["--width", "30"], "width 30: sizes must be positive multiples"),
    ("img2img", [], "width 20: sizes must be positive multiples of 8"),  # the input image is 20x16
])
def test_settings_the_server_refuses_are_one_line_errors(command, options, message, server, tmp_path, capsys):
    Image.new("RGB", (20, 16)).save(tmp_path / "odd.png")
    inputs = [tmp_path / "odd.png"] if command == "img2img" else []
    out = tmp_path / "out.png"
    assert run(command, *inputs, "a red circle", *options, "--server", server.url, "-o", out) == 2
    client_lines = capsys.readouterr().err.splitlines()
    assert len(client_lines) == 1 and client_lines[0].startswith(f"openldm {command}: error: {message}")
    assert not out.exists()


def test_model_options_belong_to_the_server_not_the_client(server, model, tmp_path, capsys):
    assert run("txt2img", "a red circle", "--server", server.url, "--model", model, "--dtype", "fp16",
               "-o", tmp_path / "a.png") == 2
    err = capsys.readouterr().err
    assert "--model, --dtype: the server's model settings" in err and "openldm serve" in err


def test_no_server_and_missing_inputs_are_clear_errors(tmp_path, capsys):
    assert run("txt2img", "a red circle", "--server", "127.0.0.1:1", "-o", tmp_path / "a.png") == 2
    assert "no openldm server at http://127.0.0.1:1" in capsys.readouterr().err
    assert run("img2img", tmp_path / "gone.png", "x", "--server", "1", "-o", tmp_path / "a.png") == 2
    assert "image not found" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_server_urls_are_written_the_ways_people_write_them():
    assert server_url("7870") == "http://127.0.0.1:7870"
    assert server_url("box:7870/") == "http://box:7870"
    assert server_url("https://box/api") == "https://box/api"


# --- the protocol ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "status", "field", "message"), [
    ({"params": {"prompt": "a", "steps": "2"}}, 422, "steps", "setting 'steps' must be int"),
    ({"params": {"prompt": "a", "stpes": 2}}, 422, None, "unknown generation settings: stpes"),
    ({"params": {}}, 422, "params", 'at least a "prompt"'),
    ({"mode": "draw", "params": {"prompt": "a"}}, 422, None, "unknown mode 'draw'"),
    ({"mode": "img2img", "params": {"prompt": "a"}}, 422, None, "img2img needs image"),
    ({"params": {"prompt": "a", "width": 30}}, 422, "width", "width 30: sizes must be positive multiples"),
    ({"params": {"prompt": "a"}, "mask": "AAAA"}, 422, "mask", "mask is not a readable image"),
    ({"mode": "img2img", "params": {"prompt": "a"}, "image": "%%"}, 422, "image", "image file's bytes"),
    ({"params": {"prompt": "a"}, "seed": 1}, 422, "seed", "seed: Extra inputs are not permitted"),
    ({"params": {"prompt": "a", "steps": 501}}, 422, "steps", "steps 501 is over the limit of 500"),
    ({"params": {"prompt": "a", "width": 4096, "height": 2048}}, 422, "width", "4,194,304 pixels in all"),
    ({"params": {"prompt": "a", "batch_size": 8, "batch_count": 9}}, 422, "batch_count", "of 64 images"),
    ({"params": {"prompt": "a" * 20_001}}, 422, "prompt", "over the limit of 20,000"),
    ({"params": {"prompt": "a"}, "model": "../../etc/passwd"}, 404, "model", "no model '../../etc/passwd'"),
    ({"params": {"prompt": "a"}, "model": "/etc/passwd"}, 404, "model", "no model '/etc/passwd'"),
    ({"params": {"prompt": "<lora:../../etc/passwd:1> a"}}, 404, "prompt", "no LoRA named"),
])
def test_bad_requests_are_refused_before_queueing_with_one_line_naming_the_field(server, body, status, field,
                                                                                message):
    before = server.http.get("/v1/jobs").json()["total"]
    reply = server.http.post("/v1/jobs", json=body)
    assert reply.status_code == status and message in reply.json()["error"], reply.text
    assert reply.json().get("field") == field and "\n" not in reply.json()["error"]
    assert server.http.get("/v1/jobs").json()["total"] == before


def test_an_image_bomb_is_refused_from_its_header(server):
    bomb = Image.new("L", (5000, 5000))  # 25 Mpx of zeros: a small file that decodes huge
    reply = server.http.post("/v1/jobs", json={"mode": "img2img", "params": {"prompt": "a"},
                                               "image": b64_png(bomb)})
    assert reply.status_code == 413 and "over max_upload_pixels" in reply.json()["error"]


def test_images_are_served_only_from_the_outputs_folder(server):
    for name in ("..%2F..%2Fetc%2Fpasswd", "jobs.sqlite", "%2Fetc%2Fpasswd", "0" * 32 + "-0001.png"):
        assert server.http.get(f"/v1/images/{name}").status_code == 404


def test_events_stream_steps_with_previews_then_done(server):
    job = server.http.post("/v1/jobs", json={"params": {"prompt": "a red circle", "steps": 3, "seed": 1,
                                                        "batch_count": 2}}).json()
    events = list(RemoteRenderer(server.url).events(job["id"]))
    names = [name for name, _ in events]
    steps = [data["step"] for name, data in events if name == "step"]
    assert names[-1] == "done" and names.count("image") == 2
    # the stream polls the store, so a step the worker passed between two polls may not be sent; "done" is
    assert steps == sorted(steps) and steps[0] >= 1 and steps[-1] <= 6 and steps
    preview = next(data["preview"] for name, data in events if name == "step")
    side = 32 // TINY_SD1.vae.downsample_factor  # one preview pixel per latent pixel
    with Image.open(io.BytesIO(base64.b64decode(preview.split(",")[1]))) as im:
        assert (im.format, im.size) == ("JPEG", (side, side))
    done = server.http.get(f"/v1/jobs/{job['id']}").json()
    assert [i["seed"] for i in done["images"]] == [1, 2] and done["step"] == done["total"] == 6


def test_step_events_are_sent_at_most_every_step_events_every(server):
    from openldm.server.app import STEP_EVENTS_EVERY

    job = server.http.post("/v1/jobs", json={"params": {"prompt": "a", "steps": 60, "seed": 2}}).json()
    events = list(RemoteRenderer(server.url).events(job["id"]))
    done = server.http.get(f"/v1/jobs/{job['id']}").json()
    steps = [data["step"] for name, data in events if name == "step"]
    assert [name for name, _ in events][-2:] == ["image", "done"] and steps == sorted(steps)
    seconds = done["finished"] - done["started"]
    bound = seconds / STEP_EVENTS_EVERY + 2  # the tiny model steps faster: unthrottled, most of 60 go
    assert bound < 60 and 1 <= len(steps) <= bound, (len(steps), seconds)


def test_a_queued_job_is_cancelled_at_once_and_a_running_one_keeps_its_finished_images(server):
    params = {"prompt": "a", "steps": 40, "batch_count": 50}
    long = server.http.post("/v1/jobs", json={"params": params}).json()
    queued = server.http.post("/v1/jobs", json={"params": {"prompt": "b", "steps": 2}}).json()
    assert server.http.delete(f"/v1/jobs/{queued['id']}").json()["state"] == "cancelled"
    stamps = []
    for name, data in RemoteRenderer(server.url).events(long["id"]):
        if name == "step":
            stamps.append((time.perf_counter(), data["step"]))
        if name == "image":
            break
    step_time = (stamps[-1][0] - stamps[0][0]) / max(1, stamps[-1][1] - stamps[0][1])  # from the stream
    cancelled_at = time.perf_counter()
    assert server.http.delete(f"/v1/jobs/{long['id']}").status_code == 200
    job = server.wait(long["id"], timeout=30)
    assert job["state"] == "cancelled" and 1 <= len(job["images"]) < 50
    stopped = job["finished"] - (time.time() - (time.perf_counter() - cancelled_at))
    assert stopped < 3 * step_time + 0.5, (stopped, step_time)  # the step under way, then it stops
    for image in job["images"]:
        assert server.http.get(image["url"]).status_code == 200
    assert server.http.get(f"/v1/jobs/{queued['id']}").json()["images"] == []


def test_a_client_that_disconnects_loses_nothing(server):
    job = server.http.post("/v1/jobs", json={"params": {"prompt": "gone", "steps": 5, "seed": 4}}).json()
    with server.http.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        next(stream.iter_lines())  # one line, then hang up
    done = server.wait(job["id"])
    assert done["state"] == "done" and [i["seed"] for i in done["images"]] == [4]


def test_jobs_are_listed_newest_first_with_paging_and_a_state_filter(server):
    ids = [server.http.post("/v1/jobs", json={"params": {"prompt": f"p{i}", "steps": 1}}).json()["id"]
           for i in range(3)]
    for job_id in ids:
        server.wait(job_id)
    page = server.http.get("/v1/jobs", params={"limit": 2, "state": "done"}).json()
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:2] and page["total"] >= 3
    assert server.http.get("/v1/jobs", params={"state": "nope"}).status_code == 422


def test_listings_health_tokens_docs_and_the_static_page(server):
    assert {"name": "karras", "display": "Karras"} in server.http.get("/v1/schedulers").json()
    assert any(s["display"] == "DPM++ 2M" for s in server.http.get("/v1/samplers").json())
    assert server.http.get("/v1/health").json()["status"] == "ok"
    tokens = server.http.post("/v1/tokens", json={"prompt": "a photo of a cat, " * 20}).json()
    assert tokens["chunk_size"] == 75 and tokens["total"] == 120 and sum(tokens["chunks"]) == 120
    assert len(tokens["chunks"]) == 2
    assert "/v1/jobs" in server.http.get("/openapi.json").json()["paths"]
    assert server.http.get("/docs").status_code == 200
    assert "openldm" in server.http.get("/").text


def test_png_info_reads_back_the_exact_settings(server):
    job = server.http.post("/v1/jobs", json={"params": {"prompt": "a blue square", "steps": 2, "seed": 9}})
    done = server.wait(job.json()["id"])
    png = server.http.get(done["images"][0]["url"]).content
    info = server.http.post("/v1/png-info", json={"image": base64.b64encode(png).decode()}).json()
    assert info["params"]["prompt"] == "a blue square" and info["params"]["seed"] == 9
    assert info["items"]["Seed"] == "9" and info["model"] == "tiny"


def test_a_full_queue_is_a_429(model, tmp_path):
    from fastapi.testclient import TestClient

    from openldm.server.app import create_app

    config = ServerConfig(data_dir=tmp_path, default_model=model, limits=ServerLimits(max_queue=2))
    with TestClient(create_app(config, start_workers=False)) as client:
        codes = [client.post("/v1/jobs", json={"params": {"prompt": "a"}}).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


def test_credentials_are_required_on_every_route(model, tmp_path):
    from fastapi.testclient import TestClient

    from openldm.server.app import create_app

    config = ServerConfig(data_dir=tmp_path, default_model=model, auth=(("ann", "s3cret"),), api_key="k3y")
    with TestClient(create_app(config, start_workers=False)) as client:
        for path in ("/v1/health", "/sdapi/v1/options", "/", "/openapi.json", "/v1/images/x.png"):
            assert client.get(path).status_code == 401, path
        assert client.get("/v1/health", auth=("ann", "wrong")).status_code == 401
        assert client.get("/v1/health", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.get("/v1/health", auth=("ann", "s3cret")).status_code == 200
        assert client.get("/v1/health", headers={"Authorization": "Bearer k3y"}).status_code == 200


def test_jobs_left_running_by_a_crash_are_queued_again_then_failed(model, tmp_path):
    from openldm.server.jobs import JobStore

    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = store.submit("v1", "txt2img", {"prompt": "a"})
    for expected in ("queued", "failed"):
        assert store.claim("w").id == job.id
        assert store.recover() == [job.id] and store.get(job.id).state == expected
    assert "stopped while this job ran (2 times)" in store.get(job.id).error


def test_png_info_reads_settings_from_an_a1111_infotext(server):
    """A PNG without our exact chunk: the infotext's settings, with the sampler and schedule renamed."""
    from PIL.PngImagePlugin import PngInfo

    text = ("a green triangle\nNegative prompt: blurry\nSteps: 7, Sampler: DPM++ 2M, Schedule type: Karras, "
            "CFG scale: 6.5, Seed: 1234, Size: 64x96, Model: other")
    meta = PngInfo()
    meta.add_text("parameters", text)
    out = io.BytesIO()
    Image.new("RGB", (64, 96)).save(out, format="PNG", pnginfo=meta)
    info = server.http.post("/v1/png-info", json={"image": base64.b64encode(out.getvalue()).decode()}).json()
    p = info["params"]
    assert (p["prompt"], p["negative"], p["steps"], p["cfg"], p["seed"]) == ("a green triangle", "blurry", 7,
                                                                              6.5, 1234)
    assert (p["sampler"], p["schedule"], p["width"], p["height"]) == ("dpmpp_2m", "karras", 64, 96)
    assert info["mode"] is None and info["items"]["Model"] == "other"


def test_models_list_their_native_size(server):
    (entry,) = server.http.get("/v1/models").json()["models"]
    assert entry["size"] == TINY_SD1.image_size == 32


def test_previews_map_latent_channels_through_the_family_factors():
    from openldm.config import SD_LATENT, SDXL_LATENT
    from openldm.server.previews import latent_rgb

    x = torch.zeros(4, 2, 2)
    x[1] = 1.0  # channel 1 alone: RGB = its row of factors (+ the bias), mapped from [-1, 1] to 0..255
    for fmt in (SD_LATENT, SDXL_LATENT):
        expected = [round((f + b + 1) * 127.5) for f, b in zip(fmt.rgb_factors[1], fmt.rgb_bias)]
        assert latent_rgb(x, fmt)[0, 0].tolist() == expected
    assert latent_rgb(x, SD_LATENT)[0, 0].tolist() != latent_rgb(x, SDXL_LATENT)[0, 0].tolist()


def test_the_embedded_models_preview_of_a_red_picture_is_red():
    from openldm.models.embedded import default_model_path
    from openldm.pipelines.loading import load
    from openldm.server.previews import latent_rgb

    pipe = load(default_model_path())
    red = Image.new("RGB", (128, 128), (200, 30, 30))
    rgb = latent_rgb(pipe.encode_image(red)[0], pipe.config.latent_format).astype(float).mean(axis=(0, 1))
    assert rgb[0] > rgb[1] + 50 and rgb[0] > rgb[2] + 50, rgb.tolist()


# --- memory admission: the estimate a local run checks, against the server's --memory-budget -------

def _unguided_peaks(side: int) -> tuple[int, int]:
    """tiny-sd1 at `side` px with cfg 1 (the VAE decode is the peak): whole, and in 64-pixel tiles."""
    from openldm.memory import estimate_peak

    whole, tiled = (estimate_peak(TINY_SD1, width=side, height=side, guidance=False, vae_tile=t).total
                    for t in (None, 64))
    assert tiled < whole - 2**20, (whole, tiled)
    return whole, tiled


def test_memory_admission_refuses_native_jobs_over_the_budget_before_queueing(model, tmp_path):
    from fastapi.testclient import TestClient

    from openldm.server.app import create_app

    whole, tiled = _unguided_peaks(256)
    budget = (whole + tiled) // 2
    config = ServerConfig(data_dir=tmp_path, default_model=model, limits=ServerLimits(memory_budget=budget))
    big = {"prompt": "a", "width": 256, "height": 256, "cfg": 1}
    with TestClient(create_app(config, start_workers=False)) as client:
        reply = client.post("/v1/jobs", json={"params": big | {"vae_tiling": "off"}})
        assert reply.status_code == 422 and reply.json()["field"] == "memory", reply.text
        error = reply.json()["error"]
        assert f"needs about {whole / 2**30:.2f} GiB" in error and f"has {budget / 2**30:.2f} GiB" in error
        assert "would fit: " in error and "--vae-tiling on" in error and "\n" not in error, error
        assert client.get("/v1/jobs").json()["total"] == 0
        for params in (big, big | {"vae_tiling": "on"}):  # auto tiles here, as the worker will
            assert client.post("/v1/jobs", json={"params": params}).status_code == 200
        assert client.get("/v1/jobs").json()["total"] == 2
        over = client.post("/v1/jobs", json={"params": big | {"vae_tiling": "on", "batch_size": 4}})
        assert over.status_code == 422 and "--batch-size" in over.json()["error"], over.text


def test_memory_admission_refuses_a1111_jobs_over_the_budget(model, tmp_path):
    whole, _ = _unguided_peaks(256)
    config = ServerConfig(data_dir=tmp_path, default_model=model, limits=ServerLimits(memory_budget=whole))
    served = Served(config)
    try:
        body = {"prompt": "a", "steps": 1, "width": 512, "height": 512, "seed": 1}
        reply = served.http.post("/sdapi/v1/txt2img", json=body)
        assert reply.status_code == 422 and reply.json()["field"] == "memory", reply.text
        assert served.http.get("/v1/jobs").json()["total"] == 0
        small = served.http.post("/sdapi/v1/txt2img", json=body | {"width": 32, "height": 32})
        assert small.status_code == 200 and len(small.json()["images"]) == 1, small.text
    finally:
        served.close()


def test_serve_takes_a_memory_budget_in_gib(model, tmp_path):
    from openldm.cli import build_parser
    from openldm.cli.serve import server_config

    args = build_parser().parse_args(["serve", "--model", str(model), "--data-dir", str(tmp_path),
                                      "--memory-budget", "1.5"])
    assert server_config(args).limits.memory_budget == 3 * 2**29
    default = build_parser().parse_args(["serve", "--model", str(model)])
    assert server_config(default).limits.memory_budget is None


# --- the warm-up: the first job finds the model loaded ------------------------------------------

def test_the_warm_up_loads_the_default_model_and_writes_nothing(model, tmp_path, capsys):
    from openldm.server.jobs import JobStore
    from openldm.server.worker import Worker

    config = ServerConfig(data_dir=tmp_path, default_model=model, warmup=True)
    store = JobStore(config.database)
    worker = Worker(config, store)
    worker.warm_up()
    assert [r.model_name for r in worker.models.loaded.values()] == ["tiny"]
    assert "warmed up in" in capsys.readouterr().err
    assert store.list() == ([], 0)
    assert not config.outputs.exists() or not any(config.outputs.iterdir())


def test_a_default_model_that_fails_its_warm_up_leaves_the_worker_running(tmp_path, capsys):
    from openldm.server.jobs import JobStore
    from openldm.server.worker import Worker

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    config = ServerConfig(data_dir=tmp_path, default_model=broken, warmup=True)
    Worker(config, JobStore(config.database)).warm_up()  # must not raise
    err = capsys.readouterr().err
    assert "warm-up of the default model failed" in err and len(err.strip().splitlines()) == 1


def test_serve_warms_up_unless_told_not_to(model, tmp_path):
    from openldm.cli.serve import server_config

    parser = cli.build_parser()
    on = server_config(parser.parse_args(["serve", "--model", str(model), "--data-dir", str(tmp_path)]))
    off = server_config(parser.parse_args(["serve", "--model", str(model), "--data-dir", str(tmp_path),
                                           "--no-warmup"]))
    assert (on.warmup, off.warmup) == (True, False)
    assert ServerConfig(data_dir=tmp_path, default_model=model).warmup is False  # embedding it: opt in
