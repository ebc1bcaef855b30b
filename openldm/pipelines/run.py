"""One batch of a run described once: what sampling, the mode modules and the step callback all read.

`generate` turns a `GenerationParams` into one `Run` per batch (`batch_params` numbers their seeds),
each mode module turns its inputs into a `Start`, and `Pipeline.sample` needs nothing else. This
module imports no torch, so that the CLI and the server can number batches and catch `Interrupted`
without loading it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from openldm.pipelines.params import GenerationParams, seeds_for

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from openldm.networks import NetworkReport
    from openldm.pipelines.guidance import Extra
    from openldm.pipelines.pipeline import Pipeline

StepCallback = Callable[[int, int, "torch.Tensor"], None]  # (step, total, denoised latents)
MODES = ("txt2img", "img2img", "inpaint", "outpaint", "upscale")


class Interrupted(Exception):
    """Raised by a step callback to stop a run before its next model call; finished batches are kept."""


def batch_params(params: GenerationParams) -> list[GenerationParams]:
    """One settings record per batch: batch b starts at seed + b * batch_size, and so does its subseed."""
    offsets = range(0, params.batch_count * params.batch_size, params.batch_size)
    return [dataclasses.replace(params, seed=seeds_for(params.seed, 1, offset)[0],
                                subseed=seeds_for(params.subseed, 1, offset)[0], batch_count=1)
            for offset in offsets]


def run_mode(params: GenerationParams, image: Image.Image | None, mask: Image.Image | None,
             mode: str | None = None) -> str:
    """The mode a run takes and records: `mode` if given (checked against the inputs), else what they make.

    Outpainting settings make any image run an outpainting one (the canvas grows, the new area is masked).
    """
    inferred = ("outpaint" if any(params.outpaint) else "inpaint" if mask is not None
                else "img2img" if image is not None else "upscale" if params.hires else "txt2img")
    if mode == "txt2img" and inferred == "upscale":  # txt2img with the hires fix
        return inferred
    if mode is None or mode == inferred or mode == "upscale":
        return mode or inferred
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    if inferred == "outpaint" and mode in ("img2img", "inpaint"):
        return inferred
    given = " and ".join(n for n, v in (("an image", image), ("a mask", mask)) if v is not None) or "no image"
    raise ValueError(f"{mode} does not fit the inputs: {given} make a {inferred} run")


@dataclass(frozen=True)
class Run:
    """One batch to sample: its settings, seeds, size and mode, who hears of each step, and the refiner."""

    params: GenerationParams  # batch_count 1; `seed` is the batch's first seed
    seeds: tuple[int, ...]
    subseeds: tuple[int, ...]
    width: int
    height: int
    mode: str
    callback: StepCallback | None = None
    refiner: Pipeline | None = None  # finishes sampling from `params.refiner_switch` on
    latents: torch.Tensor | None = None  # starting noise given instead of drawn from the seeds
    extras: tuple[Extra, ...] = ()  # conditioning beyond the prompts (see `guidance`)
    upscaler: Pipeline | None = None  # the x4-upscaler model of a hires fix with upscaler "x4"
    first_pass_steps: int = 0  # a hires pass's: prompt edits count on from its first pass

    @classmethod
    def of_batch(cls, params: GenerationParams, width: int, height: int, mode: str, **rest: object) -> Run:
        n = params.batch_size
        return cls(params, tuple(seeds_for(params.seed, n)), tuple(seeds_for(params.subseed, n)), width,
                   height, mode, **rest)  # type: ignore[arg-type]

    def image_params(self, i: int) -> GenerationParams:
        """The settings that regenerate image i of this batch alone."""
        return dataclasses.replace(self.params, seed=self.seeds[i], subseed=self.subseeds[i],
                                   width=self.width, height=self.height, batch_size=1, batch_count=1)


@dataclass(frozen=True)
class Start:
    """Where sampling begins: an image latent (None: pure noise) noised to `strength`, and mask inputs."""

    latent: torch.Tensor | None = None
    strength: float = 1.0  # of the schedule that is run: 1 starts from pure noise
    keep: torch.Tensor | None = None  # latent-resolution mask of what to keep (ordinary models)
    concat: torch.Tensor | None = None  # inpainting models' extra UNet input: mask + masked image


@dataclass
class Result:
    """One generated image with the exact settings (concrete seed) that reproduce it."""

    image: Image.Image
    params: GenerationParams
    mode: str
    latent: torch.Tensor
    networks: list[NetworkReport] = field(default_factory=list)  # what the prompts' LoRA tags merged
    control: dict[str, str] = field(default_factory=dict)  # infotext entries of its ControlNet units
    infotext: dict[str, Any] = field(default_factory=dict)  # other entries: an x4 pass's noise level, tiles
