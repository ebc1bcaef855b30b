"""The A1111 face driven by `webuiapi` (pinned in the test extra) unchanged, and the server under load."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from openldm.pipelines.infotext import parse_infotext
from openldm.server.config import ServerConfig
from tests.server_helpers import Served, free_socket, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    models = tmp_path_factory.mktemp("models")
    default = tiny_model(models, "tiny")
    tiny_model(models, "other", seed=5)
    server = Served(ServerConfig(data_dir=tmp_path_factory.mktemp("data"), default_model=default,
                                 models_dir=models, keep_models=2))
    yield server
    server.close()


@pytest.fixture
def api(served):
    return webuiapi.WebUIApi(host="127.0.0.1", port=served.port, sampler="Euler", steps=2)


def test_webuiapi_listings_and_model_switch(api):
    assert "DPM++ 2M" in api.util_get_sampler_names()
    assert {"automatic", "karras"} <= set(api.util_get_scheduler_names())
    titles = api.util_get_model_names()
    assert len(titles) == 2 and all(t.endswith("]") for t in titles)
    assert api.get_options()["sd_model_checkpoint"].startswith("tiny.safetensors [")
    other = next(t for t in titles if t.startswith("other"))
    api.set_options({"sd_model_checkpoint": other})
    try:
        assert api.util_get_current_model() == other
        result = api.txt2img(prompt="a red circle", width=32, height=32, seed=3)
        assert result.info["sd_model_name"] == "other"
    finally:
        api.set_options({"sd_model_checkpoint": "tiny"})


def test_webuiapi_txt2img_img2img_inpaint_and_png_info(api):
    result = api.txt2img(prompt="a red circle", negative_prompt="blur", width=32, height=32, seed=7,
                         batch_size=2, cfg_scale=5)
    assert [im.size for im in result.images] == [(32, 32)] * 2
    assert result.info["all_seeds"] == [7, 8] and result.info["prompt"] == "a red circle"
    prompt, negative, settings = parse_infotext(result.info["infotexts"][1])
    assert (prompt, negative, settings["Seed"], settings["CFG scale"]) == ("a red circle", "blur", "8", "5.0")
    info = api.png_info(result.image)
    assert "Seed: 7" in info.info
    hires = api.txt2img(prompt="a red circle", width=16, height=16, seed=7, enable_hr=True, hr_scale=2,
                        hr_upscaler="Latent", hr_second_pass_steps=1, denoising_strength=0.6)
    assert hires.image.size == (32, 32) and hires.info["denoising_strength"] == 0.6
    assert "Hires upscale: 2" in hires.info["infotexts"][0]
    base = result.image.convert("RGB")
    again = api.img2img(images=[base], prompt="a blue square", width=32, height=32, seed=1,
                        denoising_strength=0.5)
    assert again.image.size == (32, 32) and again.info["denoising_strength"] == 0.5
    mask = Image.new("L", (32, 32))
    mask.paste(255, (8, 8, 24, 24))
    painted = api.img2img(images=[base], mask_image=mask, prompt="a star", width=32, height=32, seed=2,
                          inpainting_fill=1, inpaint_full_res=False, mask_blur=0)
    out, original = painted.image.convert("RGB").load(), base.load()
    assert out[0, 0] == original[0, 0] and out[31, 31] == original[31, 31]  # outside the mask: untouched


def test_webuiapi_progress_interrupt_and_wait_for_ready(api, served):
    done = {}
    thread = threading.Thread(target=lambda: done.setdefault(
        "result", api.txt2img(prompt="a slow one", width=32, height=32, steps=300, seed=1)))
    started = time.perf_counter()
    thread.start()
    deadline = time.time() + 60
    while (progress := api.get_progress())["state"]["sampling_step"] < 2:
        assert time.time() < deadline
        time.sleep(0.05)
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 300
    assert progress["state"]["job_count"] >= 1 and progress["current_image"]
    assert api.interrupt() == {}
    thread.join(60)
    assert done["result"].info["interrupted"] and done["result"].images == []
    api.util_wait_for_ready(check_interval=0.1)
    assert api.get_progress()["state"]["job_count"] == 0
    assert time.perf_counter() - started < 60


def test_skip_ends_only_the_batch_it_is_on(api, served):
    """n_iter 3: a skip in the first batch drops its image; the second and third batches still run."""
    done = {}
    thread = threading.Thread(target=lambda: done.setdefault(
        "result", api.txt2img(prompt="skip me", width=32, height=32, steps=80, seed=20, n_iter=3)))
    thread.start()
    deadline = time.time() + 60
    while (progress := api.get_progress())["state"]["sampling_step"] < 2:
        assert time.time() < deadline
        time.sleep(0.02)
    assert progress["state"]["sampling_step"] < 40, "the first batch was nearly over before the skip"
    assert api.skip() == {}
    thread.join(120)
    result = done["result"]
    assert result.info["all_seeds"] == [21, 22] and len(result.images) == 2, result.info["all_seeds"]
    job = served.http.get(f"/v1/jobs/{result.info['job_id']}").json()
    assert job["state"] == "done" and job["step"] == job["total"] == 240


@pytest.mark.parametrize(("field", "value"), [
    ("restore_faces", True), ("tiling", True), ("script_name", "x/y/z plot"), ("styles", ["anime"]),
    ("alwayson_scripts", {"ControlNet": {"args": [{"enabled": True}]}}),  # a unit without a model
    ("alwayson_scripts", {"ADetailer": {"args": [True, {"ad_model": "face_yolov8n.pt"}]}}),
    ("hr_upscaler", "R-ESRGAN 4x+"),
])
def test_fields_that_would_change_the_image_are_refused_by_name(served, field, value):
    body = {"prompt": "a", "steps": 1, "width": 32, "height": 32, "enable_hr": field == "hr_upscaler",
            field: value}
    reply = served.http.post("/sdapi/v1/txt2img", json=body)
    assert reply.status_code == 422 and field in reply.json()["error"], reply.text


def test_hires_fields_map_onto_the_cli_settings(served):
    """hr_resize_x with hr_resize_y 0 keeps the aspect; the second pass's own prompt, sampler and scale."""
    body = {"prompt": "a red circle", "width": 16, "height": 8, "seed": 7, "steps": 2, "cfg_scale": 5,
            "enable_hr": True, "hr_resize_x": 32, "hr_resize_y": 0, "hr_upscaler": "Latent (nearest-exact)",
            "hr_second_pass_steps": 2, "denoising_strength": 0.6}
    own = {"hr_prompt": "a blue circle", "hr_negative_prompt": "grey", "hr_sampler_name": "DPM++ 2M",
           "hr_cfg": 4}

    def txt2img(fields):
        reply = served.http.post("/sdapi/v1/txt2img", json=fields)
        assert reply.status_code == 200, reply.text
        image = Image.open(io.BytesIO(base64.b64decode(reply.json()["images"][0])))
        return np.asarray(image.convert("RGB"), dtype=int), json.loads(reply.json()["info"])["infotexts"][0]

    hires, text = txt2img(body | own)
    assert hires.shape == (16, 32, 3)
    _, _, settings = parse_infotext(text)
    assert {k: settings[k] for k in ("Size", "Hires resize", "Hires upscaler", "Hires prompt",
                                     "Hires negative prompt", "Hires sampler", "Hires CFG Scale")} == {
        "Size": "16x8", "Hires resize": "32x0", "Hires upscaler": "Latent (nearest-exact)",
        "Hires prompt": "a blue circle", "Hires negative prompt": "grey", "Hires sampler": "DPM++ 2M",
        "Hires CFG Scale": "4.0"}
    same, text = txt2img(body | {"hr_sampler_name": "Use same sampler"})
    assert "Hires sampler" not in text and np.abs(same - hires).max() > 0


# --- load ------------------------------------------------------------------------------------------

def _one(served: Served, i: int) -> tuple[int, bytes]:
    """Job i: native or A1111, one of two models, txt2img or hires; its prompt names it."""
    prompt, model = f"job number {i}", ("tiny", "other")[i % 2]
    if i % 3 == 0:
        body = {"prompt": prompt, "steps": 1, "width": 32, "height": 32, "seed": i,
                "override_settings": {"sd_model_checkpoint": model}}
        reply = served.http.post("/sdapi/v1/txt2img", json=body)
        import base64

        return i, base64.b64decode(reply.json()["images"][0])
    job = served.http.post("/v1/jobs", json={"model": model, "hires": i % 3 == 1, "params": {
        "prompt": prompt, "steps": 1, "seed": i, "width": 16 if i % 3 == 1 else 32,
        "height": 16 if i % 3 == 1 else 32, "hires_steps": 1}}).json()
    done = served.wait(job["id"])
    return i, served.http.get(done["images"][0]["url"]).content


def test_sixteen_clients_sixty_four_jobs_each_png_matches_its_request(served, tmp_path):
    from openldm.pipelines.outputs import read_settings

    started = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: _one(served, i), range(64)))
    elapsed = time.perf_counter() - started
    assert sorted(i for i, _ in results) == list(range(64))
    for i, png in results:
        (tmp_path / f"{i}.png").write_bytes(png)
        settings = read_settings(tmp_path / f"{i}.png")
        assert (settings.params.prompt, settings.params.seed) == (f"job number {i}", i)
        assert settings.model == ("tiny", "other")[i % 2]
        assert settings.mode == ("upscale" if i % 3 == 1 else "txt2img")
    print(f"64 jobs in {elapsed:.1f} s: {64 / elapsed * 60:.0f} jobs/min")


def test_cancels_under_load_stop_and_the_rest_complete(served):
    slow = [served.http.post("/v1/jobs", json={"params": {"prompt": f"slow {i}", "steps": 200}}).json()
            for i in range(10)]
    quick = [served.http.post("/v1/jobs", json={"params": {"prompt": f"quick {i}", "steps": 1}}).json()
             for i in range(6)]
    time.sleep(0.3)
    for job in slow:
        served.http.delete(f"/v1/jobs/{job['id']}")
    assert all(served.wait(j["id"], 60)["state"] == "cancelled" for j in slow)
    assert all(served.wait(j["id"], 60)["state"] == "done" for j in quick)


# --- a real process: SIGKILL and restart, two workers ---------------------------------------------

def _start(model: Path, data: Path, port: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = ["import sys; from openldm import cli; sys.exit(cli.main(sys.argv[1:]))", "serve",
               "--model", str(model), "--data-dir", str(data), "--port", str(port), "--threads", "1", *extra]
    process = subprocess.Popen([sys.executable, "-c", *command], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        assert process.poll() is None and time.time() < deadline, process.stderr.read().decode()[-2000:]
        time.sleep(0.2)


def _finish(url: str, ids: list[str], timeout: float = 120) -> list[dict]:
    deadline = time.time() + timeout
    while True:
        jobs = [httpx.get(f"{url}/v1/jobs/{i}").json() for i in ids]
        if all(j["state"] in ("done", "failed", "cancelled") for j in jobs) or time.time() > deadline:
            return jobs
        time.sleep(0.2)


def test_sigkill_with_ten_jobs_queued_then_a_restart_with_two_workers_completes_them_all(tmp_path):
    """One server process killed mid-job; the restarted one runs 2 worker processes of 1 thread each."""
    model, port = tiny_model(tmp_path), free_socket().getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    process = _start(model, tmp_path / "data", port)
    try:
        first = httpx.post(f"{url}/v1/jobs", json={"params": {"prompt": "long", "steps": 500}}).json()
        quick = [{"params": {"prompt": f"p{i}", "steps": 2, "seed": i}} for i in range(10)]
        ids = [httpx.post(f"{url}/v1/jobs", json=body).json()["id"] for body in quick]
        assert httpx.get(f"{url}/v1/health").json()["jobs"]["queued"] >= 10
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    process = _start(model, tmp_path / "data", port, "--workers", "2", "--devices", "cpu,cpu")
    try:
        assert first["id"] in httpx.get(f"{url}/v1/health").json()["requeued_at_start"]
        httpx.delete(f"{url}/v1/jobs/{first['id']}")
        jobs = _finish(url, ids)
        assert [j["state"] for j in jobs] == ["done"] * 10
        assert [j["images"][0]["seed"] for j in jobs] == list(range(10))
        assert len({j["worker"] for j in jobs}) == 2  # both processes took jobs
        assert _finish(url, [first["id"]])[0]["state"] == "cancelled"
    finally:
        process.terminate()
        process.wait(20)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.slow
def test_embedded_model_throughput_latency_and_rss_after_200_jobs(tmp_path):
    """Measured once and reported: jobs/min, p50/p95 latency, RSS after 20 and after 200 jobs."""
    from openldm.models.embedded import default_model_path

    served = Served(ServerConfig(data_dir=tmp_path, default_model=default_model_path()))
    try:
        latencies, rss = [], {}
        started = time.perf_counter()
        for i in range(200):
            t = time.perf_counter()
            job = served.http.post("/v1/jobs", json={"params": {"prompt": f"a red circle {i}", "steps": 4,
                                                                "seed": i}}).json()
            assert served.wait(job["id"])["state"] == "done"
            latencies.append(time.perf_counter() - t)
            if i + 1 in (20, 200):
                rss[i + 1] = _rss_mb()
        elapsed = time.perf_counter() - started
    finally:
        served.close()
    latencies.sort()
    print(f"embedded 128x128, 4 steps: {200 / elapsed * 60:.0f} jobs/min, p50 {latencies[100]:.2f} s, "
          f"p95 {latencies[190]:.2f} s; RSS {rss[20]:.0f} MB after 20, {rss[200]:.0f} MB after 200")
    assert rss[200] <= rss[20] * 1.10, rss
