"""Where the model that ships inside the package lives.

It is a model folder: `model.safetensors` (single-file layout) and the tokenizer files beside it,
loaded by `openldm.load` like any checkpoint. The CLI uses it when no `--model` is given.
"""

from __future__ import annotations

from pathlib import Path


def default_model_path() -> Path:
    """The embedded model's folder (it may be absent: not trained yet, or a slim install)."""
    return Path(__file__).parent.parent / "weights" / "shapes"
