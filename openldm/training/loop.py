"""The training loop shared by every task: accumulation, clipping, schedules, EMA, checkpoints.

A task (`vae.VAETask`, `ldm.LDMTask`) says what is trained and how its loss is computed; this
loop owns everything else. Randomness inside a step comes from a generator seeded by (run seed,
step, rank), so a resumed run draws exactly the noise an uninterrupted one would.

Under torch.distributed every trained module is wrapped in DDP, which averages gradients over the
ranks; the task computes its loss through the wrapped modules (`Task.use_wrapped`). With
`run.distributed: fsdp` the trained modules are sharded in place instead (`fsdp.py`) and only
auxiliary modules get DDP. Checkpoints, logs and exports are written by rank 0 only, and every rank
resumes from the file rank 0 chose.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as torch_dist
from PIL import Image
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from openldm.training import fsdp
from openldm.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from openldm.training.config import TrainConfig
from openldm.training.data import Batch, BatchStream, hash_seed
from openldm.training.logs import RunLog
from openldm.training.optim import EMA, lr_factor, make_optimizer

MAIN = "main"  # the optimizer over `Task.param_groups`; auxiliary optimizers go by their own names
Losses = torch.Tensor | dict[str, torch.Tensor]


class TrainingError(RuntimeError):
    """A run that cannot continue (diverged loss, mismatched checkpoint)."""


@dataclass
class Auxiliary:
    """A module with its own optimizer (the VAE's discriminator): checkpointed, never in the EMA.

    It steps only on steps where the task's loss dict holds a loss under its name.
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer


class Task(Protocol):
    stream: BatchStream

    def trainable(self) -> dict[str, nn.Module]: ...

    def param_groups(self) -> list[dict]: ...

    def auxiliary(self) -> dict[str, Auxiliary]: ...

    def use_wrapped(self, modules: dict[str, nn.Module]) -> None:
        """Run forward passes through these (DDP-wrapped) modules from now on."""

    def loss(self, batch: Batch, generator: torch.Generator, step: int) -> tuple[Losses, dict[str, float]]:
        """The loss (or {optimizer name: loss}, MAIN always present) and extra values to log."""

    def sample_images(self, step: int) -> list[Image.Image]: ...

    def export(self, output_dir: Path) -> list[Path]: ...


@dataclass
class Distributed:
    """This process's place in a `torchrun` launch (rank 0 of 1 when not launched by it)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class History:
    """Loss per logged step, kept for the run's summary."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def _autocast(config: TrainConfig, device: torch.device):
    if config.run.precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if config.run.precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _differs(saved, current) -> bool:
    """Whether a saved config section differs; keys added to openldm since it was saved are ignored."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return any(_differs(v, current.get(k)) for k, v in saved.items())
    return saved != current


def _parameters(modules: dict[str, nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules.values() for p in m.parameters() if p.requires_grad]


class Trainer:
    def __init__(self, config: TrainConfig, task: Task, dist: Distributed | None = None):
        self.config, self.task = config, task
        self.dist = dist or Distributed()
        self.device = torch.device(config.run.device)
        self.output_dir = Path(config.run.output_dir)
        self.modules = task.trainable()
        self.auxiliary = task.auxiliary()
        self.sharded = self.dist.world > 1 and config.run.distributed == "fsdp"
        self.wrapped = self._wrap() if self.dist.world > 1 else {}  # first: FSDP swaps the parameters
        self.optimizer = make_optimizer(task.param_groups(), config.optim, self.device)
        factor = lr_factor(config.optim, config.run.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.run.precision == "fp16")
        decay = config.optim.ema_decay
        self.ema = EMA(_parameters(self.modules), decay, config.optim.ema_warmup) if decay else None
        self.step = 0
        self.history = History()

    def _wrap(self) -> dict[str, DistributedDataParallel]:
        """DDP around every trained module (its construction broadcasts rank 0's weights); with FSDP the
        trained modules are sharded in place and only the auxiliary ones get DDP."""
        ids = [self.device.index] if self.device.type == "cuda" and self.device.index is not None else None
        modules = {name: aux.module for name, aux in self.auxiliary.items()}
        if self.sharded:
            mesh = init_device_mesh(self.device.type, (self.dist.world,))
            for module in self.modules.values():
                fsdp.shard(module, mesh)
        else:
            modules = {**self.modules, **modules}
        wrapped = {name: DistributedDataParallel(m, device_ids=ids) for name, m in modules.items()}
        self.task.use_wrapped({**self.modules, **wrapped})
        return wrapped

    def unwrap(self) -> None:
        """Drop the DDP wrappers, while the process group is still alive.

        A DDP reducer left to hold the last reference to a gloo group destroys it with the GIL held,
        and that can deadlock at exit against a gloo worker thread that needs the GIL to free a tensor
        (pytorch/pytorch#56297; seen here as a rank that never exits).
        """
        if self.wrapped:
            self.wrapped = {}
            self.task.use_wrapped({**self.modules, **{n: aux.module for n, aux in self.auxiliary.items()}})

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs. Sharded runs gather it whole to rank 0: every rank must call."""
        return {
            "step": self.step,
            "modules": self.module_states(),
            "optimizer": fsdp.full_optimizer_state(self.modules, self.optimizer) if self.sharded
            else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self._ema_state(),
            "auxiliary": {name: {"module": aux.module.state_dict(), "optimizer": aux.optimizer.state_dict()}
                          for name, aux in self.auxiliary.items()},
            "torch_rng": torch.get_rng_state(),
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "history": {"steps": self.history.steps, "losses": self.history.losses},
        }

    def module_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """The trained modules' state dicts (sharded runs: whole, on rank 0; every rank must call)."""
        if self.sharded:
            return {name: fsdp.full_state(m) for name, m in self.modules.items()}
        return {name: m.state_dict() for name, m in self.modules.items()}

    def _ema_state(self) -> dict | None:
        if self.ema is None:
            return None
        state = self.ema.state_dict()
        return {**state, "shadow": fsdp.gather(state["shadow"])} if self.sharded else state

    def load_state_dict(self, state: dict) -> None:
        saved = json.loads(state["config"])
        mine = json.loads(json.dumps(self.config.to_dict()))  # tuples as lists, like the saved copy
        sections = ("kind", "data", "vae", "ldm", "lora", "embedding")
        changed = [k for k in sections if k in saved and _differs(saved[k], mine[k])]
        if changed:
            raise TrainingError(f"the checkpoint was made with a different config ({', '.join(changed)} "
                                "differ); resume with the config it was trained with")
        auxiliary = state.get("auxiliary", {})  # absent from checkpoints older than auxiliary optimizers
        if set(auxiliary) != set(self.auxiliary):
            raise TrainingError(f"the checkpoint holds auxiliary modules {sorted(auxiliary)}, this run "
                                f"trains {sorted(self.auxiliary)}")
        self._load_trained(state["modules"], state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            ema = state["ema"]
            if self.sharded:
                ema = {**ema, "shadow": fsdp.scatter_like(ema["shadow"], self.ema.shadow)}
            self.ema.load_state_dict(ema)
        for name, aux in self.auxiliary.items():
            aux.module.load_state_dict(auxiliary[name]["module"])
            aux.optimizer.load_state_dict(auxiliary[name]["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self.history = History(list(state["history"]["steps"]), list(state["history"]["losses"]))

    def _load_trained(self, modules: dict[str, dict], optimizer: dict) -> None:
        """Whole tensors in, each rank keeping its shard when sharded: checkpoints do not depend on how
        the run that wrote them was spread over processes."""
        if self.sharded:
            for name, module in self.modules.items():
                fsdp.load_full_state(module, modules[name])
            fsdp.load_full_optimizer_state(self.modules, self.optimizer, optimizer)
            return
        for name, module in self.modules.items():
            module.load_state_dict(modules[name])
        self.optimizer.load_state_dict(optimizer)

    def _agreed(self, path: Path | None) -> Path | None:
        """Rank 0's answer on every rank, so all ranks resume from one file even if they see others."""
        if self.dist.world == 1:
            return path
        box = [None if path is None else str(path)]
        torch_dist.broadcast_object_list(box, src=0)
        return None if box[0] is None else Path(box[0])

    def resume(self) -> bool:
        """Continue from the newest checkpoint in the output folder; False when there is none."""
        path = self._agreed(latest_checkpoint(self.output_dir))
        if path is None:
            return False
        self.load_state_dict(load_checkpoint(path))
        return True

    def resume_possible(self) -> bool:
        return self._agreed(latest_checkpoint(self.output_dir)) is not None

    def save(self) -> Path | None:
        if not self.dist.main and not self.sharded:
            return None
        state = self.state_dict()  # sharded: a collective, whose result only rank 0 receives
        if not self.dist.main:
            return None
        return save_checkpoint(state, self.output_dir, self.step, self.config.run.keep_last)

    # --- steps ---------------------------------------------------------------------------------
    def generator(self, step: int, micro: int) -> torch.Generator:
        seed = hash_seed(self.config.run.seed, "noise", step, micro, self.dist.rank)
        return torch.Generator().manual_seed(seed)

    def _sync(self, last: bool) -> ExitStack:
        """DDP and FSDP reduce gradients on the last micro-batch only; before it they accumulate locally."""
        stack = ExitStack()
        if not last:
            for module in self.wrapped.values():
                stack.enter_context(module.no_sync())
            if self.sharded:
                for module in self.modules.values():
                    module.set_requires_gradient_sync(False)
                    stack.callback(module.set_requires_gradient_sync, True)
        return stack

    def _optimized(self, name: str) -> list[nn.Parameter]:
        if name == MAIN:
            return _parameters(self.modules)
        return [p for p in self.auxiliary[name].module.parameters() if p.requires_grad]

    def _backward(self, losses: dict[str, torch.Tensor], accum: int) -> None:
        """Each loss reaches only its own optimizer's parameters (the generator's GAN term leaves the
        discriminator's gradients alone)."""
        for name, loss in losses.items():
            if not torch.isfinite(loss):
                what = "loss" if name == MAIN else f"{name} loss"
                raise TrainingError(f"{what} is {loss.item()} at step {self.step}; lower the LR or check "
                                    "the data")
            inputs = None if len(losses) == 1 else self._optimized(name)
            self.scaler.scale(loss / accum).backward(inputs=inputs)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches (auxiliary optimizers step with it)."""
        accum = self.config.optim.grad_accum
        logs: dict[str, float] = {}
        total, stepped = 0.0, set()
        for micro in range(accum):
            batch = self.task.stream(self.step * accum + micro)
            with self._sync(last=micro == accum - 1):
                with _autocast(self.config, self.device):
                    losses, parts = self.task.loss(batch, self.generator(self.step, micro), self.step)
                losses = losses if isinstance(losses, dict) else {MAIN: losses}
                self._backward(losses, accum)
            stepped |= set(losses) - {MAIN}
            total += losses[MAIN].item() / accum
            for key, value in parts.items():
                logs[key] = logs.get(key, 0.0) + value / accum
        self._step_optimizers(sorted(stepped), logs)
        self.step += 1
        logs["loss"] = total
        return self._rank_mean(logs)

    def _step_optimizers(self, auxiliary: list[str], logs: dict[str, float]) -> None:
        self.scaler.unscale_(self.optimizer)
        if self.config.optim.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(_parameters(self.modules), self.config.optim.grad_clip)
            logs["grad_norm"] = float(norm)
        self.scaler.step(self.optimizer)
        for name in auxiliary:
            self.scaler.step(self.auxiliary[name].optimizer)
            self.auxiliary[name].optimizer.zero_grad(set_to_none=True)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()

    def _rank_mean(self, logs: dict[str, float]) -> dict[str, float]:
        """Logged values averaged over the ranks: the loss the averaged gradients descend."""
        if self.dist.world == 1:
            return logs
        keys = sorted(logs)  # every rank logs the same keys: they ran the same steps
        total = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(total)
        return {k: v / self.dist.world for k, v in zip(keys, total.tolist())}

    def fit(self) -> History:
        run = self.config.run
        bar = tqdm(total=run.steps, initial=self.step, desc=f"train {self.config.kind}",
                   disable=not self.dist.main, dynamic_ncols=True)
        log = RunLog(self.output_dir) if self.dist.main else None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        samples_per_step = run.batch_size * self.config.optim.grad_accum * self.dist.world
        started, first = time.perf_counter(), self.step
        window: list[float] = []
        while self.step < run.steps:
            logs = self.train_step()
            window.append(logs["loss"])
            rate = (self.step - first) * samples_per_step / max(1e-9, time.perf_counter() - started)
            bar.set_postfix(loss=f"{logs['loss']:.4g}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                            samples_s=f"{rate:.1f}")
            bar.update(1)
            if self.step % run.log_every == 0 or self.step in (1, run.steps):  # 1: where the summary starts
                self._log(log, window, logs, rate)
            if self.step % run.checkpoint_every == 0 or self.step == run.steps:
                self.save()
            if run.sample_every and self.step % run.sample_every == 0 and (log is not None or self.sharded):
                images = self.task.sample_images(self.step)  # sharded: every rank runs the model with rank 0
                if images and log is not None:
                    log.samples(self.step, images)
        bar.close()
        if log is not None:
            log.close()
        return self.history

    def _log(self, log: RunLog | None, window: list[float], logs: dict[str, float], rate: float) -> None:
        mean = sum(window) / len(window)
        window.clear()
        self.history.steps.append(self.step)
        self.history.losses.append(mean)
        if log is not None:
            extra = {k: v for k, v in logs.items() if k != "loss"}
            log.scalars(self.step, {"loss": mean, "lr": self.scheduler.get_last_lr()[0],
                                    "samples_per_s": rate, **extra})

    def apply_ema(self) -> None:
        """Put the EMA weights into the modules (for export)."""
        if self.ema is not None:
            self.ema.copy_to(_parameters(self.modules))


def log_summary(history: History, unit: str = "") -> str:
    """The first logged loss against the last (the first step is always logged, so a short run has both)."""
    if not history.losses:
        return "no steps logged"
    unit = f" ({unit})" if unit else ""
    start, end = history.losses[0], history.losses[-1]
    if len(history.losses) == 1:
        return f"loss {start:.4g} at step {history.steps[0]}, the only step logged{unit}"
    ratio = start / end if end > 0 and math.isfinite(end) else float("inf")
    return (f"loss {start:.4g} (step {history.steps[0]}) -> {end:.4g} (step {history.steps[-1]}), "
            f"x{ratio:.2f} lower{unit}")
