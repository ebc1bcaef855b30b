"""A server on a loopback port in a thread, and the tiny models the server tests use."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from PIL import Image

from openldm import cli
from openldm.server.app import create_app
from openldm.server.config import ServerConfig


def tiny_model(folder: Path, name: str = "tiny", seed: int = 4) -> Path:
    path = folder / f"{name}.safetensors"
    assert cli.main(["init", "tiny-sd1", str(path), "--seed", str(seed)]) == 0
    return path


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class Served:
    """`create_app(config)` under uvicorn on 127.0.0.1, stopped by `close()`."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.app = create_app(config)
        sock = free_socket()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        self.http = httpx.Client(base_url=self.url, timeout=120)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def wait(self, job_id: str, timeout: float = 120) -> dict:
        deadline = time.time() + timeout
        while True:
            job = self.http.get(f"/v1/jobs/{job_id}").json()
            if job["state"] in ("done", "failed", "cancelled"):
                return job
            assert time.time() < deadline, f"job {job_id} still {job['state']}"
            time.sleep(0.05)

    def close(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(10)


def b64_png(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")
