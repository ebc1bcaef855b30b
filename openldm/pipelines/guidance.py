"""The denoiser one sampling pass runs: prompts per schedule segment, guidance, masks, and progress.

Conditioning extras plug in here without touching the mode modules: each entry of `Run.extras`
adds its keys to every cond and uncond dict (ControlNet's control images and weights will be one),
and the model call (`Pipeline._unet`) is where they meet the UNet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from openldm.diffusion.denoisers import CFGDenoiser, MaskedDenoiser, ScheduledDenoiser, StepTracker
from openldm.diffusion.samplers import Denoiser, Step
from openldm.pipelines.conditioning import (
    EncodedPrompts,
    schedule_prompts,
    size_conditioning,
    vector_conditioning,
)
from openldm.pipelines.run import Interrupted, Run, Start, StepCallback

if TYPE_CHECKING:
    import torch

    from openldm.pipelines.pipeline import Pipeline


class Extra(Protocol):
    """Extra conditioning for a run (ControlNet: `control.Control`): what it adds to each cond dict of a pass.

    `rows` is the dict's batch; `uncond` says which side of CFG it is; `tracker.step` is the step being
    taken while the model runs, of `steps` in the whole run.
    """

    def cond(self, pipe: Pipeline, run: Run, rows: int, *, uncond: bool, tracker: StepTracker,
             steps: int) -> dict[str, Any]: ...


def guided_denoiser(pipe: Pipeline, run: Run, start: Start, sigmas: torch.Tensor,
                    offset: int) -> tuple[Denoiser, StepTracker]:
    """Guidance per prompt-schedule segment, switched by the step each sigma falls in; masks around it.

    `sigmas` is the whole run's schedule; this sampler starts at step `offset` (a refiner's, at the switch).
    A hires pass's schedule continues its first pass's count (`Run.first_pass_steps`).
    """
    params, batch, steps = run.params, len(run.seeds), len(sigmas) - 1
    positive = schedule_prompts([params.prompt] * batch, steps, run.first_pass_steps)
    negative = schedule_prompts([params.negative] * batch, steps, run.first_pass_steps)
    ends = sorted(set(positive.ends) | set(negative.ends))
    encoder = pipe.prompt_encoder(params.clip_skip)
    sizes = size_conditioning(params, run.width, run.height)
    tracker = StepTracker(step_callback(run.callback, steps, offset, pipe.progress), offset)
    clock = {"tracker": tracker, "steps": steps}
    denoisers = []
    for end in ends:
        cond_texts = next(t for e, t in zip(positive.ends, positive.texts) if e >= end)
        uncond_texts = next(t for e, t in zip(negative.ends, negative.texts) if e >= end)
        count = max(encoder.chunk_count(t) for t in cond_texts + uncond_texts)
        cond = _cond(pipe, run, encoder(cond_texts, count), sizes, start, params.aesthetic_score,
                     dict(clock, uncond=False))
        uncond = _cond(pipe, run, encoder(uncond_texts, count), sizes, start, params.negative_aesthetic_score,
                       dict(clock, uncond=True))
        denoisers.append(CFGDenoiser(pipe.denoiser, cond, uncond, params.cfg, params.guidance_rescale))
    denoiser: Denoiser = ScheduledDenoiser(ends, denoisers, sigmas) if len(ends) > 1 else denoisers[0]
    if start.keep is not None:
        denoiser = MaskedDenoiser(denoiser, start.latent, start.keep)
    return denoiser, tracker


def _cond(pipe: Pipeline, run: Run, encoded: EncodedPrompts, sizes: dict[str, tuple[int, ...]], start: Start,
          aesthetic: float, clock: dict[str, Any]) -> dict[str, Any]:
    """The model's keyword inputs besides x and the timestep: text, SDXL's vector, masks, extras."""
    device = pipe.device
    cond: dict[str, Any] = {"context": encoded.context.to(device)}
    if pipe.config.vector_conds:
        values = sizes | {"aesthetic_score": (aesthetic,)}
        cond["y"] = vector_conditioning(pipe.config, encoded.pooled, values).to(device)
    if start.concat is not None:
        cond["concat"] = start.concat.expand(encoded.context.shape[0], -1, -1, -1)
    for extra in run.extras:
        cond |= extra.cond(pipe, run, encoded.context.shape[0], **clock)
    return cond


def step_callback(callback: StepCallback | None, total: int, offset: int = 0,
                  progress: bool = False) -> Callable[[Step], None] | None:
    """The sampler's callback: a progress bar (if `progress`) and `callback(step, total, denoised)`."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=offset, desc="sampling", unit="step", leave=False)

    def on_step(info: Step) -> None:
        if bar is not None:
            bar.update(1)
            if offset + info.i + 1 >= total:
                bar.close()
        if callback is not None:
            try:
                callback(offset + info.i + 1, total, info.denoised)
            except Interrupted:
                if bar is not None:
                    bar.close()
                raise

    return on_step if (callback or bar) else None
