"""`openvino-int8`: the opt-in fast mode, W8A8 post-training quantization of the UNet (NNCF), inexact.

The UNet is converted as by the fp32 `openvino` engine, then quantized with NNCF on calibration
inputs from the model's own pipeline (`calibration`: real prompts, every noise level of short runs).
The VAE decoder stays fp32. The quantized IR is cached like any conversion; the calibration setting
is part of its key. The trade is measured, never assumed: docs/engines.md has PSNR and eval figures.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from openldm.engines.base import Component, EngineError
from openldm.engines.openvino import OpenVINO


@dataclass(frozen=True)
class OpenVINOInt8(OpenVINO):
    name: str = "openvino-int8"
    prompts: int = 4  # calibration runs, one prompt each
    steps: int = 8  # sampling steps per calibration run: one calibration input per step

    def settings(self) -> dict[str, Any]:
        import nncf

        return {**super().settings(), "nncf": nncf.__version__, "quantization": "w8a8",
                "prompts": self.prompts, "steps": self.steps}

    def convert(self, component: Component, present: tuple[bool, ...],
                example: Sequence[torch.Tensor | None]) -> Any:
        """The fp32 conversion, then (for the UNet) NNCF's quantization calibrated on pipeline inputs."""
        import nncf

        ir = super().convert(component, present, example)
        if component.role != "unet":
            return ir
        if component.calibration is None:
            raise EngineError(f"{self.name}: the {component.role} has no calibration inputs; "
                              "run it through a Pipeline")
        self.log(f"{self.name}: calibrating on {self.prompts} prompts x {self.steps} steps (eager runs)")
        samples = component.calibration(example)
        start = time.perf_counter()
        feeds = [[a.detach().cpu().numpy() for a, p in zip(s, present) if p] for s in samples]
        self.log(f"{self.name}: quantizing {component.role} on {len(feeds)} inputs")
        quantized = nncf.quantize(ir, nncf.Dataset(feeds), subset_size=len(feeds),
                                  model_type=nncf.ModelType.TRANSFORMER)
        self.log(f"{self.name}: {component.role} quantized in {time.perf_counter() - start:.1f} s")
        return quantized


def make() -> OpenVINOInt8:
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as e:
        raise EngineError('the openvino-int8 engine needs OpenVINO and NNCF: '
                          'pip install "openldm[cpu]"') from e
    return OpenVINOInt8()
