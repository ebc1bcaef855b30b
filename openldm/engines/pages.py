"""Mapped file pages an engine no longer reads: handed back to the kernel so they stop counting as ours.

OpenVINO's CPU plugin maps its cached program (and the IR's weights) read-only, and while compiling
widens and repacks the weights into memory of its own; afterwards it reads only a few constants from
the mapping, yet every page it read while compiling still counts as the process's resident memory
(full-size SD1.5 UNet: 1.6 GiB of a 5.0 GiB program). `MADV_DONTNEED` on a read-only shared file
mapping only drops this process's view of the pages: a later read maps the same bytes from the file
again, so no value can change. Linux only; elsewhere nothing is done.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MADV_DONTNEED = 4  # Linux


def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def read_only_mappings(folder: Path, maps: Path = Path("/proc/self/maps")) -> list[tuple[int, int]]:
    """(start, end) of this process's read-only shared mappings of files under `folder`."""
    inside = str(folder.resolve()) + "/"
    found = []
    for line in maps.read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[1] == "r--s" and parts[5].startswith(inside):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            found.append((start, end))
    return found


def drop_mapped_pages(folder: Path) -> int:
    """Let the kernel drop the resident pages of read-only shared mappings of files under `folder`;
    returns the bytes advised (0 where this is not Linux)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        mappings = read_only_mappings(folder)
    except OSError:  # no /proc here (a sandbox): the pages only stay counted
        return 0
    madvise, advised = _madvise(), 0
    for start, end in mappings:
        if madvise(start, end - start, MADV_DONTNEED) == 0:
            advised += end - start
    return advised


@contextmanager
def dropping_mapped_pages(folder: Path, every: float = 0.1) -> Iterator[None]:
    """`drop_mapped_pages` every `every` seconds while the block runs (a compile reading its blob: the
    pages it has widened go at once, rather than all staying until it ends), and once after."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            drop_mapped_pages(folder)

    worker = threading.Thread(target=loop, name="drop-mapped-pages", daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()
        drop_mapped_pages(folder)
