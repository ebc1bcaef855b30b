"""Model hashes as AUTOMATIC1111 shows them ("Model hash"): the first 10 hex digits of a SHA-256.

A single file hashes like A1111 (`sha256` of the file), so the two tools print the same hash for it.
A folder (diffusers, or a model folder) hashes its weight files in path order, names included.
Hashing a 2 GB file takes 1.6 s, so each hash is kept under `user_cache` "hashes", keyed as A1111's
cache is by the files' identities (path, size, modification time): a later run reads it back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from openldm.user_cache import remembered

SHORT = 10  # A1111's `shorthash` length
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
_BLOCK = 1 << 20


def _update(digest, path: Path) -> None:
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no weight files to hash")
    return files


def _compute(path: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    if path.is_file():
        _update(digest, path)
        return digest.hexdigest()
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        _update(digest, file)
    return digest.hexdigest()


def _is_digest(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, or of a folder's weight files (relative path, then bytes, in path order)."""
    path = Path(path)
    files = _files(path)
    stats = [(f, f.stat()) for f in files]
    identity = json.dumps([str(path.resolve())] + [[str(f), s.st_size, s.st_mtime_ns] for f, s in stats])
    name = hashlib.sha256(identity.encode()).hexdigest()
    return remembered("hashes", name, lambda: _compute(path, files), _is_digest)


def model_hash(path: str | Path) -> str:
    """The short hash that infotexts carry."""
    return sha256(path)[:SHORT]
