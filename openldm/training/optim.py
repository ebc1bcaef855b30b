"""Optimizer, learning-rate schedules and the EMA of weights."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from openldm.training.config import OptimConfig


def lr_factor(config: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base LR at each step (0-based), for `torch.optim.lr_scheduler.LambdaLR`.

    constant/linear/cosine/cosine_restarts all warm up linearly over `warmup_steps`; `linear` then
    decays to 0, the cosines to `min_lr_ratio`. `lambda_linear` is the ldm warm-up used by SD
    (from 1e-6 of the LR up to the full LR over the warm-up, then flat).
    """
    warmup, floor = config.warmup_steps, config.min_lr_ratio

    def warm(step: int) -> float | None:
        return (step + 1) / warmup if step < warmup else None

    def progress(step: int) -> float:
        return min(1.0, (step - warmup) / max(1, total_steps - warmup))

    def constant(step: int) -> float:
        return warm(step) or 1.0

    def linear(step: int) -> float:
        return warm(step) or max(0.0, 1.0 - progress(step))

    def cosine(step: int) -> float:
        w = warm(step)
        return w if w is not None else floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress(step)))

    def cosine_restarts(step: int) -> float:
        w = warm(step)
        if w is not None:
            return w
        cycle = (progress(step) * config.restarts) % 1.0 if progress(step) < 1 else 1.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * cycle))

    def lambda_linear(step: int) -> float:
        if step < warmup:
            return 1e-6 + (1 - 1e-6) * step / warmup
        return 1.0

    return {"constant": constant, "linear": linear, "cosine": cosine, "cosine_restarts": cosine_restarts,
            "lambda_linear": lambda_linear}[config.schedule]


def make_optimizer(groups: list[dict], config: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW: fused on CUDA (one kernel for all parameters), multi-tensor `foreach` elsewhere (on CPU
    torch defaults to a per-parameter loop, a visible share of a small model's step)."""
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
                             **fused)


class EMA:
    """Exponential moving average of parameters, decay warmed up as min(decay, (1+n)/(10+n)).

    The warm-up lets early averages follow the fast-moving weights rather than the random init.
    """

    def __init__(self, parameters: Iterable[nn.Parameter], decay: float, warmup: bool = True):
        self.params = [p for p in parameters if p.requires_grad]
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        decay = self.current_decay()
        self.updates += 1
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[nn.Parameter]) -> None:
        targets = [p for p in parameters if p.requires_grad]
        for target, shadow in zip(targets, self.shadow, strict=True):
            target.copy_(shadow.to(target.dtype))

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("EMA state does not match the model's trainable parameters")
        self.shadow = [s.clone().float() for s in state["shadow"]]
        self.updates = int(state["updates"])
