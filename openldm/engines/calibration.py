"""Calibration inputs for post-training quantization, drawn from the model's own pipeline.

Quantization ranges are set from what the UNet really sees: real prompts (those the model knows,
when it declares a domain), encoded by its text encoder, at every noise level of a sampling run.
A recording stands in for the UNet's runner while a few short samplings run eagerly (not decoded);
their per-image rows are regrouped into batches shaped like the example the engine is building for.
The VAE decoder's inputs are the final latents of such runs, sampled as the pipeline now samples.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from openldm.pipelines.pipeline import Pipeline

PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a red circle at the top left on a white background",
    "a watercolor painting of a lighthouse on a cliff at dusk",
    "a small blue square in the center",
    "portrait of an old man with a beard, studio lighting",
    "a large green triangle at the bottom right on a black background",
    "a bowl of fruit on a wooden table, oil painting",
    "an orange circle and a purple square",
)


def calibration_prompts(pipe: Pipeline, count: int) -> list[str]:
    """`count` prompts, the model's domain's own when it declares one (cycled if too few)."""
    prompts = [p for p in PROMPTS if pipe.domain is None or not pipe.domain.unknown([p])] or list(PROMPTS)
    return list(itertools.islice(itertools.cycle(prompts), count))


def unet_inputs(pipe: Pipeline, example: Sequence[Any], prompts: int = 4, steps: int = 8) -> list[tuple]:
    """UNet argument tuples (x, t, context, y) shaped like `example`, over `prompts` runs of `steps` steps."""
    from openldm.pipelines.params import GenerationParams

    x = example[0]
    f = pipe.config.vae.downsample_factor
    rows: list[tuple] = []
    runner = pipe.unet_runner

    def record(*args: Any) -> torch.Tensor:
        rows.extend(zip(*(a.unbind(0) if isinstance(a, torch.Tensor) else itertools.repeat(a) for a in args)))
        return pipe.unet(*args)

    pipe.unet_runner = record  # restored below: the run that asked for calibration goes on with `runner`
    try:
        for seed, prompt in enumerate(calibration_prompts(pipe, prompts)):
            # sampled, not decoded: a decoder built here would calibrate on the recording UNet
            pipe.txt2img_latents(GenerationParams(prompt, steps=steps, seed=seed, width=x.shape[-1] * f,
                                                  height=x.shape[-2] * f, batch_size=max(1, x.shape[0] // 2)))
    finally:
        pipe.unet_runner = runner
    return regroup(rows, example)


def decoder_inputs(pipe: Pipeline, example: Sequence[Any], prompts: int = 4, steps: int = 8) -> list[tuple]:
    """VAE decoder inputs (decoder-space latents) shaped like `example`: the final latents of `prompts`
    runs of `steps` steps, sampled (not decoded) by the pipeline's current UNet runner."""
    from openldm.pipelines.params import GenerationParams

    z = example[0]
    f = pipe.config.vae.downsample_factor
    rows: list[tuple] = []
    for seed, prompt in enumerate(calibration_prompts(pipe, prompts)):
        x = pipe.txt2img_latents(GenerationParams(prompt, steps=steps, seed=seed, width=z.shape[-1] * f,
                                                  height=z.shape[-2] * f, batch_size=z.shape[0]))
        rows.extend((row,) for row in pipe.config.latent_format.from_model(x).unbind(0))
    return regroup(rows, example)


def regroup(rows: list[tuple], example: Sequence[Any]) -> list[tuple]:
    """Per-image rows stacked into batches of the example's size; a text length unlike it takes its text."""
    n = example[0].shape[0]
    batches = []
    for start in range(0, len(rows) - n + 1, n):
        group = rows[start : start + n]
        batch = []
        for i, want in enumerate(example):
            if want is None:
                batch.append(None)
                continue
            got = torch.stack([r[i] for r in group])
            batch.append(got if got.shape == want.shape else want)
        batches.append(tuple(batch))
    return batches
