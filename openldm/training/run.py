"""Run a training config end to end: build the task, resume if asked, train, export.

Under `torchrun` (the RANK / WORLD_SIZE environment variables) the process group is set up here
with torch.distributed's own launcher contract (gloo on the CPU, NCCL with one GPU per LOCAL_RANK),
the trainer wraps the trained modules in DDP or shards them with FSDP (`run.distributed`), and the
group is taken down when the run ends.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as torch_dist

from openldm.training.config import TrainConfig
from openldm.training.determinism import deterministic
from openldm.training.loop import Distributed, Task, Trainer, TrainingError, log_summary


def distributed_from_env() -> Distributed:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed()
    if not torch_dist.is_initialized():
        nccl = torch.cuda.is_available() and os.environ.get("OPENLDM_BACKEND") != "gloo"
        if nccl:  # "cuda" then means this process's own GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch_dist.init_process_group("nccl" if nccl else "gloo")
    return Distributed(torch_dist.get_rank(), torch_dist.get_world_size())


def make_task(config: TrainConfig, dist: Distributed):
    if config.kind == "vae":
        from openldm.training.vae import VAETask

        return VAETask(config, dist.rank, dist.world)
    if config.kind == "lora":
        from openldm.training.lora import LoRATask

        return LoRATask(config, dist.rank, dist.world)
    if config.kind == "embedding":
        from openldm.training.embedding import EmbeddingTask

        return EmbeddingTask(config, dist.rank, dist.world)
    from openldm.training.ldm import LDMTask

    return LDMTask(config, dist.rank, dist.world)


def train(config: TrainConfig, *, resume: bool = False) -> tuple[Trainer, list[Path]]:
    """Train to `run.steps` and export; with `resume`, continue from the newest checkpoint."""
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    with deterministic(config.run):  # first: MKL takes its mode at its first call
        dist = distributed_from_env()
        trainers: list[Trainer] = []
        try:
            return _train(config, dist, resume, trainers)
        finally:
            if dist.world > 1 and torch_dist.is_initialized():
                for trainer in trainers:  # before the group goes: see `Trainer.unwrap`
                    trainer.unwrap()
                torch_dist.destroy_process_group()


def _train(config: TrainConfig, dist: Distributed, resume: bool, trainers: list[Trainer]
           ) -> tuple[Trainer, list[Path]]:
    torch.manual_seed(config.run.seed)
    task = make_task(config, dist)
    trainer = Trainer(config, task, dist)
    trainers.append(trainer)
    output = Path(config.run.output_dir)
    if resume:
        if not trainer.resume() and dist.main:
            print(f"no checkpoint in {output / 'checkpoints'}; starting from step 0")
    elif trainer.resume_possible():
        raise TrainingError(f"{output} already holds checkpoints of a run: pass --resume to continue it, "
                            "or choose another run.output_dir")
    trainer.fit()
    trainer.apply_ema()
    states = trainer.module_states() if trainer.sharded else None  # a collective: every rank gathers
    exported: list[Path] = []
    if dist.main:
        exported = (task if states is None else _unsharded(config, states)).export(output)
        summary = log_summary(trainer.history, _loss_unit(config))
        print(f"{config.kind}: {summary}; wrote {', '.join(map(str, exported))}")
    return trainer, exported


def _loss_unit(config: TrainConfig) -> str:
    if config.kind != "vae":
        return ""  # the diffusion losses are per-element means already
    from openldm.training.vae import loss_unit

    return loss_unit(config)


def _unsharded(config: TrainConfig, states: dict[str, dict[str, torch.Tensor]]) -> Task:
    """A single-process task holding the trained weights: sharded modules cannot run on rank 0 alone."""
    task = make_task(config, Distributed())
    for name, module in task.trainable().items():
        module.load_state_dict(states[name])
    return task
