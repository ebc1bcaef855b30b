"""Where openldm keeps what it could compute again: `$OPENLDM_CACHE`, else `~/.cache/openldm`.

Engine programs (`engines/cache.py`), file hashes (`checkpoints/hashing.py`) and the tokenizer's
Unicode classes live in folders under it; deleting any of them only costs the time to recompute.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from openldm.atomic import write_bytes_atomic

CACHE_ENV = "OPENLDM_CACHE"


def cache_dir(part: str) -> Path:
    """The folder for one kind of cached thing (not created)."""
    base = os.environ.get(CACHE_ENV)
    return (Path(base) if base else Path.home() / ".cache" / "openldm") / part


def remembered(part: str, name: str, compute: Callable[[], str], valid: Callable[[str], bool]) -> str:
    """The text kept as `name` under `part` if `valid` accepts it, else `compute()`, kept for next time
    (a read-only or missing cache only means it is not remembered)."""
    memo = cache_dir(part) / name
    try:
        known = memo.read_text()
    except (OSError, ValueError):
        known = None
    if known is not None and valid(known):
        return known
    value = compute()
    with contextlib.suppress(OSError):
        write_bytes_atomic(memo, value.encode())
    return value
