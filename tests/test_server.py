"""`openldm serve` and the generating commands' `--server`: the same files as a local run, without torch."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from openldm import cli
from openldm.client import RemoteRenderer, ServerError, server_url
from openldm.pipelines.params import GenerationParams
from openldm.pipelines.render import load_renderer
from openldm.server import MAX_REQUEST_BYTES, RenderServer

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--steps", "2", "--cfg", "5", "--seed", "11", "--subseed", "3"]  # both seeds: equal files


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread):
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    assert cli.main(["init", "tiny-sd1", str(path), "--seed", "4"]) == 0
    return path


def _serving(renderer):
    server = RenderServer(renderer, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture(scope="module")
def server(model):
    server, thread = _serving(load_renderer(model))
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


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


def test_the_client_reads_the_server_address_from_the_environment(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENLDM_SERVER", server.url.removeprefix("http://"))
    assert run("txt2img", "a blue square", *FAST, "-o", tmp_path / "a.png") == 0
    with Image.open(tmp_path / "a.png") as image:
        assert image.size == (32, 32)


def test_a_client_run_never_imports_torch(server, tmp_path):
    """What makes a served run fast: the client process does not start torch at all."""
    out = tmp_path / "a.png"
    code = ("import sys; from openldm import cli; "
            f"code = cli.main(['txt2img', 'a red circle', '--steps', '2', '--server', {server.url!r}, "
            f"'-o', {str(out)!r}]); "
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH'); sys.exit(code)")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "NO TORCH" in done.stdout and out.is_file()


def test_api_reports_the_loaded_model(server, model):
    facts = RemoteRenderer(server.url).model()
    assert (facts["name"], facts["preset"], facts["width"], facts["height"]) == ("tiny", "tiny-sd1", 32, 32)
    assert facts["hash"] == server.renderer.model_hash and facts["guidance"] == 7.0


# --- failures are one line, and leave no file ---------------------------------------------------

@pytest.mark.parametrize(("command", "options", "message"), [
    ("txt2img", ["--sampler", "nope"], "unknown sampler 'nope'"),
    ("txt2img", ["--width", "30"], "width 30: sizes must be positive multiples of 8"),
    ("img2img", [], "width 20: sizes must be positive multiples of 8"),  # the input image is 20x16
])
def test_settings_the_server_refuses_are_one_line_errors(command, options, message, server, tmp_path, capsys):
    Image.new("RGB", (20, 16)).save(tmp_path / "odd.png")
    inputs = [tmp_path / "odd.png"] if command == "img2img" else []
    out = tmp_path / "out.png"
    assert run(command, *inputs, "a red circle", *options, "--server", server.url, "-o", out) == 2
    client_lines = [line for line in capsys.readouterr().err.splitlines() if "/v1/generate" not in line]
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

def _post(server, body: bytes, path="/v1/generate", headers=None):
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.request("POST", path, body=body, headers=headers or {})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


@pytest.mark.parametrize(("body", "status", "message"), [
    (b"{not json", 400, "the request is not JSON"),
    (b"[1, 2]", 400, 'JSON object with "mode"'),
    (b'{"mode": "txt2img", "params": {"prompt": "a"}, "seed": 1}', 400, "unknown request fields: seed"),
    (b'{"mode": "txt2img", "params": {}}', 400, 'at least a "prompt"'),
    (b'{"mode": "txt2img", "params": {"prompt": "a", "steps": "2"}}', 400, "setting 'steps' must be int"),
    (b'{"mode": "txt2img", "params": {"prompt": "a", "stpes": 2}}', 400, "unknown generation settings"),
    (b'{"mode": "draw", "params": {"prompt": "a"}}', 400, "unknown mode 'draw'"),
    (b'{"mode": "img2img", "params": {"prompt": "a"}}', 400, "img2img needs image"),
    (b'{"mode": "txt2img", "params": {"prompt": "a"}, "mask": "AAAA"}', 400, "mask is not a readable image"),
    (b'{"mode": "img2img", "params": {"prompt": "a"}, "image": "%%"}', 400, "image file's bytes in base64"),
])
def test_bad_requests_get_a_json_error_naming_the_problem(server, body, status, message):
    code, reply = _post(server, body, headers={"Content-Type": "application/json"})
    assert code == status and message in reply["error"]


def test_unknown_endpoints_and_oversized_requests_are_refused(server):
    assert _post(server, b"{}", path="/v1/nothing")[0] == 404
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.putrequest("POST", "/v1/generate")
    connection.putheader("Content-Length", str(MAX_REQUEST_BYTES + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "over the limit" in json.loads(response.read())["error"]


def test_a_bug_in_rendering_is_a_500_with_its_message_and_the_server_keeps_serving(server, capsys):
    class Broken:
        model_name, model_hash = "broken", "0" * 10

        def render(self, *args, **kwargs):
            raise RuntimeError("kernel exploded")

    broken, thread = _serving(Broken())
    try:
        with pytest.raises(ServerError, match="internal error: RuntimeError: kernel exploded"):
            RemoteRenderer(broken.url).render("txt2img", GenerationParams("a", steps=1))
        with pytest.raises(ServerError, match="kernel exploded"):  # still answering
            RemoteRenderer(broken.url).render("txt2img", GenerationParams("a", steps=1))
    finally:
        broken.shutdown()
        broken.server_close()
        thread.join(5)
    assert "Traceback" in capsys.readouterr().err
