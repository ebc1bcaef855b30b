"""ControlNet as a conditioning extra: control images steer every model call of a run.

A `ControlUnit` is one ControlNet with its control image and how strongly, when and in which mode it
acts. `Control` (a `guidance.Extra`) adds two keys to every cond and uncond dict: `control`, the
same object in both, and `control_gate`, a (rows, units) tensor that is 0 where a unit must not act
(the uncond rows of cond-only modes). Both survive CFG's batching; `Pipeline._unet` hands them to
`Control.residuals`, which runs each active unit and sums what they return.

Weighting, per unit of n residuals (input blocks, then the middle block):

- "balanced": every residual times `weight`.
- "prompt" ("My prompt is more important") and "control" ("ControlNet is more important"): A1111's
  ControlNet extension's soft injection, residual i times `weight * 0.825 ** (12 - i)` (13 residuals
  in SD1/SD2; SDXL's 10 take the first 10 of those), and for "control" also its CFG injection: the
  uncond rows get no control (sd-webui-controlnet, `hook.py` and `controlnet.py`: soft_injection =
  mode != BALANCED, cfg_injection = mode == CONTROL).
- `guess` (diffusers' and the original ControlNet's guess mode): residual i times
  `weight * logspace(-1, 0, n)[i]`, and the uncond rows get no control.

A unit acts on step i of N (counted through a refiner's hand-off) when i / N >= start and
(i + 1) / N <= end: diffusers' `control_guidance_start/end` rule, so that images match it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image

from openldm.diffusion.denoisers import StepTracker
from openldm.models.controlnet import ControlNet
from openldm.pipelines import images as im
from openldm.pipelines.images import ResizeMode
from openldm.pipelines.params import CONTROL_MODES

if TYPE_CHECKING:
    from openldm.pipelines.pipeline import Pipeline
    from openldm.pipelines.run import Run

ControlMode = Literal["balanced", "prompt", "control"]
SOFT_DECAY = 0.825  # sd-webui-controlnet's soft-injection decay per block, from the middle outward
_MODE_NAMES = {"balanced": "Balanced", "prompt": "My prompt is more important",
               "control": "ControlNet is more important"}
_RESIZE_NAMES = {"resize": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet, its control image (ready, or preprocessed already) and how it steers the run."""

    model: str | Path | ControlNet  # a file or diffusers folder, or a loaded model
    image: Image.Image
    weight: float = 1.0
    start: float = 0.0  # fraction of the schedule where it starts acting ...
    end: float = 1.0  # ... and where it stops
    resize_mode: ResizeMode = "resize"  # how the image meets the run's size, as img2img's
    mode: ControlMode = "balanced"
    guess: bool = False  # no prompt needed: control on the cond rows only, scaled up through the blocks
    preprocessor: str = "none"  # what made `image` (recorded in the infotext)

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end <= 1:
            raise ValueError(f"control start {self.start} and end {self.end}: need 0 <= start < end <= 1")
        if self.mode not in CONTROL_MODES:
            raise ValueError(f"unknown control mode {self.mode!r}; one of {', '.join(CONTROL_MODES)}")
        if self.resize_mode not in _RESIZE_NAMES:
            raise ValueError(f"unknown resize mode {self.resize_mode!r}; one of {', '.join(_RESIZE_NAMES)}")

    def acts_at(self, step: int, steps: int) -> bool:
        """diffusers' rule for step `step` (0-based) of `steps`."""
        return step / steps >= self.start and (step + 1) / steps <= self.end

    def scales(self, n: int) -> list[float]:
        """The weight of each of the n residuals (see the module docstring)."""
        if self.guess:
            return [self.weight * s for s in torch.logspace(-1, 0, n).tolist()]
        if self.mode == "balanced":
            return [self.weight] * n
        return [self.weight * SOFT_DECAY ** (12 - i) for i in range(n)]

    @property
    def cond_only(self) -> bool:
        return self.guess or self.mode == "control"

    @property
    def name(self) -> str:
        if isinstance(self.model, ControlNet):
            return "controlnet"
        path = Path(self.model)
        return path.name if path.is_dir() else path.stem

    def infotext(self) -> str:
        """The unit as the A1111 extension records it in "ControlNet N" (guess mode as the CONTROL mode)."""
        mode = _MODE_NAMES["control" if self.guess else self.mode]
        return (f"Module: {self.preprocessor}, Model: {self.name}, Weight: {self.weight:g}, "
                f"Resize Mode: {_RESIZE_NAMES[self.resize_mode]}, Guidance Start: {self.start:g}, "
                f"Guidance End: {self.end:g}, Control Mode: {mode}")


def control_infotext(units: Sequence[ControlUnit]) -> dict[str, str]:
    """`ControlNet 0: "..."`, one entry per unit, for the infotext's settings."""
    return {f"ControlNet {i}": unit.infotext() for i, unit in enumerate(units)}


def hint_tensor(image: Image.Image, width: int, height: int, mode: ResizeMode) -> torch.Tensor:
    """The control image at the run's pixel size as (1, 3, h, w) in [0, 1], as diffusers feeds it."""
    return (im.to_tensor([im.resize_image(image, width, height, mode)]) + 1) / 2


@dataclass(frozen=True)
class Control:
    """The ControlNet extra of one run: its units, their models and the step clock they read."""

    units: tuple[ControlUnit, ...]
    models: tuple[ControlNet, ...]
    family: str  # the base model's family: other passes (an SDXL refiner) run without control

    def cond(self, pipe: Pipeline, run: Run, rows: int, *, uncond: bool, tracker: StepTracker,
             steps: int) -> dict[str, Any]:
        if pipe.config.family != self.family:
            return {}
        hints = tuple(hint_tensor(u.image, run.width, run.height, u.resize_mode).to(pipe.device)
                      for u in self.units)
        gate = torch.tensor([[0.0 if uncond and u.cond_only else 1.0 for u in self.units]] * rows)
        return {"control": _Pass(self, hints, tracker, steps), "control_gate": gate.to(pipe.device)}


@dataclass(frozen=True, eq=False)
class _Pass:
    """What one sampling pass's model calls need: the hints at the run's size and the step clock."""

    control: Control
    hints: tuple[torch.Tensor, ...]
    tracker: StepTracker
    steps: int

    def residuals(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None,
                  gate: torch.Tensor) -> list[torch.Tensor] | None:
        """The sum of the active units' scaled residuals for this call (None: no unit acts)."""
        total: list[torch.Tensor] | None = None
        for k, (unit, model, hint) in enumerate(zip(self.control.units, self.control.models, self.hints)):
            if not unit.acts_at(self.tracker.step, self.steps):
                continue
            hint = _fit(hint, x, model.cfg.hint_factor).to(x.dtype).expand(x.shape[0], -1, -1, -1)
            out = model(x, hint, t, context, y)
            rows = gate[:, k].to(x.dtype)[:, None, None, None]
            out = [r * (s * rows) for r, s in zip(out, unit.scales(len(out)))]
            total = out if total is None else [a + b for a, b in zip(total, out)]
        return total


def _fit(hint: torch.Tensor, x: torch.Tensor, factor: int) -> torch.Tensor:
    """The hint at `factor` times the latent's size (a hires pass samples larger than the run's size)."""
    size = (x.shape[-2] * factor, x.shape[-1] * factor)
    return hint if tuple(hint.shape[-2:]) == size else F.interpolate(hint, size, mode="bilinear")


def make_control(pipe: Pipeline, units: Sequence[ControlUnit], cache: dict[str, ControlNet]) -> Control:
    """Load (once per path, in `cache`) the units' ControlNets for this pipeline's model, device and dtype."""
    from openldm.checkpoints.controlnet import load_controlnet
    from openldm.config import controlnet_config

    base = controlnet_config(pipe.config)
    models = []
    for unit in units:
        if isinstance(unit.model, ControlNet):
            models.append(unit.model)
            continue
        key = str(Path(unit.model).resolve())
        if key not in cache:
            cache[key] = load_controlnet(unit.model, base, dtype=pipe.dtype, device=pipe.device)
        models.append(cache[key])
    return Control(tuple(units), tuple(models), pipe.config.family)
