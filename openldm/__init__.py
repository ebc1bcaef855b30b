"""openldm: a complete, hackable latent diffusion (Stable Diffusion) system.

`openldm.load(path)` returns a ready `Pipeline`. It is imported on first use (PEP 562), so that
`import openldm` stays cheap for tools that only need the version or a submodule.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from openldm.pipelines.loading import load

        return load
    raise AttributeError(f"module 'openldm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
