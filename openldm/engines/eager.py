"""The eager engine: PyTorch runs the module as written (the default, and the reference)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from openldm.engines.base import Call, Component


@dataclass(frozen=True)
class Eager:
    name: str = "eager"

    def settings(self) -> dict[str, Any]:
        return {}

    def build(self, component: Component, example: Sequence[torch.Tensor | None]) -> Call:
        return component.call


def make() -> Eager:
    return Eager()
