"""A real `openldm serve` (a subprocess on a free loopback port, the embedded model) and headless Chromium.

The browser is Debian's (`apt-get install chromium chromium-driver`; selenium never downloads one).
Without it these tests skip, except under CI=true, where a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parents[2]
SHOTS_ENV = "OPENLDM_UI_SHOTS"  # a folder collecting every scenario's screenshot, besides tmp_path


def _browser_or_skip() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if not missing:
        return
    message = (f"headless Chromium is not installed ({', '.join(missing)}): "
               "apt-get install chromium chromium-driver")
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`openldm serve` in a subprocess over `data_dir`; `restart()` kills it and starts it again."""

    def __init__(self, data_dir: Path, *options: str) -> None:
        self.data_dir, self.options, self.port = data_dir, options, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.launch()
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def start(self) -> None:
        self.launch()
        self.wait_up()

    def launch(self) -> None:
        code = "import sys; from openldm import cli; sys.exit(cli.main(sys.argv[1:]))"
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, "serve", "--port", str(self.port), "--data-dir", str(self.data_dir),
             "--threads", "1", *self.options], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_up(self) -> None:
        deadline = time.time() + 60
        while True:
            assert self.process.poll() is None, f"openldm serve exited: {self.process.stderr.read().decode()}"
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code in (200, 401):  # 401: up
                    return
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "openldm serve did not answer /v1/health in 60 s"
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)
        self.process.stderr.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def wait(self, job_id: str, timeout: float = 60) -> dict:
        deadline = time.time() + timeout
        while (job := self.http.get(f"/v1/jobs/{job_id}").json())["state"] in ("queued", "running"):
            assert time.time() < deadline, f"job {job_id} still {job['state']} after {timeout} s"
            time.sleep(0.05)
        return job


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """A plain server and one with --api-auth, started side by side: each start is mostly importing torch."""
    _browser_or_skip()
    both = (Server(tmp_path_factory.mktemp("serve-data")),
            Server(tmp_path_factory.mktemp("serve-auth"), "--api-auth", "ann:secret"))
    for served in both:
        served.wait_up()
    yield both
    for served in both:
        served.http.close()
        served.stop()


@pytest.fixture(scope="session")
def server(servers):
    return servers[0]


@pytest.fixture(scope="session")
def auth_server(servers):
    return servers[1]


@pytest.fixture(scope="session")
def browser():
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, server):
    """The page freshly opened, with this origin's saved settings forgotten."""
    browser.get(server.url + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(server.url + "/")
    wait_ready(browser)
    return browser


def wait_ready(driver, timeout: float = 20) -> None:
    ready = "return document.body.dataset.ready === 'true'"
    until(lambda: driver.execute_script(ready), timeout, "the page ready")


def until(check, timeout: float, what: str, every: float = 0.05):
    deadline = time.time() + timeout
    while not (value := check()):
        assert time.time() < deadline, f"waited {timeout} s for {what}"
        time.sleep(every)
    return value


@pytest.fixture
def shot(browser, tmp_path, request):
    """shot(name): a screenshot under the test's tmp_path, and in $OPENLDM_UI_SHOTS when that is set."""
    def take(name: str) -> Path:
        path = tmp_path / f"{name}.png"
        browser.save_screenshot(str(path))
        if os.environ.get(SHOTS_ENV):
            folder = Path(os.environ[SHOTS_ENV])
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, folder / path.name)
        return path

    return take
