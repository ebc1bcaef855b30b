"""Where openldm keeps what it could compute again: `$OPENLDM_CACHE`, else `~/.cache/openldm`.

Engine programs (`engines/cache.py`) and file hashes (`checkpoints/hashing.py`) live in folders
under it; deleting any of them only costs the time to recompute.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "OPENLDM_CACHE"


def cache_dir(part: str) -> Path:
    """The folder for one kind of cached thing (not created)."""
    base = os.environ.get(CACHE_ENV)
    return (Path(base) if base else Path.home() / ".cache" / "openldm") / part
