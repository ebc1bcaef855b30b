"""Files written whole or not at all: an interrupted run never leaves a broken output behind.

Kept free of torch so that light commands (a client of `openldm serve`, `png-info`) can use it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file beside `path`, renamed onto it if the block succeeds and removed if not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(paths: Iterable[str | Path]) -> list[Path]:
    """Fail now, naming the path, if a file could not be written there: before minutes of work, not after.

    Missing folders are fine (`atomic_path` creates them) as long as the nearest existing one is writable.
    """
    paths = [Path(path) for path in paths]
    probed: set[Path] = set()
    for path in paths:
        if path.is_dir():
            raise OSError(f"output {path} is a folder, not a file")
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if folder not in probed:
            _probe(folder, path)
            probed.add(folder)
    return paths


def _probe(folder: Path, path: Path) -> None:
    """Create and remove a file in `folder`, the way `atomic_path` will write `path`."""
    if not folder.is_dir():
        raise OSError(f"output {path} cannot be written: {folder} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".openldm-probe.", suffix=".tmp")
    except OSError as e:
        raise OSError(f"output {path} cannot be written: {folder}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(name)


def default_permissions(path: str | Path) -> None:
    """mkstemp makes owner-only files; give the finished file the mode a plain open() would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write any small file (JSON, PNG) the same all-or-nothing way."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path
