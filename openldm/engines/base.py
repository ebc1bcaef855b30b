"""The engine interface, and the `Runner` that builds one engine program per input signature.

An engine turns a component's call (`unet(x, t, context, y)`, `vae.decode(z)`) into a
callable for fixed input shapes. Programs that bake the weights in (frozen `torch.compile`,
OpenVINO) go stale when the weights change in place (a LoRA merge), so a `Runner` keys its
programs by the inputs' shapes and dtypes and by the weights' identity (`Component.version`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from openldm.engines import ENGINE_NAMES
from openldm.engines.weights import FileWeights, version

Call = Callable[..., Any]
Signature = tuple[tuple[tuple[int, ...], str] | None, ...]  # (shape, dtype) per argument; None: absent

_MODULES = {"auto": "openldm.engines.auto", "eager": "openldm.engines.eager",
            "compile": "openldm.engines.compiled", "openvino": "openldm.engines.openvino",
            "openvino-int8": "openldm.engines.int8",
            "openvino-int8-weights": "openldm.engines.int8:make_weights",
            "openvino-int8-hybrid": "openldm.engines.int8:make_hybrid",
            "openvino-bf16": "openldm.engines.openvino:make_bf16"}


class EngineError(ValueError):
    """An engine that cannot run here: unknown, or its package is not installed."""


@dataclass(frozen=True)
class Component:
    """What an engine builds from: the module holding the weights, the call and its role."""

    module: nn.Module
    call: Call
    role: str  # "unet", "vae_decoder"
    # Inputs like the example's, from the model's own pipeline: what post-training quantization sees.
    calibration: Callable[[Sequence[Any]], list[tuple[Any, ...]]] | None = None
    weights: FileWeights | None = None  # when the module's weights can be dropped and read back

    @property
    def device(self) -> torch.device:
        return self.weights.device if self.weights is not None else next(self.module.parameters()).device

    def ready(self) -> nn.Module:
        """The module with its weights in memory, for a call or a conversion that needs torch's copy."""
        return self.weights.materialize() if self.weights is not None else self.module

    def release(self) -> None:
        """An engine baked the weights into its program: drop torch's copy if the file can give it back."""
        if self.weights is not None:
            self.weights.release()

    def version(self) -> int | str:
        """The weights' identity: the file's while they are its own (even released), else a version."""
        if self.weights is not None and self.weights.pristine():
            return self.weights.identity
        return version(self.module)


class Engine(Protocol):
    """A way to run a component; `build` returns a callable for inputs shaped like `example`."""

    name: str

    def settings(self) -> dict[str, Any]: ...

    def build(self, component: Component, example: Sequence[torch.Tensor | None]) -> Call: ...


def get_engine(name: str | Engine) -> Engine:
    """The engine called `name` (an engine object passes through); a missing package is one line."""
    if not isinstance(name, str):
        return name
    if name not in _MODULES:
        raise EngineError(f"unknown engine {name!r}; one of {', '.join(ENGINE_NAMES)}")
    module, _, factory = _MODULES[name].partition(":")  # "module" or "module:factory" (default make)
    return getattr(importlib.import_module(module), factory or "make")()


def signature(args: Sequence[Any]) -> Signature:
    """Shapes and dtypes of the tensor arguments, the key of one engine program."""
    return tuple((tuple(a.shape), str(a.dtype)) if isinstance(a, torch.Tensor) else None for a in args)


@dataclass
class Runner:
    """A component called through an engine: one program per (signature, weights version), built lazily."""

    engine: Engine
    component: Component
    programs: dict[tuple[Signature, int | str], Call] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.engine.name

    def __call__(self, *args: Any) -> Any:
        if self.engine.name == "eager":
            self.component.ready()
            return self.component.call(*args)
        key = (signature(args), self.component.version())
        program = self.programs.get(key)
        if program is None:
            self.programs = {k: v for k, v in self.programs.items() if k[1] == key[1]}  # drop stale weights
            program = self.programs[key] = self.engine.build(self.component, args)
        with torch.no_grad():
            return program(*args)
