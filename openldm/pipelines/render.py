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
from openldm.config import ModelConfig
from openldm.diffusion.registry import resolve
from openldm.memory import MemoryEstimate, check_fits, module_bytes
from openldm.models.domain import Domain
from openldm.models.taesd import load_taesd
from openldm.models.vae_tiling import VAETiling
from openldm.networks import NetworkLibrary, load_network, network_refs, read_embeddings
from openldm.pipelines.control import ControlUnit
from openldm.pipelines.inpaint import outpaint_size
from openldm.pipelines.loading import load
from openldm.pipelines.outputs import Rendered, result_png
from openldm.pipelines.params import LIMITS, MODE_INPUTS, GenerationParams, Limits, SettingsError, hires_size
from openldm.pipelines.pipeline import Pipeline, StepCallback
from openldm.pipelines.x4 import X4Settings, upscale_x4

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def check_inputs(mode: str, params: GenerationParams, image: Image.Image | None = None,
                 mask: Image.Image | None = None, limits: Limits = LIMITS) -> None:
    """Fail on settings or inputs that cannot make an image, before a model is loaded or a step is run."""
    params.validate(limits)
    if mode not in MODE_INPUTS:
        raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODE_INPUTS)}")
    given = {"image": image, "mask": mask}
    missing = [name for name in MODE_INPUTS[mode] if given[name] is None]
    extra = [name for name, value in given.items() if value is not None and name not in MODE_INPUTS[mode]]
    if missing or extra:
        problem = f"needs {' and '.join(missing)}" if missing else f"takes no {' or '.join(extra)}"
        raise ValueError(f"{mode} {problem}")
    resolve(params.sampler, params.schedule)
    if params.hires_sampler is not None:
        resolve(params.hires_sampler, params.schedule)
    if mode == "outpaint" and not any(params.outpaint):
        raise ValueError("nothing to outpaint: give --extend LEFT,RIGHT,TOP,BOTTOM (pixels to add)")
    if any(params.outpaint) and image is not None:
        outpaint_size(params.outpaint, image.size)
    left, right, top, bottom = params.outpaint  # outpainting works on the image with its new borders
    width = params.width or (image.width + left + right if image is not None else None)
    height = params.height or (image.height + top + bottom if image is not None else None)
    sizes = (("width", width), ("height", height))
    bad = [f"{n} {v}" for n, v in sizes if v is not None and (v <= 0 or v % 8)]
    if bad:
        raise ValueError(f"{' and '.join(bad)}: sizes must be positive multiples of 8 "
                         "(--width/--height resize an input image)")
    if width and height:
        limits.check_size(width, height)
        if mode == "upscale" or (mode == "txt2img" and params.hires):
            limits.check_size(*hires_size(width, height, params).final, "upscaled size")


@dataclass
class Renderer:
    """A loaded model, ready to turn `GenerationParams` into PNG files that record how they were made."""

    pipe: Pipeline
    model_name: str
    model_hash: str
    refiner: Pipeline | None = None
    loras: tuple[tuple[str, float], ...] = ()  # LoRA files merged at load: recorded in every image
    domain: Domain | None = None  # a narrow model's words: its results carry the warning for others
    limits: Limits = LIMITS  # what one render may ask for
    vae: tuple[str, str] | None = None  # a standalone VAE's (name, hash): A1111's `VAE`, `VAE hash`
    upscaler: Pipeline | None = None  # an x4-upscaler model: the hires fix's "x4" upscaler
    memory_budget: int | None = None  # bytes a run may peak at (None: this machine's, `memory.memory_budget`)
    upscaler_hash: str | None = None  # its file's, recorded beside its name

    def render(self, mode: str, params: GenerationParams, image: Image.Image | None = None,
               mask: Image.Image | None = None, *, controls: Sequence[ControlUnit] = (),
               callback: StepCallback | None = None, hires: bool = False,
               x4: X4Settings | None = None) -> list[Rendered]:
        """`controls`: ControlNet units; `hires`: txt2img finished by the hires fix (A1111's `enable_hr`);
        `x4`: how an x4-upscaler model upscales (its noise level and tiles)."""
        check_inputs(mode, params, image, mask, self.limits)
        tiled = self.check_memory(mode, params, image, hires, x4).vae_tile is not None
        if tiled and self.pipe.config.low_res is None:  # what auto chose for this budget (x4: its own tiles)
            params = dataclasses.replace(params, vae_tiling="on")
        params = dataclasses.replace(params, loras=self.loras)
        if self.pipe.config.low_res is not None:
            if mode != "upscale" or image is None:
                raise ValueError(f"{self.model_name} is an x4 upscaler: it only upscales an image "
                                 "(openldm upscale IMAGE PROMPT)")
            x4 = x4 or X4Settings()
            results = upscale_x4(self.pipe, image, params, noise_level=x4.noise_level, tiling=x4.tiling,
                                 callback=callback)
        else:
            results = self.pipe.generate(
                params, mode="upscale" if hires else mode, refiner=self.refiner, image=image,
                mask=mask.convert("L") if mask is not None else None, controls=controls, callback=callback,
                upscaler=self.upscaler,
            )
        for r in results:  # the pipeline names a hires fix's x4 model; its file's hash is known here
            if "Hires upscaler model" in r.infotext:
                r.infotext["Hires upscaler hash"] = self.upscaler_hash
        warning = self.domain.warning([params.prompt]) if self.domain is not None else ""
        return [Rendered(result_png(r, self.model_name, self.model_hash, self.vae), r.params.seed,
                         "\n".join(report.summary() for report in r.networks), warning) for r in results]


    def check_memory(self, mode: str, params: GenerationParams, image: Image.Image | None = None,
                     hires: bool = False, x4: X4Settings | None = None) -> MemoryEstimate:
        """Refuse, before any step, a run whose estimated peak memory (`openldm.memory`) will not fit;
        the estimate says whether `--vae-tiling auto` tiles at this budget."""
        pipes = (self.pipe, *((self.upscaler,) if self.upscaler is not None else ()))
        return check_run_memory(self.pipe.config, mode, params, image, hires, dtype=self.pipe.dtype,
                                device=self.pipe.device, budget=self.memory_budget,
                                weights=sum(pipeline_weights(p) for p in pipes), x4=x4)


def pipeline_weights(pipe: Pipeline) -> int:
    """The bytes of a loaded pipeline's weights (its UNet, VAE and text encoders), for the estimate."""
    unet = pipe.components.unet  # as built: its weights may be an engine's alone (on `meta`), same size
    return module_bytes(unet, pipe.vae, *(e.model for e in pipe.text_encoders))


def check_run_memory(
    config: ModelConfig, mode: str, params: GenerationParams, image: Image.Image | None = None,
    hires: bool = False, *, dtype: torch.dtype, device: str | torch.device, budget: int | None = None,
    weights: int | None = None, x4: X4Settings | None = None,
) -> MemoryEstimate:
    """`memory.check_fits` for one render of these settings (a local run's check, the server's admission).

    The size is the output's: the settings', else the input image's (with an outpaint's borders), else
    the model's; a hires pass samples and decodes at the enlarged size; an x4 model upscales by its own
    factor, in its tiles. `weights` as in `estimate_peak`.
    """
    left, right, top, bottom = params.outpaint
    width = params.width or (image.width + left + right if image is not None else config.image_size)
    height = params.height or (image.height + top + bottom if image is not None else config.image_size)
    cfg = config.guidance if params.cfg is None else params.cfg
    if config.low_res is not None and image is not None:  # an x4 model: its own factor, in its tiles
        tile = (x4 or X4Settings()).tiling.tile
        width, height = image.width * config.low_res.factor, image.height * config.low_res.factor
        tiling = VAETiling("off") if tile is None else VAETiling("on", tile, tile // 8)
        return check_fits(config, width=width, height=height, batch=params.batch_size, dtype=dtype,
                          device=device, tiling=tiling, budget=budget, guidance=cfg != 1, weights=weights,
                          unet_tile=tile, encode=False)
    if hires or mode == "upscale" or (mode == "txt2img" and params.hires):  # sampled larger
        big = hires_size(width, height, params)
        width, height = big.width, big.height
    return check_fits(config, width=width, height=height, batch=params.batch_size, dtype=dtype, device=device,
                      tiling=params.tiling(), budget=budget, guidance=cfg != 1, encode=image is not None,
                      weights=weights)


def device_and_dtype(device: str | None, dtype: str | None) -> tuple[str, torch.dtype]:
    """The device and weight dtype to run on, refused at once if this machine or torch cannot run them.

    Defaults: CUDA when there is one, fp16 there and fp32 elsewhere. fp16 and bf16 on the CPU are
    refused rather than silently run in fp32: there the UNet mixes them with fp32 and fails mid-run.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise SettingsError(f"unknown device {device!r}; cpu, cuda, cuda:N or mps") from None
    kind = chosen.type
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if kind == "cuda" and available["cuda"]:
        available["cuda"] = (chosen.index or 0) < torch.cuda.device_count()
    if not available.get(kind, False):
        cpu_only = kind == "cuda" and not torch.version.cuda
        build = f"torch {torch.__version__}{', a CPU-only build' if cpu_only else ''}"
        raise SettingsError(f"device {device!r} is not available on this machine ({build}); use --device cpu")
    if kind == "cpu" and dtype in ("fp16", "bf16"):
        raise SettingsError(f"--dtype {dtype} does not run on the CPU; use fp32 (the default there)")
    return device, DTYPES[dtype] if dtype else torch.float16 if kind == "cuda" else torch.float32


def load_renderer(
    path: Path, *, device: str | None = None, dtype: str | None = None, prediction: str | None = None,
    lora_dirs: Iterable[Path] = (), embedding_dirs: Iterable[Path] = (),
    loras: Iterable[tuple[Path, float]] = (), refiner: Path | None = None, prompts: Iterable[str] = (),
    log: Log = _stderr, vae: Path | None = None, engine: str = "eager", decoder: Path | None = None,
    upscaler: Path | None = None, memory_budget: int | None = None, offload: str | None = None,
) -> Renderer:
    """Load a model with its LoRA folders, embeddings, merged LoRA files and refiner; `log` gets the notes.

    The device defaults to CUDA when there is one, the dtype to fp16 there and fp32 elsewhere. The
    `<lora:NAME:W>` tags in `prompts` are looked up first, so that a typo costs no load time.
    `engine` runs the UNet and decoder (`openldm.engines`); `decoder`, a TAESD file, replaces the VAE's.
    `memory_budget`: the bytes a run may peak at (None: what this machine has).
    `offload` (CUDA only; `engines.offload`) keeps the weights in system memory, visiting the GPU to run.
    """
    taesd = load_taesd(decoder) if decoder is not None else None
    networks, embeddings = NetworkLibrary(lora_dirs), read_embeddings(embedding_dirs)
    for ref in network_refs(*prompts):
        networks.path(ref)
    merged = [(load_network(file), weight) for file, weight in loras]
    device, torch_dtype = device_and_dtype(device, dtype)
    if offload is not None and torch.device(device).type != "cuda":
        raise SettingsError(f"--offload {offload} needs CUDA (the model is on {device}, already in system "
                            "memory)")
    if offload is not None and engine.startswith("openvino"):
        raise SettingsError(f"--offload runs the model on CUDA; --engine {engine} runs it on the CPU")
    engine = "eager" if offload is not None and engine == "auto" else engine  # auto is OpenVINO on the CPU
    pipe = load(path, device="cpu" if offload else device, dtype=torch_dtype, prediction=prediction, vae=vae,
                engine=engine)
    if offload is not None:
        from openldm.engines.offload import enable_offload, pipeline_modules

        enable_offload(pipeline_modules(pipe), offload, device)
    if taesd is not None:
        pipe.use_decoder(taesd)
    pipe.progress, pipe.networks = True, networks
    domain, pipe.domain = pipe.domain, None  # the Renderer reports it in each result, not as a warning
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
                    tuple((network.name, weight) for network, weight in merged), domain,
                    vae=pipe.components.vae_file, upscaler=x4, memory_budget=memory_budget,
                    upscaler_hash=None if upscaler is None else model_hash(upscaler))
