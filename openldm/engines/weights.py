"""Weights that may live only in their file: an engine that bakes them into its program drops torch's copy.

An OpenVINO program holds its own copy of the UNet's weights, so keeping torch's beside it doubles
the largest part of a model's memory (3.4 GB for SD1.5 in fp32). `FileWeights` lets the torch module
go empty (`meta`) while its weights are still the file's, and reads them back when torch needs them
again (an eager call, a LoRA merge, calibration). Weights changed in memory are never dropped: the
file could not give them back. `identity` names the file's weights without reading them, so an
engine's cache can find its program before any tensor is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

State = dict[str, torch.Tensor]


def version(module: nn.Module) -> int:
    """Changes whenever a parameter is replaced (`.data = ...`) or modified in place."""
    return hash(tuple((p.data_ptr(), p._version) for p in module.parameters()))


def file_identity(path: Path, part: str, dtype: torch.dtype | None, extra: object = None) -> str:
    """One file's weights for one component, as placed: path, size and mtime stand for its bytes."""
    stat = path.stat()
    return json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, part, str(dtype), extra])


class FileWeights:
    """A module's weights as read from a file: released to `meta` and read back on demand."""

    def __init__(self, module: nn.Module, read: Callable[[], State], identity: str,
                 device: torch.device, dtype: torch.dtype, loaded: bool = True, releasable: bool = True):
        self.module, self._read, self.identity = module, read, identity
        # False: the module is also called directly (the VAE), so it is only named by its file, never dropped
        self.releasable = releasable
        self._placed = device, dtype  # where the file's weights go when read
        self._as_read: int | None = version(module) if loaded else None
        self.reads = 0  # times read from the file (not counting a load that read them at once)

    @property
    def released(self) -> bool:
        return any(p.is_meta for p in self.module.parameters())

    @property
    def device(self) -> torch.device:
        return self._placed[0] if self.released else next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self._placed[1] if self.released else next(self.module.parameters()).dtype

    def pristine(self) -> bool:
        """The weights are the file's: released, or unchanged since they were read."""
        return self.released or version(self.module) == self._as_read

    def mark_pristine(self) -> None:
        """The caller checked the weights' bytes against the file's (a LoRA merge undone bit for bit)."""
        self._as_read = version(self.module)

    def materialize(self) -> nn.Module:
        """The module with its weights in memory (read from the file again if they were released)."""
        if self.released:
            self.module.load_state_dict(self._read(), strict=True, assign=True)
            self.reads += 1
            self.module.eval()
            self._as_read = version(self.module)
        return self.module

    def release(self) -> bool:
        """Drop torch's copy if the file can give it back; True when the module is now empty."""
        if not (self.releasable and self.pristine()):
            return False
        self.module.to("meta")
        return True
