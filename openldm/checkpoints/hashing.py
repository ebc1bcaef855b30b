"""Model hashes as AUTOMATIC1111 shows them ("Model hash"): the first 10 hex digits of a SHA-256.

A single file hashes like A1111 (`sha256` of the file), so the two tools print the same hash for it.
A folder (diffusers, or a model folder) hashes its weight files in path order, names included.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SHORT = 10  # A1111's `shorthash` length
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
_BLOCK = 1 << 20


def _update(digest, path: Path) -> None:
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, or of a folder's weight files (relative path, then bytes, in path order)."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        _update(digest, path)
        return digest.hexdigest()
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no weight files to hash")
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        _update(digest, file)
    return digest.hexdigest()


def model_hash(path: str | Path) -> str:
    """The short hash that infotexts carry."""
    return sha256(path)[:SHORT]
