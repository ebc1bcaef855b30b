"""The on-disk cache of converted programs: one folder per (model, component, engine, settings, shapes).

The key is a SHA-256 over all of them, so changing any one (other weights, an engine option, a new
image size) misses and converts afresh, while a restart finds the old conversion. The folder is
`$OPENLDM_CACHE/engines` (default `~/.cache/openldm/engines`). Weights built in memory, or changed
by a LoRA merge, are keyed by a hash of their tensors (`tensor_hash`). Weights still as read from a
file are hashed once: `weights_hash` keeps the file's identity -> tensor hash in `identities/`, so a
later run finds its program without reading (or even loading) the weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from openldm.atomic import write_bytes_atomic
from openldm.engines.base import Component
from openldm.user_cache import cache_dir


def cache_root() -> Path:
    return cache_dir("engines")


def tensor_hash(module: nn.Module) -> str:
    """SHA-256 over the state dict's names, shapes, dtypes and bytes: the weights' identity."""
    digest = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}\0".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def cache_key(model: str, role: str, engine: str, settings: dict[str, Any], shapes: Any) -> str:
    """The hex key of one conversion; every argument is part of it."""
    text = json.dumps({"model": model, "role": role, "engine": engine, "settings": settings,
                       "shapes": shapes}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def entry(key: str, root: Path | None = None) -> Path:
    """The folder of one cache entry (not created)."""
    return (root or cache_root()) / key


def weights_hash(component: Component, root: Path | None = None) -> str:
    """The component's `tensor_hash`, remembered by file identity while its weights are the file's."""
    weights = component.weights
    if weights is None:
        return tensor_hash(component.module)
    memo = (root or cache_root()) / "identities" / hashlib.sha256(weights.identity.encode()).hexdigest()
    known = memo.read_text() if memo.is_file() else None
    if weights.pristine() and known:
        return known
    digest = tensor_hash(component.ready())
    if known is None and weights.pristine():
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(memo, digest.encode())
    elif digest == known:  # changed in memory and back, bit for bit (a LoRA merged, then removed)
        weights.mark_pristine()
    return digest
