"""Where a run's progress goes: `metrics.jsonl`, TensorBoard when it is installed, and sample grids.

TensorBoard is optional (not a dependency of openldm): without the `tensorboard` package the run
writes the same scalars to `metrics.jsonl` and the same grids to `samples/`, and nothing else changes.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from openldm.atomic import write_bytes_atomic

SAMPLES_DIR = "samples"
TENSORBOARD_DIR = "tensorboard"


def _tensorboard_writer(folder: Path):
    """A `SummaryWriter`, or None when the `tensorboard` package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


def image_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Images of one size side by side, `columns` per row (default: as square as possible)."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % columns) * w, (i // columns) * h))
    return grid


class RunLog:
    """The main process's record of a run; every write appends, so a resumed run continues it."""

    def __init__(self, output_dir: str | Path, tensorboard: bool = True):
        self.output_dir = Path(output_dir)
        self.metrics = self.output_dir / "metrics.jsonl"
        self.writer = _tensorboard_writer(self.output_dir / TENSORBOARD_DIR) if tensorboard else None

    def scalars(self, step: int, row: dict[str, float]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with self.metrics.open("a", encoding="utf-8") as out:
            out.write(json.dumps({"step": step, **row}) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                self.writer.add_scalar(f"train/{key}", value, step)

    def samples(self, step: int, images: Sequence[Image.Image]) -> Path:
        """Write `samples/step-NNNNNNNN.png` (numbered like the checkpoints) and return its path."""
        grid = image_grid(images)
        buffer = io.BytesIO()
        grid.save(buffer, format="PNG")
        path = write_bytes_atomic(self.output_dir / SAMPLES_DIR / f"step-{step:08d}.png", buffer.getvalue())
        if self.writer is not None:
            self.writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
        return path

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
