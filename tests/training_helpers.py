"""Shared by the training tests: tiny run configs, trainers built like `run.train` builds them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from openldm.models.tokenizer import CLIPTokenizer
from openldm.training.config import TrainConfig, parse_config
from openldm.training.data import BatchStream
from openldm.training.loop import Distributed, Trainer
from openldm.training.run import make_task


def make_config(folder: Path, kind: str, **sections: dict) -> TrainConfig:
    """A tiny-sd1 run at 16 px, 4 steps of batch 2, with `sections` merged over those settings.

    Not `run.deterministic`: MKL's mode cannot change inside the test process, which has used MKL
    already (test_training_determinism.py runs that mode in fresh processes)."""
    model = "vae" if kind == "vae" else "ldm"
    values: dict = {
        "data": {"image_size": 16, "length": 8},
        "optim": {"lr": 1e-3},
        "run": {"output_dir": str(folder / "run"), "steps": 4, "batch_size": 2, "checkpoint_every": 100,
                "log_every": 1, "deterministic": False},
        model: {"preset": "tiny-sd1"},
    }
    for name, settings in sections.items():
        values[name] = {**values.get(name, {}), **settings}
    return parse_config({"kind": kind, **values})


def make_trainer(config: TrainConfig) -> Trainer:
    torch.manual_seed(config.run.seed)  # as `run.train` does: the same initial weights every time
    return Trainer(config, make_task(config, Distributed()))


def fixed_loss(task, stream: BatchStream) -> float:
    """The task's loss on one fixed batch with fixed noise: what changes is only the weights."""
    with torch.no_grad():
        loss, _ = task.loss(stream(0), torch.Generator().manual_seed(1), 0)
    return float(loss)


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_one_clip_tokenizer():
    """One torch thread: on a busy 2-core machine a second one spins more than it computes (the
    tiny VAE steps ran 30x slower with two). And the standard CLIP tokenizer built once: parsing its
    49k merges takes seconds, and every LDM task would parse it again."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    build, built = CLIPTokenizer.for_config.__func__, {}

    def for_config(cls, cfg, folder=None):
        if (cfg, folder) not in built:
            built[cfg, folder] = build(cls, cfg, folder)
        return built[cfg, folder]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CLIPTokenizer, "for_config", classmethod(for_config))
        yield
    torch.set_num_threads(threads)
