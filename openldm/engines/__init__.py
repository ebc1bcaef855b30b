"""Engines: who runs a component's forward (eager PyTorch, `torch.compile`, OpenVINO), one interface.

The pipeline calls each component through a `Runner` (see `base`) and never learns which engine
is behind it. `get_engine(name)` refuses an engine whose package is missing with one line naming
the extra that installs it.
"""

from openldm.engines.base import ENGINE_NAMES, Engine, EngineError, Runner, get_engine

__all__ = ["ENGINE_NAMES", "Engine", "EngineError", "Runner", "get_engine"]
