"""Textual-inversion embeddings (Gal et al. 2022): learned token vectors, from the files people share.

Formats read:
- A1111 `.pt`: `{"string_to_param": {"*": (n, dim)}, "name": ..., "step": ...}`;
- A1111 `.safetensors`: `{"emb_params": (n, dim)}`;
- SDXL: `{"clip_l": (n, 768), "clip_g": (n, 1280)}`, one set per text encoder;
- diffusers `learned_embeds.bin` / `.safetensors`: `{token: (dim,) or (n, dim)}`.
Pickled files go only through `torch.load(weights_only=True)`. The trigger word is the file stem, as in
A1111; a diffusers file still called `learned_embeds` is named after the token inside it.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from openldm.checkpoints.io import PICKLE_SUFFIXES, CheckpointError, read_state_dict
from openldm.checkpoints.layout import TEXT_ENCODER_NAMES
from openldm.config import ModelConfig

ANY = "any"  # the slot of a single-encoder file: it fits whichever encoder has its width
SDXL_SLOTS = ("clip_l", "clip_g")
# Which slot each text encoder of a family takes (components named as in `checkpoints.layout`).
_SDXL_ROUTES = {
    "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
    "sdxl_refiner": {"text_encoder": "clip_g"},
}


@dataclass(frozen=True)
class Embedding:
    """One embedding: `vectors[slot]` is (n, width); `slot` is `clip_l`/`clip_g` or `any`."""

    name: str
    vectors: dict[str, Tensor]
    source: Path | None = None

    @property
    def num_vectors(self) -> int:
        """How many prompt tokens the embedding takes up."""
        return next(iter(self.vectors.values())).shape[0]

    def for_model(self, config: ModelConfig) -> dict[str, Tensor]:
        """Text-encoder component -> its vectors; CheckpointError when the widths do not fit."""
        widths = {name: te.hidden_size for name, te in zip(TEXT_ENCODER_NAMES, config.text_encoders)}
        if ANY in self.vectors:
            if len(widths) != 1:
                raise CheckpointError(
                    f"embedding {self.name!r} has one set of vectors ({self._shapes()}); {config.name} has "
                    f"{len(widths)} text encoders, which need an SDXL embedding ({' and '.join(SDXL_SLOTS)})"
                )
            routes = {next(iter(widths)): ANY}
        else:
            routes = _SDXL_ROUTES.get(config.family)
            if routes is None or not set(routes.values()) <= set(self.vectors):
                raise CheckpointError(f"embedding {self.name!r} ({self._shapes()}) is not for {config.name}")
        out = {component: self.vectors[slot] for component, slot in routes.items()}
        for component, vectors in out.items():
            if vectors.shape[1] != widths[component]:
                raise CheckpointError(
                    f"embedding {self.name!r} ({self._shapes()}) does not fit {config.name}: its {component} "
                    f"is {widths[component]} wide"
                )
        return out

    def _shapes(self) -> str:
        return ", ".join(f"{slot} {tuple(v.shape)}" for slot, v in self.vectors.items())


def _matrix(value, what: str) -> Tensor:
    """A (n, width) float32 tensor; a single vector becomes one row."""
    if not isinstance(value, Tensor) or value.ndim not in (1, 2):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise CheckpointError(f"{what}: expected vectors of shape (n, width) or (width,), got {shape}")
    return value.detach().to(torch.float32).reshape(-1, value.shape[-1])


def parse_embedding(data: Mapping, name: str) -> Embedding:
    """An embedding from the loaded file contents; CheckpointError names the keys of an unknown format."""
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise CheckpointError(f"{name}: `string_to_param` should hold one tensor, got {params!r:.80}")
        vectors = {ANY: _matrix(next(iter(params.values())), name)}
    elif "emb_params" in data:  # A1111 .safetensors
        vectors = {ANY: _matrix(data["emb_params"], name)}
    elif set(data) & set(SDXL_SLOTS):
        vectors = {slot: _matrix(data[slot], f"{name} {slot}") for slot in SDXL_SLOTS if slot in data}
    elif len(data) == 1 and isinstance(next(iter(data.values())), Tensor):  # diffusers {token: vector}
        token, value = next(iter(data.items()))
        name = str(token) if name == "learned_embeds" else name
        vectors = {ANY: _matrix(value, name)}
    else:
        keys = sorted(map(str, data))[:8]
        raise CheckpointError(f"{name}: not a textual-inversion embedding in any format we know; keys {keys}")
    counts = {v.shape[0] for v in vectors.values()}
    if len(counts) != 1:
        raise CheckpointError(f"{name}: its vector sets differ in length ({sorted(counts)})")
    return Embedding(name, vectors)


def _load_pickle(path: Path) -> Mapping:
    """The whole object (A1111 files nest dicts and strings), through the weights-only unpickler."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused: not a plain tensor file, and loading it would run code from inside it"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated file ({e})") from None
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: holds a {type(data).__name__}, not a dict")
    return data


def load_embedding(path: str | Path, name: str | None = None) -> Embedding:
    """Read one embedding file; its trigger word is `name`, else the file stem."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        data = _load_pickle(path)
    else:
        data = read_state_dict(path)[0]
    try:
        embedding = parse_embedding(data, name or path.stem)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return Embedding(embedding.name, embedding.vectors, path)
