"""Engines: who runs a component's forward (eager PyTorch, `torch.compile`, OpenVINO), one interface.

The pipeline calls each component through a `base.Runner` and never learns which engine is behind
it. `base.get_engine(name)` refuses an engine whose package is missing with one line naming the
extra that installs it. This module imports no torch, so the CLI can list the names at once.
"""

ENGINE_NAMES = ("auto", "eager", "compile", "openvino", "openvino-int8", "openvino-int8-weights",
                "openvino-int8-hybrid", "openvino-bf16")
OFFLOAD_MODES = ("model", "sequential")  # see `offload`
DEFAULT_ENGINE = "auto"  # the fastest exact engine installed (OpenVINO on the CPU), else eager
ENGINE_ENV = "OPENLDM_ENGINE"  # the CLI's and server's engine when --engine is not given


def default_engine() -> str:
    """`$OPENLDM_ENGINE`, else auto: what `openldm generate` and `openldm serve` run without --engine."""
    import os

    return os.environ.get(ENGINE_ENV) or DEFAULT_ENGINE
