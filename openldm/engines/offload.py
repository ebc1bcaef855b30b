"""Offload on CUDA: components (or the UNet's blocks) wait in system memory and visit the GPU to run.

`model`: only the component that is running sits on the GPU (the UNet while sampling, the VAE while
decoding, the text encoders while encoding); `sequential`: the UNet's blocks stream through it one
by one, for GPUs smaller than the UNet. Both are forward hooks: a group's first module to run moves
its group (and the inputs) to the device, and outputs go back to the device the inputs came from,
so the pipeline's own tensors stay wherever it made them. `move` is injectable,
so the schedule of moves is tested on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from openldm.engines import OFFLOAD_MODES

Move = Callable[[nn.Module, str], None]


def _to(module: nn.Module, device: str) -> None:
    module.to(device)


def _moved(value: Any, device: str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_moved(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Group:
    """What moves together (`moved`), and the modules whose calls bring it to the device (`entries`)."""

    moved: nn.Module
    entries: tuple[nn.Module, ...]


@dataclass
class Offload:
    """Groups that visit `device` one at a time; `keep=True` leaves the last one there (model offload)."""

    device: str
    home: str = "cpu"
    keep: bool = True
    move: Move = _to
    groups: list[Group] = field(default_factory=list)
    current: int | None = None  # the index of the group on the device now
    callers: list[torch.device | None] = field(default_factory=list)  # where each running call's inputs were
    handles: list[Any] = field(default_factory=list)

    def add(self, group: Group) -> None:
        index = len(self.groups)
        self.groups.append(group)
        for module in group.entries:
            self.handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, i=index: self._enter(i, args, kwargs), with_kwargs=True))
            self.handles.append(module.register_forward_hook(
                lambda m, args, out, i=index: self._leave(i, out)))

    def _enter(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.current != index:
            if self.current is not None:
                self.move(self.groups[self.current].moved, self.home)
            self.move(self.groups[index].moved, self.device)
            self.current = index
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        self.callers.append(None if first is None else first.device)
        return _moved(args, self.device), _moved(kwargs, self.device)

    def _leave(self, index: int, out: Any) -> Any:
        if not self.keep:
            self.move(self.groups[index].moved, self.home)
            self.current = None
        caller = self.callers.pop()
        return out if caller is None else _moved(out, str(caller))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def unet_blocks(unet: nn.Module) -> list[nn.Module]:
    """The UNet's top-level blocks, in the order they run: what `sequential` streams one at a time."""
    blocks: list[nn.Module] = []
    for child in unet.children():
        blocks.extend(child.children() if isinstance(child, nn.ModuleList) else [child])
    return blocks


def groups(components: dict[str, nn.Module], mode: str) -> list[Group]:
    """A group per component (the VAE is entered through its parts: decode is not its forward), or, for
    `sequential`, one per UNet block."""
    out = []
    for name, module in components.items():
        if name == "unet" and mode == "sequential":
            out += [Group(block, (block,)) for block in unet_blocks(module)]
        elif name == "vae":
            out.append(Group(module, tuple(module.children())))
        else:
            out.append(Group(module, (module,)))
    return out


def pipeline_modules(pipe: Any) -> dict[str, nn.Module]:
    """A Pipeline's components by name, as `enable_offload` takes them."""
    encoders = {f"text_encoder_{i}": e.model for i, e in enumerate(pipe.text_encoders)}
    return {"unet": pipe.unet, "vae": pipe.vae, **encoders}


def enable_offload(components: dict[str, nn.Module], mode: str, device: str, move: Move = _to) -> Offload:
    """Hook `components` (name -> module: unet, vae, text encoders) for `mode`; returns the hooks."""
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"unknown offload mode {mode!r}; one of {', '.join(OFFLOAD_MODES)}")
    offload = Offload(device, keep=mode == "model", move=move)
    for group in groups(components, mode):
        offload.add(group)
    return offload
