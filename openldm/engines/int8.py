"""`openvino-int8`: the opt-in fast mode, int8 UNet through NNCF (post-training, inexact).

The UNet is converted as by the fp32 `openvino` engine, then either quantized W8A8 (`nncf.quantize`,
int8 weights and activations) on calibration inputs from the model's own pipeline (`calibration`:
real prompts, every noise level of short runs), or, in `mode="weights"`, given int8 weights only
(`nncf.compress_weights`, no calibration; exact activations, smaller gain), or, in `mode="hybrid"`,
both: W8A8 for the matmuls (attention and linear layers), int8 weights with exact activations for
the convolutions, whose activation quantization carried most of W8A8's error. Layers named in
`ignored` stay fp32. With `decoder=True` (opt-in, Python only) the VAE decoder is W8A8 too, calibrated
on the final latents of the pipeline's own runs, its first and last convolutions fp32: there int8
convolutions cost little accuracy and take most of its time (SD1.5 at 256 px: 3.0 s -> 0.9 s).
Otherwise the VAE decoder, and TAESD always, stay fp32. Every setting is part of the cache key, so a
changed setting never reuses an old entry. The trade is measured, never assumed: docs/engines.md
has the PSNR, eval and speed figures behind the defaults (scripts/int8_accuracy.py made them).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from importlib.util import find_spec
from typing import Any

import torch

from openldm.engines.base import Component, EngineError
from openldm.engines.openvino import OpenVINO, node_pattern

MODES = ("w8a8", "weights", "hybrid")  # hybrid: W8A8 matmuls, int8-weight convolutions
PRESETS = ("performance", "mixed")  # NNCF: symmetric activations; asymmetric where they are not centred
# UNet layers whose inputs are least like the rest (the timestep MLP, the first and last convolutions
# on raw latents and eps): measured to carry most of the W8A8 error (docs/engines.md).
CONVOLUTIONS = ("Convolution", "GroupConvolution")  # OpenVINO op types
SENSITIVE = ("time_embed", "input_blocks.0.0", "out.2")
# the VAE decoder's layers on raw latents and on the final pixels: kept fp32 (docs/engines.md)
DECODER_SENSITIVE = ("post_quant_conv", "decoder.conv_in", "decoder.conv_out")


@dataclass(frozen=True)
class OpenVINOInt8(OpenVINO):
    name: str = "openvino-int8"
    mode: str = "w8a8"  # see MODES
    preset: str = "performance"  # see PRESETS (w8a8 only); mixed passed the bar too, with a slower step
    ignored: tuple[str, ...] = SENSITIVE  # UNet module paths kept fp32
    ignored_types: tuple[str, ...] = ()  # OpenVINO op types whose inputs stay fp32 (w8a8 only)
    smooth_quant: float | None = None  # SmoothQuant alpha for matmuls; None: NNCF's default; -1: off
    prompts: int = 4  # calibration runs, one prompt each (w8a8 only); 16 measured no better
    steps: int = 8  # sampling steps per calibration run: one calibration input per step
    decoder: bool = False  # the VAE decoder W8A8 too (calibrated on `prompts` runs' final latents)
    decoder_ignored: tuple[str, ...] = DECODER_SENSITIVE  # VAE module paths kept fp32 when `decoder`

    def __post_init__(self) -> None:
        if self.mode not in MODES or self.preset not in PRESETS or min(self.prompts, self.steps) < 1:
            raise EngineError(f"{self.name}: mode one of {', '.join(MODES)}, preset one of "
                              f"{', '.join(PRESETS)}, prompts and steps >= 1; got {self.mode!r}, "
                              f"{self.preset!r}, {self.prompts}, {self.steps}")

    def settings(self) -> dict[str, Any]:
        # the installed version, read without importing NNCF: a run that finds its entry cached never
        # needs NNCF itself (its import is ~0.5 s of a cold run)
        quantization = {"mode": self.mode, "ignored": list(self.ignored)}
        if self.ignored_types:
            quantization["ignored_types"] = list(self.ignored_types)
        if self.mode != "weights":
            quantization |= {"preset": self.preset, "smooth_quant": self.smooth_quant,
                             "prompts": self.prompts, "steps": self.steps}
        if self.decoder:  # named only when set: the entries of engines without it keep their keys
            quantization["decoder"] = {"mode": "w8a8", "ignored": list(self.decoder_ignored)}
        return {**super().settings(), "nncf": version("nncf"), "quantization": quantization}

    def role_settings(self, role: str) -> dict[str, Any]:
        """The UNet's program does not depend on the decoder's settings: an int8 decoder reuses the UNet's
        entry. The decoder's does depend on the UNet's (its calibration latents are that UNet's)."""
        settings = self.settings()
        if role == "unet":
            settings["quantization"].pop("decoder", None)
        return settings

    def convert(self, component: Component, present: tuple[bool, ...],
                example: Sequence[torch.Tensor | None]) -> Any:
        """The fp32 conversion, then NNCF's int8 compression: of the UNet, and of the VAE decoder when
        `decoder` is set and it has calibration inputs (TAESD has none: it stays fp32)."""
        import nncf

        ir = super().convert(component, present, example)
        if component.role == "vae_decoder" and self.decoder and component.calibration is not None:
            kept = [node_pattern(m) for m in self.decoder_ignored]
            scope = nncf.IgnoredScope(patterns=kept, validate=False)
            start = time.perf_counter()
            out = self._quantize(nncf, ir, component, present, example, scope)
            self.log(f"{self.name}: vae_decoder quantized (w8a8) in {time.perf_counter() - start:.1f} s")
            return out
        if component.role != "unet":
            return ir
        scope = nncf.IgnoredScope(patterns=[node_pattern(m) for m in self.ignored],
                                  types=list(self.ignored_types), validate=False)
        start = time.perf_counter()
        if self.mode == "hybrid":  # activations of convolutions stay exact, their weights int8
            convs = nncf.IgnoredScope(patterns=scope.patterns, types=[*scope.types, *CONVOLUTIONS],
                                      validate=False)
            ir = self._quantize(nncf, ir, component, present, example, convs)
        if self.mode == "w8a8":
            out = self._quantize(nncf, ir, component, present, example, scope)
        else:
            out = nncf.compress_weights(ir, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=scope)
        seconds = time.perf_counter() - start
        self.log(f"{self.name}: {component.role} quantized ({self.mode}) in {seconds:.1f} s")
        return out

    def _quantize(self, nncf: Any, ir: Any, component: Component, present: tuple[bool, ...],
                  example: Sequence[torch.Tensor | None], scope: Any) -> Any:
        """W8A8 post-training quantization, calibrated on the pipeline's own inputs of the component."""
        if component.calibration is None:
            raise EngineError(f"{self.name}: the {component.role} has no calibration inputs; "
                              "run it through a Pipeline")
        runs = "eager runs" if component.role == "unet" else "their final latents"
        self.log(f"{self.name}: calibrating {component.role} on {self.prompts} prompts x {self.steps} "
                 f"steps ({runs})")
        samples = component.calibration(example, prompts=self.prompts, steps=self.steps)
        feeds = [[a.detach().cpu().numpy() for a, p in zip(s, present) if p] for s in samples]
        self.log(f"{self.name}: quantizing {component.role} on {len(feeds)} inputs")
        advanced = nncf.AdvancedQuantizationParameters()
        if self.smooth_quant is not None:
            advanced.smooth_quant_alphas.matmul = self.smooth_quant
        preset = nncf.QuantizationPreset(self.preset)
        kind = nncf.ModelType.TRANSFORMER if component.role == "unet" else None  # the VAE: convolutional
        return nncf.quantize(ir, nncf.Dataset(feeds), subset_size=len(feeds), preset=preset,
                             model_type=kind, ignored_scope=scope, advanced_parameters=advanced)


def make() -> OpenVINOInt8:
    _require("openvino-int8")
    return OpenVINOInt8()


def make_weights() -> OpenVINOInt8:
    """`openvino-int8-weights`: int8 weights, exact activations; near-exact, smaller gain, no calibration."""
    _require("openvino-int8-weights")
    return OpenVINOInt8(name="openvino-int8-weights", mode="weights")


def make_hybrid() -> OpenVINOInt8:
    """`openvino-int8-hybrid`: W8A8 matmuls, int8-weight convolutions; the fast mode within the accuracy
    bars. Its VAE decoder stays fp32: W8A8 there (`decoder=True`) took the embedded model's free-phrasing
    shape accuracy 3 points under eager's (docs/engines.md)."""
    _require("openvino-int8-hybrid")
    return OpenVINOInt8(name="openvino-int8-hybrid", mode="hybrid")


def _require(name: str) -> None:
    """Refuses the engine when OpenVINO or NNCF is missing, without importing NNCF (see `settings`)."""
    if any(find_spec(package) is None for package in ("openvino", "nncf")):
        raise EngineError(f'the {name} engine needs OpenVINO and NNCF: pip install "openldm[cpu]"')
