"""A client of `openldm serve`: settings go out as JSON, finished PNG files come back.

It imports neither torch nor the models, so a command that only talks to a running server starts in
a fraction of a second. The protocol is described in `openldm.server`.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any

from openldm.pipelines.outputs import Rendered
from openldm.pipelines.params import GenerationParams

DEFAULT_PORT = 7870
SERVER_ENV = "OPENLDM_SERVER"  # the environment variable the CLI reads when --server is not given


class ServerError(Exception):
    """The server could not be reached, or refused the request; the message says which and why."""


def server_url(address: str) -> str:
    """`http://host:port` from what a user writes: a URL, `host:port`, or a bare port number."""
    address = address.strip().rstrip("/")
    if address.isdigit():
        return f"http://127.0.0.1:{address}"
    return address if "://" in address else f"http://{address}"


class RemoteRenderer:
    """Renders on a server: the same `render` as a local `Renderer`, with PNG file bytes as inputs."""

    def __init__(self, address: str, timeout: float | None = None) -> None:
        self.url = server_url(address)
        self.timeout = timeout  # None: wait for as long as sampling takes

    def model(self) -> dict[str, Any]:
        """What the server has loaded: name, hash, preset, native size, guidance scale."""
        return self._call("GET", "/v1/model")

    def render(self, mode: str, params: GenerationParams, image: bytes | None = None,
               mask: bytes | None = None) -> list[Rendered]:
        request = {"mode": mode, "params": params.to_json()}
        for name, data in (("image", image), ("mask", mask)):
            if data is not None:
                request[name] = base64.b64encode(data).decode("ascii")
        reply = self._call("POST", "/v1/generate", request)
        try:
            return [Rendered(base64.b64decode(item["png"]), int(item["seed"]), item.get("networks", ""),
                             item.get("warning", "")) for item in reply["images"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ServerError(f"{self.url} sent an answer that is not an openldm reply ({e!r})") from None

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise ServerError(_error_text(e)) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServerError(f"no openldm server at {self.url} ({reason}); start one with `openldm serve`"
                              ) from None
        except ValueError:
            raise ServerError(f"{self.url} answered with something that is not JSON: is it an openldm "
                              "server?") from None


def _error_text(error: urllib.error.HTTPError) -> str:
    """The server's own one-line message when it sent one, else the HTTP status."""
    try:
        return json.loads(error.read())["error"]
    except (ValueError, KeyError, TypeError, OSError):
        return f"the server answered HTTP {error.code} ({error.reason})"
