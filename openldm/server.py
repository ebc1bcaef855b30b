"""`openldm serve`: one model kept loaded, generating for clients over HTTP with JSON.

    GET  /v1/model     -> {"name", "hash", "preset", "family", "prediction", "width", "height", "guidance"}
    POST /v1/generate  {"mode": "txt2img", "params": {GenerationParams fields, "prompt" required},
                        "image": base64 file bytes, "mask": base64 file bytes}   (images as the mode needs)
                       -> {"images": [{"png": base64, "seed": 1, "networks": "", "warning": ""}], "model",
                           "model_hash"}   (warning: prompt words outside a narrow model's domain)

Each PNG carries its settings exactly as a local run's file does. Errors are JSON as well,
`{"error": "one line"}`: 400 for settings or inputs that cannot make an image, 404 / 405 / 411 / 413
for a malformed request, 500 for a bug (its traceback goes to the server's log). Requests are
served one at a time, since each image already uses every core. There is no authentication: the
server listens on 127.0.0.1 unless `--host` says otherwise.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import sys
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

from openldm.pipelines.params import GenerationParams
from openldm.pipelines.render import Renderer

MAX_REQUEST_BYTES = 64 * 2**20  # room for a few large input images, base64-encoded


class BadRequest(ValueError):
    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


class RenderServer(ThreadingHTTPServer):
    """An HTTP server around one `Renderer`; `serve_forever()` runs it, `shutdown()` stops it."""

    daemon_threads = True

    def __init__(self, renderer: Renderer, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), _Handler)
        self.renderer = renderer
        self.lock = threading.Lock()  # one generation at a time

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def model_facts(renderer: Renderer) -> dict[str, Any]:
    config = renderer.pipe.config
    width, height = (config.image_size,) * 2 if isinstance(config.image_size, int) else config.image_size
    return {"name": renderer.model_name, "hash": renderer.model_hash, "preset": config.name,
            "family": config.family, "prediction": config.prediction, "width": width, "height": height,
            "guidance": config.guidance, "loras": [list(pair) for pair in renderer.loras],
            "refiner": renderer.refiner.name if renderer.refiner is not None else None}


def parse_request(body: bytes) -> tuple[str, GenerationParams, dict[str, Image.Image]]:
    """(mode, settings, input images) from a /v1/generate body, or `BadRequest` saying what is wrong."""
    try:
        request = json.loads(body)
    except ValueError as e:
        raise BadRequest(f"the request is not JSON ({e})") from None
    if not isinstance(request, dict) or not isinstance(request.get("mode"), str):
        raise BadRequest('the request must be a JSON object with "mode" and "params"')
    unknown = set(request) - {"mode", "params", "image", "mask"}
    if unknown:
        raise BadRequest(f"unknown request fields: {', '.join(sorted(unknown))}")
    data = request.get("params")
    if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
        raise BadRequest('"params" must be an object with at least a "prompt" string')
    try:
        params = GenerationParams.from_json(data)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    images = {name: _image(request[name], name) for name in ("image", "mask")
              if request.get(name) is not None}
    return request["mode"], params, images


def _image(data: Any, name: str) -> Image.Image:
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as image:
            return image.convert("L" if name == "mask" else "RGB")
    except (TypeError, binascii.Error):
        raise BadRequest(f'"{name}" must be the image file\'s bytes in base64') from None
    except (OSError, SyntaxError) as e:
        raise BadRequest(f"{name} is not a readable image ({e})") from None


class _Handler(BaseHTTPRequestHandler):
    server: RenderServer

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        if self.path != "/v1/model":
            return self._error(HTTPStatus.NOT_FOUND, f"no endpoint {self.path}; GET /v1/model")
        self._send(HTTPStatus.OK, model_facts(self.server.renderer))

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/v1/generate":
            return self._error(HTTPStatus.NOT_FOUND, f"no endpoint {self.path}; POST /v1/generate")
        try:
            mode, params, images = parse_request(self._body())
            with self.server.lock:
                done = self.server.renderer.render(mode, params, **images)
        except BadRequest as e:
            return self._error(e.status, str(e))
        except ValueError as e:  # settings the pipeline refused: unknown sampler, bad size, missing LoRA ...
            return self._error(HTTPStatus.BAD_REQUEST, str(e))
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(e).__name__}: {e}")
        renderer = self.server.renderer
        images = [{"png": base64.b64encode(r.png).decode("ascii"), "seed": r.seed, "networks": r.networks,
                   "warning": r.warning} for r in done]
        self._send(HTTPStatus.OK, {
            "images": images,
            "model": renderer.model_name, "model_hash": renderer.model_hash,
        })

    def do_PUT(self) -> None:  # noqa: N802
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, "use GET /v1/model or POST /v1/generate")

    do_DELETE = do_PATCH = do_PUT  # noqa: N815

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequest("a request body needs a Content-Length", HTTPStatus.LENGTH_REQUIRED)
        if int(length) > MAX_REQUEST_BYTES:
            raise BadRequest(f"request of {int(length):,} bytes is over the limit of {MAX_REQUEST_BYTES:,}",
                             HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return self.rfile.read(int(length))

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._send(status, {"error": message})

    def _send(self, status: HTTPStatus, reply: dict[str, Any]) -> None:
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
