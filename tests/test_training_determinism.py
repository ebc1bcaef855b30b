"""`run.deterministic`: one config in fresh processes gives bit-identical weights, and so does a run
killed at a random point and resumed.

The run is issue 18's: the tiny-sd1 VAE for 32 steps with EMA and the discriminator joining at step
12. Each run is a separate `openldm train vae` process, since what varied between runs (MKL's kernel
choice) is fixed per process, at MKL's first call. The default suite runs 3 at 16 px with one
thread; `--runslow` runs 10 at issue 18's 32 px with torch's default thread count.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from openldm.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from openldm.training.config import RunConfig
from openldm.training.determinism import (
    ENVIRONMENT,
    deterministic,
    mkl_reproducible,
    prepare_environment,
    wanted,
)
from openldm.training.vae import VAE_FILE

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 32, 4


def write_config(folder: Path, size: int, threads: int | None, mode: bool | None = None) -> Path:
    """Issue 18's run: EMA, a discriminator from step 12, a checkpoint every 4 steps."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"data": {"image_size": size, "length": 8},
                "optim": {"lr": 1e-3, "ema_decay": 0.9},
                "run": {"output_dir": str(folder / "run"), "steps": STEPS, "batch_size": 2,
                        "checkpoint_every": EVERY, "keep_last": 1, "log_every": 4, "threads": threads,
                        "deterministic": mode},
                "vae": {"preset": "tiny-sd1", "disc_weight": 0.5, "disc_start": 12, "disc_layers": 2,
                        "disc_channels": 8}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def launch(config: Path, *extra: str) -> subprocess.Popen:
    """`openldm train vae` in a fresh process, with none of the deterministic variables inherited."""
    env = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT}
    env["PYTHONPATH"] = str(REPO)
    command = [sys.executable, "-m", "openldm.cli", "train", "vae", str(config), *extra]
    log = (config.parent / "log.txt").open("ab")
    return subprocess.Popen(command, env=env, stdout=log, stderr=log)


def finish(process: subprocess.Popen, config: Path) -> None:
    assert process.wait(timeout=600) == 0, (config.parent / "log.txt").read_text()[-2000:]


def final_state(config: Path) -> dict[str, bytes]:
    """Digests of everything trained: the exported VAE, and the last checkpoint's weights, EMA,
    discriminator and optimizer moments."""
    run = config.parent / "run"
    state = load_checkpoint(latest_checkpoint(run))
    assert state["step"] == STEPS
    parts = {"vae.safetensors": (run / VAE_FILE).read_bytes()}
    for name in ("modules", "ema", "auxiliary", "optimizer"):
        digest = hashlib.sha256()
        _feed(digest, state[name])
        parts[name] = digest.digest()
    return parts


def _feed(digest, value) -> None:
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            _feed(digest, item)
    elif isinstance(value, torch.Tensor):
        digest.update(value.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    else:
        digest.update(repr(value).encode())


def kill_at_random(config: Path, rng: random.Random) -> int:
    """Start the run, SIGKILL it between two checkpoints at a random step, return the step it resumes from."""
    target = rng.randrange(EVERY, STEPS - 2 * EVERY)
    process = launch(config)
    deadline = time.monotonic() + 600
    run = config.parent / "run"
    while not any(step >= target for step, _ in list_checkpoints(run)) and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint after 600 s"
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.2))  # lands anywhere between two checkpoints
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = list_checkpoints(run)
    assert saved and saved[-1][0] < STEPS and not (run / VAE_FILE).exists(), "the run ended before the kill"
    return saved[-1][0]


def agreement(tmp_path: Path, runs: int, size: int, threads: int | None, at_once: int,
              mode: bool | None = None) -> tuple[list[dict[str, bytes]], dict[str, bytes], int]:
    """(final states of `runs` clean runs, that of a killed and resumed run, the step it resumed at)."""
    configs = [write_config(tmp_path / f"run{i}", size, threads, mode) for i in range(runs)]
    states = []
    for start in range(0, runs, at_once):
        batch = [(launch(c), c) for c in configs[start:start + at_once]]
        for process, config in batch:
            finish(process, config)
            states.append(final_state(config))
    killed = write_config(tmp_path / "killed", size, threads, mode)
    stopped = kill_at_random(killed, random.Random(os.urandom(8)))
    finish(launch(killed, "--resume"), killed)
    return states, final_state(killed), stopped


def assert_all_equal(states: list[dict[str, bytes]], resumed: dict[str, bytes], stopped: int) -> None:
    distinct = {tuple(s.values()) for s in states}
    differ = [name for name in states[0] if len({s[name] for s in states}) > 1]
    assert len(distinct) == 1, f"{len(distinct)} results from {len(states)} runs ({', '.join(differ)} differ)"
    changed = [name for name, value in resumed.items() if value != states[0][name]]
    assert not changed, f"killed after step {stopped} and resumed: {', '.join(changed)} differ"


def test_fresh_processes_and_a_killed_run_agree_bit_for_bit(tmp_path):
    """3 runs side by side, plus a killed and resumed one: one result."""
    states, resumed, stopped = agreement(tmp_path, runs=3, size=16, threads=1, at_once=3)
    assert_all_equal(states, resumed, stopped)


@pytest.mark.slow
def test_ten_fresh_processes_agree_bit_for_bit(tmp_path):
    """Issue 18's check at its size, one run at a time with torch's own thread count."""
    states, resumed, stopped = agreement(tmp_path, runs=10, size=32, threads=None, at_once=1)
    assert_all_equal(states, resumed, stopped)


def test_the_mode_is_on_for_the_cpu_by_default():
    assert wanted(RunConfig()) and not wanted(RunConfig(device="cuda"))
    assert wanted(RunConfig(device="cuda", deterministic=True)) and not wanted(RunConfig(deterministic=False))


def test_environment_keeps_what_the_user_set():
    environ = {"MKL_CBWR": "AUTO,STRICT"}
    prepare_environment(environ)
    assert environ == {**ENVIRONMENT, "MKL_CBWR": "AUTO,STRICT"}


def test_flags_are_set_inside_and_restored_after(monkeypatch):
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)  # undone after the test, whatever the mode set
    torch.ones(2, 2) @ torch.ones(2, 2)  # MKL in use: its mode is fixed from here on
    late = mkl_reproducible() is False
    before = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    with warnings.catch_warnings(record=True) as caught, deterministic(RunConfig(threads=1)):
        warnings.simplefilter("always")
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.mkldnn.deterministic
        assert torch.get_num_threads() == 1 and os.environ["MKL_CBWR"] == "COMPATIBLE"
    assert (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()) == before
    assert not torch.backends.mkldnn.deterministic
    assert ["MKL was already in use" in str(w.message) for w in caught] == [late]
