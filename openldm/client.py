"""A client of `openldm serve`: settings go out as JSON, finished PNG files come back.

It imports neither torch nor the models, so a command that only talks to a running server starts in
a fraction of a second. The protocol is in docs/server.md.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from openldm.pipelines.outputs import Rendered
from openldm.pipelines.params import GenerationParams

DEFAULT_PORT = 7870
SERVER_ENV = "OPENLDM_SERVER"  # the environment variable the CLI reads when --server is not given
API_KEY_ENV = "OPENLDM_API_KEY"  # a bearer key for a server started with --api-key


class ServerError(Exception):
    """The server could not be reached, or refused the request; the message says which and why."""


def server_url(address: str) -> str:
    """`http://host:port` from what a user writes: a URL, `host:port`, or a bare port number."""
    address = address.strip().rstrip("/")
    if address.isdigit():
        return f"http://127.0.0.1:{address}"
    return address if "://" in address else f"http://{address}"


class RemoteRenderer:
    """Renders on a server: the same `render` as a local `Renderer`, with PNG file bytes as inputs.

    Each call is a job: submitted, followed on its event stream (a progress bar when `progress`),
    then its PNG files fetched exactly as the server wrote them.
    """

    def __init__(self, address: str, timeout: float | None = None, progress: bool = True,
                 api_key: str | None = None) -> None:
        self.url = server_url(address)
        self.timeout = timeout  # None: wait for as long as sampling takes
        self.progress = progress
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)

    def model(self) -> dict[str, Any]:
        """The server's default model: name, hash, family."""
        listing = self._call("GET", "/v1/models")
        return next(m for m in listing["models"] if m["name"] == listing["default"])

    def render(self, mode: str, params: GenerationParams, image: bytes | None = None,
               mask: bytes | None = None) -> list[Rendered]:
        request: dict[str, Any] = {"mode": mode, "params": params.to_json()}
        for name, data in (("image", image), ("mask", mask)):
            if data is not None:
                request[name] = base64.b64encode(data).decode("ascii")
        job_id = self._call("POST", "/v1/jobs", request)["id"]
        self.follow(job_id)
        job = self._call("GET", f"/v1/jobs/{job_id}")
        if job["state"] != "done":
            raise ServerError(f"job {job_id} {job['state']}: {job.get('error') or 'no reason given'}")
        return [Rendered(self._get(item["url"]), int(item["seed"]), item.get("networks", ""),
                         item.get("warning", "")) for item in job["images"]]

    def follow(self, job_id: str) -> None:
        """Read the job's event stream until it ends, feeding a progress bar."""
        bar = None
        try:
            for event, data in self.events(job_id):
                if event == "step" and self.progress:
                    if bar is None:
                        from tqdm import tqdm

                        bar = tqdm(total=data["total"], desc="sampling (server)", unit="step", leave=False)
                    bar.total = data["total"]
                    bar.n = data["step"]
                    bar.refresh()
        finally:
            if bar is not None:
                bar.close()

    def events(self, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event, data) pairs of a job's Server-Sent-Events stream, until it finishes."""
        with self._open("GET", f"/v1/jobs/{job_id}/events") as response:
            event = None
            for raw in response:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event is not None:
                    yield event, json.loads(line[6:])
                    event = None

    def _get(self, path: str) -> bytes:
        with self._open("GET", path) as response:
            return response.read()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            with self._open(method, path, body) as response:
                return json.loads(response.read())
        except ValueError:
            raise ServerError(f"{self.url} answered with something that is not JSON: is it an openldm "
                              "server?") from None

    @contextmanager
    def _open(self, method: str, path: str, body: dict[str, Any] | None = None):
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise ServerError(_error_text(e)) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServerError(f"no openldm server at {self.url} ({reason}); start one with `openldm serve`"
                              ) from None
        with response:
            yield response


def _error_text(error: urllib.error.HTTPError) -> str:
    """The server's own one-line message when it sent one, else the HTTP status."""
    try:
        return json.loads(error.read())["error"]
    except (ValueError, KeyError, TypeError, OSError):
        return f"the server answered HTTP {error.code} ({error.reason})"
