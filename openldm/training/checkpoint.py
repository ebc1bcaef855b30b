"""Training checkpoints: atomic writes, the last K kept, safe loading.

A checkpoint holds everything a resumed run needs to continue as if never stopped: weights, EMA,
optimizer, LR schedule, grad scaler, step and torch's RNG state (data order and noise are pure
functions of the seed and step, see `data.py`, so they need no state). It is written to a
temporary file and renamed, so a kill mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from openldm.atomic import atomic_path

_NAME = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the run's checkpoints, oldest first."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def save_checkpoint(state: dict, output_dir: str | Path, step: int, keep_last: int) -> Path:
    """Write `step-NNNNNNNN.pt` atomically, then delete all but the newest `keep_last`."""
    path = checkpoint_dir(output_dir) / f"step-{step:08d}.pt"
    with atomic_path(path) as tmp, tmp.open("wb") as out:
        torch.save(state, out)
        out.flush()
        os.fsync(out.fileno())
    for _, old in list_checkpoints(output_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a training checkpoint without executing code from it (`weights_only=True`)."""
    return torch.load(path, map_location="cpu", weights_only=True)
