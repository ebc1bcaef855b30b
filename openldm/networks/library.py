"""Networks and embeddings that prompts name, found in folders by file stem, as AUTOMATIC1111 finds them.

`<lora:film_grain:0.6>` (or `<lyco:...>`) names `film_grain.safetensors` (or `.pt`, `.ckpt`) anywhere
under a LoRA folder; an embedding is used by writing its name (the file stem) in the prompt. Folders are
searched recursively, skipping hidden ones. When two files share a stem, the first folder given wins,
then the first path in sorted order: the choice does not depend on the file system's listing order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from openldm.checkpoints.io import CheckpointError
from openldm.networks.embeddings import Embedding, load_embedding
from openldm.networks.formats import LoadedNetwork, load_network
from openldm.prompts import NetworkRef, extract_networks

NETWORK_SUFFIXES = (".safetensors", ".pt", ".ckpt")
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
NETWORK_KINDS = ("lora", "lyco")  # prompt tags that name a LoRA/LyCORIS file (A1111 >= 1.5 reads both)
_LISTED = 30  # names an unknown-name error lists before "... and N more"


Folders = str | Path | Iterable[str | Path]


def _folders(dirs: Folders) -> list[Path]:
    """One folder or several: a lone string is a folder, not a sequence of one-letter folders."""
    return [Path(dirs)] if isinstance(dirs, str | Path) else [Path(d) for d in dirs]


def find_files(dirs: Folders, suffixes: Sequence[str], what: str) -> dict[str, Path]:
    """File stem -> path of every file under `dirs` whose suffix is one of `suffixes`."""
    found: dict[str, Path] = {}
    for folder in _folders(dirs):
        if not folder.is_dir():
            problem = "is not a folder" if folder.exists() else "does not exist"
            raise CheckpointError(f"{what} folder {folder} {problem}")
        for path in sorted(folder.rglob("*")):
            hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
            if path.suffix.lower() in suffixes and not hidden and path.is_file():
                found.setdefault(path.stem, path)
    return found


def network_refs(*texts: str) -> list[NetworkRef]:
    """The extra-network tags of some prompts, in order."""
    return [ref for text in texts for ref in extract_networks(text)[1]]


def _names(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more if names else "none"


class NetworkLibrary:
    """The LoRA/LyCORIS files under some folders, by name; the networks last used stay loaded."""

    def __init__(self, dirs: Folders = ()) -> None:
        self.dirs = _folders(dirs)
        self.files = find_files(self.dirs, NETWORK_SUFFIXES, "LoRA")
        self._loaded: dict[tuple[Path, int], LoadedNetwork] = {}  # (path, mtime) -> network

    def path(self, ref: NetworkRef) -> Path:
        """The file a prompt tag names; the folders are read again before a name is called unknown."""
        if ref.kind not in NETWORK_KINDS:
            raise CheckpointError(f"<{ref.kind}:{ref.name}>: {ref.kind} networks are not supported; "
                                  f"prompts can name {' and '.join(f'<{k}:...>' for k in NETWORK_KINDS)}")
        if not self.dirs:
            raise CheckpointError(f"the prompt names <{ref.kind}:{ref.name}>, but no LoRA folders are given: "
                                  "pass --lora-dir DIR to the command that loads the model (with --server, "
                                  "to `openldm serve`: a server looks only in its own --lora-dir folders; "
                                  "Python: openldm.load(..., lora_dirs=[DIR]))")
        if ref.name not in self.files:  # perhaps a file added since the folders were read
            self.files = find_files(self.dirs, NETWORK_SUFFIXES, "LoRA")
        if ref.name not in self.files:
            folders = ", ".join(map(str, self.dirs))
            raise CheckpointError(f"no LoRA named {ref.name!r} (<{ref.kind}:{ref.name}>) in {folders}; "
                                  f"available: {_names(self.files)}")
        return self.files[ref.name]

    def load(self, refs: Sequence[NetworkRef]) -> list[tuple[LoadedNetwork, float]]:
        """(network, weight) for each tag; a file unchanged since the last call is not read again."""
        keys = [(path, path.stat().st_mtime_ns) for path in map(self.path, refs)]
        self._loaded = {key: self._loaded.get(key) or load_network(key[0]) for key in keys}
        return [(self._loaded[key], ref.weight) for key, ref in zip(keys, refs)]


def read_embeddings(dirs: Folders) -> list[Embedding]:
    """Every embedding file under `dirs`; CheckpointError names a file that is not one."""
    found: dict[str, Embedding] = {}
    for path in find_files(dirs, EMBEDDING_SUFFIXES, "embedding").values():
        embedding = load_embedding(path)  # named by its stem, or a diffusers file by its token
        found.setdefault(embedding.name, embedding)
    return list(found.values())
