"""Settings in, finished PNG files out: the generation step a local CLI run and `openldm serve` share.

A `Renderer` is a loaded model with what a run adds to it (merged LoRA files, a refiner), named and
hashed for the infotext. `check_inputs` is the validation both paths run before any sampling.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from openldm.checkpoints.hashing import model_hash
from openldm.checkpoints.save import DTYPES
from openldm.diffusion.registry import resolve
from openldm.networks import NetworkLibrary, load_network, network_refs, read_embeddings
from openldm.pipelines.control import ControlUnit
from openldm.pipelines.loading import load
from openldm.pipelines.outputs import Rendered, result_png
from openldm.pipelines.params import MODE_INPUTS, GenerationParams
from openldm.pipelines.pipeline import Pipeline
from openldm.pipelines.x4 import X4Settings, upscale_x4

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def check_inputs(mode: str, params: GenerationParams, image: Image.Image | None = None,
                 mask: Image.Image | None = None) -> None:
    """Fail on settings or inputs that cannot make an image, before a model is loaded or a step is run."""
    if mode not in MODE_INPUTS:
        raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODE_INPUTS)}")
    given = {"image": image, "mask": mask}
    missing = [name for name in MODE_INPUTS[mode] if given[name] is None]
    extra = [name for name, value in given.items() if value is not None and name not in MODE_INPUTS[mode]]
    if missing or extra:
        problem = f"needs {' and '.join(missing)}" if missing else f"takes no {' or '.join(extra)}"
        raise ValueError(f"{mode} {problem}")
    resolve(params.sampler, params.schedule)
    if mode == "outpaint" and not any(params.outpaint):
        raise ValueError("nothing to outpaint: give --extend LEFT,RIGHT,TOP,BOTTOM (pixels to add)")
    left, right, top, bottom = params.outpaint  # outpainting works on the image with its new borders
    width = params.width or (image.width + left + right if image is not None else None)
    height = params.height or (image.height + top + bottom if image is not None else None)
    sizes = (("width", width), ("height", height))
    bad = [f"{n} {v}" for n, v in sizes if v is not None and (v <= 0 or v % 8)]
    if bad:
        raise ValueError(f"{' and '.join(bad)}: sizes must be positive multiples of 8 "
                         "(--width/--height resize an input image)")


@dataclass
class Renderer:
    """A loaded model, ready to turn `GenerationParams` into PNG files that record how they were made."""

    pipe: Pipeline
    model_name: str
    model_hash: str
    refiner: Pipeline | None = None
    loras: tuple[tuple[str, float], ...] = ()  # LoRA files merged at load: recorded in every image
    vae: tuple[str, str] | None = None  # a standalone VAE's (name, hash): A1111's `VAE`, `VAE hash`
    upscaler: Pipeline | None = None  # an x4-upscaler model: the hires fix's "x4" upscaler

    def render(self, mode: str, params: GenerationParams, image: Image.Image | None = None,
               mask: Image.Image | None = None, controls: Sequence[ControlUnit] = (),
               x4: X4Settings | None = None) -> list[Rendered]:
        """`controls`: ControlNet units (the server's jobs would build them with `control.ControlUnit`);
        `x4`: how an x4-upscaler model upscales (its noise level and tiles)."""
        check_inputs(mode, params, image, mask)
        params = dataclasses.replace(params, loras=self.loras)
        if self.pipe.config.low_res is not None:
            if mode != "upscale" or image is None:
                raise ValueError(f"{self.model_name} is an x4 upscaler: it only upscales an image "
                                 "(openldm upscale IMAGE PROMPT)")
            x4 = x4 or X4Settings()
            results = upscale_x4(self.pipe, image, params, noise_level=x4.noise_level, tiling=x4.tiling)
        else:
            results = self.pipe.generate(
                params, mode=mode, refiner=self.refiner, image=image, controls=controls,
                mask=mask.convert("L") if mask is not None else None, upscaler=self.upscaler,
            )
        return [Rendered(result_png(r, self.model_name, self.model_hash, self.vae), r.params.seed,
                         "\n".join(report.summary() for report in r.networks)) for r in results]


def load_renderer(
    path: Path, *, device: str | None = None, dtype: str | None = None, prediction: str | None = None,
    lora_dirs: Iterable[Path] = (), embedding_dirs: Iterable[Path] = (),
    loras: Iterable[tuple[Path, float]] = (), refiner: Path | None = None, prompts: Iterable[str] = (),
    log: Log = _stderr, vae: Path | None = None, upscaler: Path | None = None,
) -> Renderer:
    """Load a model with its LoRA folders, embeddings, merged LoRA files and refiner; `log` gets the notes.

    The device defaults to CUDA when there is one, the dtype to fp16 there and fp32 elsewhere. The
    `<lora:NAME:W>` tags in `prompts` are looked up first, so that a typo costs no load time.
    """
    networks, embeddings = NetworkLibrary(lora_dirs), read_embeddings(embedding_dirs)
    for ref in network_refs(*prompts):
        networks.path(ref)
    merged = [(load_network(file), weight) for file, weight in loras]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = DTYPES[dtype] if dtype else torch.float16 if device.startswith("cuda") else torch.float32
    pipe = load(path, device=device, dtype=torch_dtype, prediction=prediction, vae=vae)
    pipe.progress, pipe.networks = True, networks
    for skipped in pipe.add_embeddings(embeddings):
        log(f"warning: {skipped}")
    if merged:
        log(pipe.merge_networks(merged).summary())
    second = None
    if refiner is not None:  # on the base model's device and in its dtype
        second = load(refiner, device=pipe.device, dtype=pipe.dtype)
        second.progress = True
    x4 = None if upscaler is None else load(upscaler, device=pipe.device, dtype=pipe.dtype)
    if x4 is not None and x4.config.low_res is None:
        raise ValueError(f"--hires-upscaler {upscaler}: {x4.config.name} is not an x4-upscaler model")
    name = path.stem if path.is_file() else path.name
    return Renderer(pipe, name, model_hash(path), second,
                    tuple((network.name, weight) for network, weight in merged), pipe.components.vae_file, x4)
