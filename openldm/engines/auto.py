"""`auto`: the fastest engine installed that keeps images within 1/255 of eager fp32.

On the CPU that is OpenVINO fp32 for the UNet when `openldm[cpu]` is installed (see `openvino`);
otherwise, or for a model on another device, eager PyTorch (asking for `openvino` by name when it is
missing is refused in one line naming the extra).
"""

from __future__ import annotations

from openldm.engines.base import Engine
from openldm.engines.eager import Eager

# Roles OpenVINO wins on, measured side by side (docs/engines.md): the UNet; the embedded model's
# small VAE decoder ran slower under OpenVINO than eagerly with one thread.
AUTO_ROLES = frozenset({"unet"})


def make() -> Engine:
    try:
        import openvino  # noqa: F401
    except ImportError:  # a plain install: eager is the fastest engine it has (README: the cpu extra)
        return Eager()
    from openldm.engines.openvino import OpenVINO

    return OpenVINO(roles=AUTO_ROLES)
