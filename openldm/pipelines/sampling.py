"""One batch's sampling: its sigmas, its starting noise, and this model's steps then a refiner's.

`Pipeline.sample` is this module's `sample`: the mode modules (`inpaint`, `upscale`, `x4`) only say
where sampling starts (`run.Start`); the schedule, the seeds' noise streams and the refiner's
hand-off are decided here, once for every mode.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from openldm.diffusion.noise import BatchNoise, BrownianTreeNoise, starting_noise
from openldm.diffusion.registry import SamplerSpec, resolve
from openldm.diffusion.sigmas import img2img_sigmas, schedule_options, switch_step
from openldm.pipelines.guidance import guided_denoiser
from openldm.pipelines.inpaint import unmasked_concat
from openldm.pipelines.run import Run, Start

if TYPE_CHECKING:
    from openldm.pipelines.pipeline import Pipeline


def sample(pipe: Pipeline, run: Run, start: Start | None = None) -> torch.Tensor:
    """Run the sampler from noise (txt2img) or from a noised image latent (strength < 1).

    With a refiner, this model runs the steps down to the switch and the refiner the rest: one
    schedule and one noise stream, so ancestral noise is what a single run would draw.
    """
    start = start or Start()  # None: from pure noise
    spec, schedule_name = resolve(run.params.sampler, run.params.schedule)
    options = schedule_options(schedule_name, pipe.config.family)
    sigmas = spec.sigmas(schedule_name, run.params.steps, pipe.schedule, **options).to(pipe.device)
    if start.latent is not None:
        sigmas = img2img_sigmas(sigmas, start.strength)
    if pipe.config.is_inpainting and start.concat is None:  # txt2img, img2img, hires fix
        concat = unmasked_concat(pipe, run.width, run.height, run.params.tiling())
        start = dataclasses.replace(start, concat=concat)
    shape = latent_shape(pipe, run)
    noise = BatchNoise(run.seeds, shape, device=pipe.device, dtype=torch.float32)
    first = run.latents if run.latents is not None else starting_noise(
        noise, run.subseeds, run.params.subseed_strength, shape
    )
    if len(sigmas) < 2:  # strength 0: nothing to do
        return start.latent.expand(len(run.seeds), -1, -1, -1).float()
    from_noise = start.latent is None or start.strength >= 1  # strength 1 is txt2img, as in diffusers
    x = first * sigmas[0] if from_noise else start.latent + first * sigmas[0]
    noise_sampler = noise
    if spec.noise == "brownian":
        noise_sampler = BrownianTreeNoise.for_sigmas(run.seeds, shape, sigmas, device=pipe.device)
    return _sample_parts(pipe, run, spec, x, sigmas, start, noise_sampler)


def latent_shape(pipe: Pipeline, run: Run) -> tuple[int, int, int]:
    """One image's latent shape at the run's size; given latents must have it, batch first."""
    f = pipe.config.vae.downsample_factor
    shape = (pipe.config.latent_format.channels, run.height // f, run.width // f)
    if run.latents is not None and tuple(run.latents.shape) != (len(run.seeds), *shape):
        raise ValueError(f"latents of shape {tuple(run.latents.shape)} do not fit {len(run.seeds)} "
                         f"images of {run.width}x{run.height}: expected {(len(run.seeds), *shape)}")
    return shape


def _sample_parts(pipe: Pipeline, run: Run, spec: SamplerSpec, x: torch.Tensor, sigmas: torch.Tensor,
                  start: Start, noise_sampler: Any) -> torch.Tensor:
    """This model's steps, then the refiner's from the switch on, on the same latents and noise."""
    params = run.params
    options = {k: v for k, v in (("eta", params.eta), ("s_noise", params.s_noise)) if v is not None}
    steps = len(sigmas) - 1
    switch = steps if run.refiner is None else switch_step(sigmas, pipe.schedule, params.refiner_switch)
    parts = [(pipe, start, sigmas[: switch + 1], 0)]
    if run.refiner is not None:  # the same latents on, without an inpainting model's extra input
        parts.append((run.refiner, dataclasses.replace(start, concat=None), sigmas[switch:], switch))
    with torch.no_grad():
        for part_pipe, part_start, part, offset in parts:
            if len(part) > 1:
                denoiser, tracker = guided_denoiser(part_pipe, run, part_start, sigmas, offset)
                part_pipe.prompts_encoded()
                x = spec(denoiser, x, part, noise_sampler=noise_sampler, callback=tracker, **options)
    return x


def check_refiner(pipe: Pipeline, refiner: Pipeline) -> None:
    """A refiner continues this model's latents: the same latent space and device, no inpainting input."""
    if refiner.config.latent_format != pipe.config.latent_format or refiner.config.is_inpainting:
        raise ValueError(f"{refiner.config.name} cannot refine {pipe.config.name}: a refiner must share "
                         "its latent format and take plain latents (not an inpainting model)")
    if refiner.device != pipe.device:
        raise ValueError(f"the refiner is on {refiner.device} and the model on {pipe.device}: "
                         "load both on the same device")
