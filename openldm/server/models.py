"""The models a server offers: the default one and those under `--models-dir`, by name only.

A job names a model; the name is looked up in this listing and never joined onto a path, so
`../../etc/passwd` or an absolute path simply is not a model (404).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openldm.checkpoints.hashing import SHORT, sha256
from openldm.config import ModelConfig
from openldm.pipelines.loading import MODEL_FILE

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


@dataclass(frozen=True)
class ModelEntry:
    name: str  # what jobs and A1111's `sd_model_checkpoint` use
    path: Path
    filename: str  # relative to the models folder (A1111's title)
    sha256: str
    config: ModelConfig | None  # what its header or config.json files describe; None: not told cheaply

    @property
    def family(self) -> str | None:
        return self.config.family if self.config is not None else None

    @property
    def native_size(self) -> int | None:
        """The side its config was trained at (the page's size presets); None when unknown."""
        return self.config.image_size if self.config is not None else None

    @property
    def hash(self) -> str:
        return self.sha256[:SHORT]

    @property
    def title(self) -> str:
        return f"{self.filename} [{self.hash}]"


class UnknownModel(LookupError):
    """No model of that name in the listing."""


class FileFacts:
    """What reading a model file tells (its hash, and what `read` derives), cached by (path, size, mtime):
    a rescan costs nothing for files that did not change."""

    def __init__(self, read: Callable[[Path], Any]) -> None:
        self.read = read
        self._seen: dict[tuple[str, int, int], tuple[str, Any]] = {}

    def __call__(self, path: Path) -> tuple[str, Any]:
        stat = path.stat()
        key = (str(path), stat.st_size if path.is_file() else 0, int(stat.st_mtime))
        if key not in self._seen:
            self._seen[key] = sha256(path), self.read(path)
        return self._seen[key]


class ModelCatalog:
    """Scans the models folder when asked (`refresh`); hashes and configs cached by (path, size, mtime)."""

    def __init__(self, default: Path, folder: Path | None = None, skip: Path | None = None) -> None:
        self.default, self.folder, self.skip = default, folder, skip  # skip: the ControlNet folder
        self._facts = FileFacts(model_config)
        self.entries: dict[str, ModelEntry] = {}
        self.refresh()

    def refresh(self) -> None:
        found = {_name(self.default): self.default}
        if self.folder is not None and self.folder.is_dir():
            for path in sorted(self.folder.rglob("*")):
                skipped = self.skip is not None and path.is_relative_to(self.skip)
                if _is_model(path) and not skipped and not _inside_model_folder(path, self.folder):
                    found.setdefault(_name(path), path)
        self.entries = {name: self._entry(name, path) for name, path in found.items()}

    def _entry(self, name: str, path: Path) -> ModelEntry:
        base = self.folder if self.folder is not None and path.is_relative_to(self.folder) else path.parent
        return ModelEntry(name, path, path.relative_to(base).as_posix(), *self._facts(path))

    @property
    def default_name(self) -> str:
        return _name(self.default)

    def get(self, name: str | None) -> ModelEntry:
        """The entry for a name, an A1111 title ("file [hash]"), or a hash; None: the default."""
        if name is None:
            return self.entries[self.default_name]
        if name in self.entries:
            return self.entries[name]
        for entry in self.entries.values():
            if name in (entry.title, entry.filename, entry.hash, entry.sha256):
                return entry
        raise UnknownModel(f"no model {name!r}; GET /v1/models lists them")


def _name(path: Path) -> str:
    return path.stem if path.is_file() else path.name


def _is_model(path: Path) -> bool:
    if path.is_file():
        return path.suffix in MODEL_SUFFIXES and path.name != MODEL_FILE
    return (path / "model_index.json").is_file() or (path / MODEL_FILE).is_file()


def _inside_model_folder(path: Path, root: Path) -> bool:
    """Files that belong to a diffusers folder or a model folder are not models of their own."""
    return any(_is_model(parent) for parent in path.parents if parent != root and parent.is_relative_to(root))


def model_config(path: Path) -> ModelConfig | None:
    """The config a model shows without building it: a safetensors header, a pickle's shapes (a
    `weights_only` load, memory-mapped for zip files) or a diffusers folder's config.json files."""
    from openldm.checkpoints.detect import detect
    from openldm.checkpoints.diffusers_layout import detect_diffusers
    from openldm.checkpoints.io import read_state_dict

    file = path / MODEL_FILE if path.is_dir() and (path / MODEL_FILE).is_file() else path
    try:
        if file.is_dir():
            return detect_diffusers(file)
        if file.suffix == ".safetensors":
            shapes, metadata = _header(file)
        else:
            tensors, metadata = read_state_dict(file)
            shapes = {k: tuple(t.shape) for k, t in tensors.items()}
        return detect(shapes, metadata=metadata)
    except Exception:  # a model we cannot classify: the load will say why, if anyone asks for it
        return None


def _header(file: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        return shapes, dict(f.metadata() or {})
