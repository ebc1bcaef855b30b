"""The models a server offers: the default one and those under `--models-dir`, by name only.

A job names a model; the name is looked up in this listing and never joined onto a path, so
`../../etc/passwd` or an absolute path simply is not a model (404).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from openldm.checkpoints.hashing import SHORT, sha256
from openldm.config import PRESETS, ModelConfig
from openldm.pipelines.pipeline import MODEL_FILE

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


@dataclass(frozen=True)
class ModelEntry:
    name: str  # what jobs and A1111's `sd_model_checkpoint` use
    path: Path
    filename: str  # relative to the models folder (A1111's title)
    sha256: str
    # The config its header or config files describe, read without the weights; None when that cannot
    # be told cheaply (a .ckpt is a pickle: only loading it reads it).
    config: ModelConfig | None = field(default=None, compare=False, repr=False)

    @property
    def preset(self) -> str | None:
        """The preset it matches; None for other shapes or an unknown config."""
        return self.config.name if self.config is not None and self.config.name in PRESETS else None

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


class ModelCatalog:
    """Scans the models folder when asked (`refresh`); hashes are cached per (path, size, mtime)."""

    def __init__(self, default: Path, folder: Path | None = None) -> None:
        self.default, self.folder = default, folder
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._configs: dict[tuple[str, int, int], ModelConfig | None] = {}
        self.entries: dict[str, ModelEntry] = {}
        self.refresh()

    def refresh(self) -> None:
        found = {_name(self.default): self.default}
        if self.folder is not None and self.folder.is_dir():
            for path in sorted(self.folder.rglob("*")):
                if _is_model(path) and not _inside_model_folder(path, self.folder):
                    found.setdefault(_name(path), path)
        self.entries = {name: self._entry(name, path) for name, path in found.items()}

    def _entry(self, name: str, path: Path) -> ModelEntry:
        stat = path.stat()
        key = (str(path), stat.st_size if path.is_file() else 0, int(stat.st_mtime))
        if key not in self._hashes:
            self._hashes[key] = sha256(path)
            self._configs[key] = header_config(path)
        base = self.folder if self.folder is not None and path.is_relative_to(self.folder) else path.parent
        filename = path.relative_to(base).as_posix()
        return ModelEntry(name, path, filename, self._hashes[key], self._configs[key])

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


def header_config(path: Path) -> ModelConfig | None:
    """The config of a safetensors file or model folder (from its header: keys, shapes and metadata, no
    tensor is read) or of a diffusers folder (its config.json files); None for what cannot be read so."""
    from openldm.checkpoints.detect import detect
    from openldm.checkpoints.diffusers_layout import detect_diffusers
    from openldm.checkpoints.io import read_metadata

    if path.is_dir() and (path / "model_index.json").is_file():
        try:
            return detect_diffusers(path)
        except Exception:  # config files we cannot classify: the load will say why, if anyone asks
            return None
    file = path / MODEL_FILE if path.is_dir() else path
    if file.suffix != ".safetensors" or not file.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        return detect(shapes, metadata=read_metadata(file))
    except Exception:  # a header we cannot classify: the load will say why, if anyone asks for it
        return None
