"""`openldm bench`: a real generation timed stage by stage, optionally beside diffusers on the same weights.

Timings come from wrapping the pipeline's runners (every UNet call, the decode) and from timing
each stage around it; FLOPs of one UNet call are counted by `torch.utils.flop_counter` and set
against a matmul measured on the spot on the run's device, in its dtype. Runs of openldm and diffusers
alternate, so that a busy host slows both alike: read the ratios. On CUDA every timed call ends with
a synchronize (kernels run asynchronously), and each run reports its own peak VRAM
(`torch.cuda.max_memory_allocated`, reset before it). The benchmark reports; nothing here asserts a time.
"""

from __future__ import annotations

import dataclasses
import io
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from openldm.memory import MemoryEstimate
from openldm.pipelines.params import GenerationParams
from openldm.pipelines.pipeline import Pipeline


@dataclass
class Timed:
    """A callable whose every call's wall time is recorded (the pipeline's runners are wrapped in one)."""

    inner: Callable[..., Any]
    device: torch.device = torch.device("cpu")
    times: list[float] = field(default_factory=list)

    @property
    def engine(self) -> Any:  # `Pipeline.use_decoder` rebuilds runners with the same engine
        return self.inner.engine

    def __call__(self, *args: Any) -> Any:
        start = time.perf_counter()
        out = self.inner(*args)
        synchronize(self.device)
        self.times.append(time.perf_counter() - start)
        return out


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that a wall time covers the work (CUDA is asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_vram(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_vram_gib(device: torch.device) -> float | None:
    """The most CUDA memory torch held since `reset_peak_vram`; None off CUDA."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@dataclass(frozen=True)
class Stages:
    """One run's stage times in seconds, and what they add up to."""

    tool: str
    load_s: float
    text_encoding_s: float
    unet_step_median_s: float
    unet_step_min_s: float
    unet_step_max_s: float
    unet_calls: int
    vae_decode_s: float
    generate_s: float  # everything from settings to pixels: text encoding, steps, decode, sampler work
    png_write_s: float
    total_s: float  # load + generate + png write (+ imports, for the first openldm run)
    it_per_s: float  # sampling steps per second of UNet time
    peak_rss_gib: float  # of the process so far: runs share one process
    peak_vram_gib: float | None  # of this run, on CUDA
    estimated_peak_gib: float | None = None  # `openldm.memory`'s estimate of this run (openldm runs only)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def matmul_gflops(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  n: int = 1024, reps: int = 5) -> float:
    """The device's matmul speed now in `dtype`, the roofline that the UNet's GFLOP/s is read against."""
    device = torch.device(device)
    n = n if device.type == "cpu" else 4 * n  # a GPU needs a larger product to reach its peak
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def unet_flops(pipe: Pipeline, params: GenerationParams) -> int:
    """FLOPs of one (CFG-batched) UNet call at the run's size, counted on the eager module."""
    from torch.utils.flop_counter import FlopCounterMode

    f, cfg = pipe.config.vae.downsample_factor, pipe.config
    batch = 2 * params.batch_size
    like = {"device": pipe.device, "dtype": pipe.dtype}
    x = torch.zeros(batch, cfg.unet.in_channels, params.height // f, params.width // f, **like)
    context = torch.zeros(batch, 77, cfg.unet.context_dim, **like)
    y = torch.zeros(batch, cfg.unet.adm_in_channels, **like) if cfg.unet.adm_in_channels else None
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        pipe.unet(x, torch.full((batch,), 500.0, **like), context, y)
    return counter.get_total_flops()


def text_encoding_s(pipe: Pipeline, params: GenerationParams) -> float:
    """One encoding of the prompt and negative prompt, as a generation of new prompts does first."""
    from openldm.pipelines.conditioning import PromptEncoder

    encoder = PromptEncoder(pipe.text_encoders, params.clip_skip)  # no cache: the encoders' own time
    start = time.perf_counter()
    with torch.no_grad():
        encoder([params.prompt, params.negative], 1)
    synchronize(pipe.device)
    return time.perf_counter() - start


def run_openldm(model: Path, params: GenerationParams, engine: str, imports_s: float = 0.0,
                pipe: Pipeline | None = None, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> tuple[Stages, Pipeline]:
    """Load (unless `pipe` is given, then load_s is 0), encode, sample, decode and write one batch.

    The prompt cache is emptied first: every round encodes its prompts, as diffusers does.
    """
    from openldm.pipelines.loading import load

    reset_peak_vram(torch.device(device))
    start = time.perf_counter()
    pipe = pipe or load(model, engine=engine, device=device, dtype=dtype)
    synchronize(pipe.device)
    load_s = time.perf_counter() - start
    text_s = text_encoding_s(pipe, params)
    pipe.prompt_cache.clear()
    pipe.unet_runner = Timed(pipe.unet_runner, pipe.device)
    pipe.decoder_runner = Timed(pipe.decoder_runner, pipe.device)
    try:
        start = time.perf_counter()
        images = [r.image for r in pipe.generate(params)]
        generate_s = time.perf_counter() - start
        unet, decode = pipe.unet_runner.times, pipe.decoder_runner.times
    finally:
        pipe.unet_runner, pipe.decoder_runner = pipe.unet_runner.inner, pipe.decoder_runner.inner
    png_s = png_write_s(images)
    stages = _stages(f"openldm ({engine})", load_s, text_s, unet, sum(decode), generate_s, png_s,
                     imports_s + load_s + generate_s + png_s, params.steps, pipe.device)
    return dataclasses.replace(stages, estimated_peak_gib=estimated_peak(pipe, params).total / 2**30), pipe


def estimated_peak(pipe: Pipeline, params: GenerationParams) -> MemoryEstimate:
    """What `openldm.memory` expects this run to peak at: the estimate a run is admitted by, unbounded."""
    from openldm.pipelines.render import check_run_memory, pipeline_weights

    return check_run_memory(pipe.config, "txt2img", params, dtype=pipe.dtype, device=pipe.device,
                            budget=2**62, weights=pipeline_weights(pipe))


def png_write_s(images: list) -> float:
    start = time.perf_counter()
    for image in images:
        image.save(io.BytesIO(), format="PNG")
    return time.perf_counter() - start


def _stages(tool: str, load_s: float, text_s: float, unet: list[float], decode_s: float, generate_s: float,
            png_s: float, total_s: float, steps: int, device: torch.device) -> Stages:
    return Stages(tool, load_s, text_s, statistics.median(unet), min(unet), max(unet), len(unet), decode_s,
                  generate_s, png_s, total_s, steps / sum(unet), peak_rss_gib(), peak_vram_gib(device))


def as_dict(stages: Stages, flops: int, roofline: float) -> dict[str, Any]:
    """The JSON record of a run: its stages, and achieved GFLOP/s against the roofline."""
    achieved = flops / stages.unet_step_median_s / 1e9
    return asdict(stages) | {"unet_gflop_per_call": flops / 1e9, "unet_gflop_per_s": achieved,
                             "roofline_gflop_per_s": roofline, "roofline_fraction": achieved / roofline}


def diffusers_folder(pipe: Pipeline, model: Path, scratch: Path) -> Path:
    """The model as a diffusers folder: itself if it is one, else our conversion of the loaded weights."""
    from openldm.checkpoints.save import save_diffusers

    if (model / "model_index.json").exists():
        return model
    return save_diffusers(pipe.components, scratch / "diffusers")


def _timed_module(module: torch.nn.Module, times: list[float], device: torch.device) -> None:
    """Record each forward's wall time through forward hooks (diffusers' modules are not ours to wrap)."""
    starts: list[float] = []
    module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))

    def done(*_: Any) -> None:
        synchronize(device)
        times.append(time.perf_counter() - starts.pop())

    module.register_forward_hook(done)


def load_diffusers(folder: Path, family: str, device: str = "cpu",
                   dtype: torch.dtype = torch.float32) -> tuple[Any, float]:
    """diffusers' pipeline from `folder` with Euler ("leading", as openldm's default), and its load time."""
    import diffusers

    start = time.perf_counter()
    if family == "sdxl":
        ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=dtype)
    else:
        ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                                torch_dtype=dtype)
    ref = ref.to(device)
    synchronize(ref.device)
    load_s = time.perf_counter() - start
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(
        ref.scheduler.config, timestep_spacing="leading", steps_offset=1)
    ref.set_progress_bar_config(disable=True)
    return ref, load_s


def run_diffusers(ref: Any, load_s: float, params: GenerationParams) -> Stages:
    """The same generation through diffusers; `load_s` is its load time (0 after the first run)."""
    unet: list[float] = []
    decode: list[float] = []
    device = ref.device
    _timed_module(ref.unet, unet, device)
    _timed_module(ref.vae.decoder, decode, device)
    reset_peak_vram(device)
    try:
        start = time.perf_counter()
        with torch.no_grad():
            ref.encode_prompt(params.prompt, device, params.batch_size, True, params.negative)
        synchronize(device)
        text_s = time.perf_counter() - start
        start = time.perf_counter()
        images = ref(params.prompt, negative_prompt=params.negative, num_inference_steps=params.steps,
                     guidance_scale=params.cfg, width=params.width, height=params.height,
                     num_images_per_prompt=params.batch_size,
                     generator=torch.Generator().manual_seed(params.seed)).images
        generate_s = time.perf_counter() - start
    finally:
        for module in (ref.unet, ref.vae.decoder):
            module._forward_pre_hooks.clear()
            module._forward_hooks.clear()
    png_s = png_write_s(images)
    return _stages("diffusers", load_s, text_s, unet, sum(decode), generate_s, png_s,
                   load_s + generate_s + png_s, params.steps, device)
