"""One memory estimate for a generation, from the model's config alone, checked before work starts.

The peak of a run is the weights plus the largest stage: text encoding, one UNet step (the batch
doubled by classifier-free guidance) or the VAE (decode, and encode for img2img), which at high
resolution is the usual peak. Each stage is counted as the tensors alive at its widest point under
`torch.no_grad`, walked over the same levels the model builds:

- a 3x3 convolution on the CPU holds its input, oneDNN's blocked copies of input and output, and its
  output; a ResnetBlock also keeps its input for the skip path, and a level keeps the tensor it was
  given while its blocks run;
- a transformer block's peak is the GEGLU feed-forward (8x, then 4x and 4x the width per token);
- PyTorch SDPA on the CPU never holds the tokens x tokens matrix (its flash kernel works in chunks;
  measured: 12 MiB for 2 x 8 heads x 4096 tokens), but the `math` backend holds about 2.3 copies.

`scripts/memory_table.py` measures the same runs' peak RSS in fresh processes; see its table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from openldm.config import CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig
from openldm.models.vae_tiling import VAETiling
from openldm.nn.attention import Backend

MiB, GiB = 2**20, 2**30
# VmRSS of a process that has imported torch and openldm's pipeline, before any model is built
# (measured 280-300 MiB with torch 2.13 CPU); CUDA memory starts at zero.
RUNTIME_CPU = 280 * MiB
# What a stage holds beside its activations and the largest conv weight's blocked copy, which oneDNN
# makes on every call (118 MiB for SD's 2560 -> 1280 UNet conv): kernel scratch, allocator slack.
SCRATCH = 16 * MiB
WHOLE = VAETiling("off")  # a VAE that decodes whole: what `check_fits` counts unless told
MATH_ATTENTION_COPIES = 2.3  # scores, softmax: measured 591 MiB for a 256 MiB matrix


class MemoryLimitError(ValueError):
    """A run would not fit in memory; the message is one line with the estimate, budget and a way out."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of one generation and what makes them up (the stages run one after another)."""

    runtime: int
    weights: int
    text_encoder: int
    unet: int
    vae_decode: int
    vae_encode: int = 0  # img2img and inpainting only
    vae_tile: int | None = None  # the tile the VAE stages are counted in (latent pixels); None: whole

    @property
    def stages(self) -> dict[str, int]:
        return {"text encoder": self.text_encoder, "UNet": self.unet, "VAE decode": self.vae_decode,
                "VAE encode": self.vae_encode}

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=self.stages.__getitem__)

    @property
    def total(self) -> int:
        return self.runtime + self.weights + max(self.stages.values())

    def __str__(self) -> str:
        return (f"{gib(self.total)} (weights {gib(self.weights)}, peak at {self.peak_stage} "
                f"{gib(self.stages[self.peak_stage])})")


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def estimate_peak(
    config: ModelConfig, *, width: int, height: int, batch: int = 1, dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu", vae_tile: int | None = None, vae_sliced: bool = False,
    guidance: bool = True, encode: bool = False, attention: Backend = "sdpa", weights: int | None = None,
    unet_tile: int | None = None,
) -> MemoryEstimate:
    """Peak memory of generating `batch` images of width x height; `vae_tile` in latent pixels.

    `weights`: the bytes of the weights when a loaded model knows them (else counted from the config).
    `unet_tile` (latent pixels): the UNet runs on tiles of that side (the x4 upscaler's tiling)."""
    if width <= 0 or height <= 0 or batch <= 0:
        raise ValueError(f"width, height and batch must be positive, got {width}x{height}, batch {batch}")
    item = torch.empty((), dtype=dtype).element_size()
    f = config.vae.downsample_factor
    h, w = height // f, width // f
    unet_batch = batch * (2 if guidance else 1)
    vae_batch = 1 if vae_sliced else batch
    cpu = torch.device(device).type == "cpu"
    return MemoryEstimate(
        runtime=RUNTIME_CPU if cpu else 0,
        weights=weight_bytes(config, item) if weights is None else weights,
        text_encoder=sum(text_bytes(c, unet_batch, item) for c in config.text_encoders),
        unet=tiled_unet_bytes(config.unet, unet_batch, h, w, item, attention, unet_tile),
        vae_decode=vae_decode_bytes(config.vae, vae_batch, h, w, item, attention, tile=vae_tile,
                                    images=batch),
        vae_encode=vae_encode_bytes(config.vae, vae_batch, h, w, item, attention, tile=vae_tile)
        if encode else 0,
        vae_tile=vae_tile if vae_tile is not None and max(h, w) > vae_tile else None,
    )


@lru_cache(maxsize=32)
def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters per component, from the model classes built on the meta device (no memory used)."""
    from openldm.checkpoints.layout import component_prefixes  # the loader's own list of components
    from openldm.checkpoints.load import build_component

    return {name: sum(p.numel() for p in build_component(name, config).parameters())
            for name in component_prefixes(config)}


def module_bytes(*modules: torch.nn.Module) -> int:
    """The bytes of loaded modules' parameters: a loaded model's `weights` for `estimate_peak`."""
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def weight_bytes(config: ModelConfig, item: int) -> int:
    return sum(parameter_counts(config).values()) * item


def text_bytes(cfg: CLIPTextConfig, batch: int, item: int) -> int:
    """One layer's widest point: residual, norm, q, k, v and the MLP's hidden and activated width."""
    tokens = batch * cfg.max_length
    scores = batch * cfg.num_heads * cfg.max_length**2 * MATH_ATTENTION_COPIES
    return int(tokens * (6 * cfg.hidden_size + 2 * cfg.intermediate_size) * item + scores * item) + SCRATCH


def conv_block(c_in: int, c_out: int) -> int:
    """Floats per pixel at a ResnetBlock's widest point: input, activated input and oneDNN's blocked
    copies around the first conv, or the second conv's four with the input kept for the skip."""
    return max(3 * c_in + 2 * c_out, c_in + 4 * c_out)


def attention_bytes(batch: int, heads: int, tokens: int, dim: int, item: int, backend: Backend) -> int:
    """q, k, v and output, plus the scores where they are materialised."""
    scores = batch * heads * tokens**2 * MATH_ATTENTION_COPIES if backend == "math" else 0
    return int((4 * batch * tokens * dim + scores) * item)


def unet_bytes(cfg: UNetConfig, batch: int, h: int, w: int, item: int, backend: Backend) -> int:
    """Every input block's output is kept for the skips; on top, the widest block of the walk."""
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    pixels = [(h >> i) * (w >> i) for i in range(len(widths))]
    kept = widths[0] * pixels[0]
    for i, (c, p) in enumerate(zip(widths, pixels)):
        kept += cfg.num_res_blocks * c * p + (c * pixels[i + 1] if i + 1 < len(widths) else 0)
    widest = 0
    for i, (c, p) in enumerate(zip(widths, pixels)):
        attends = cfg.transformer_depth[i] > 0 or i == len(widths) - 1
        # An output block: the previous h and the concatenation with a skip stay alive inside it.
        block = p * (3 * c + conv_block(2 * c, c))
        if attends:
            block = max(block, p * (3 * c + 19 * c))  # ... and its transformer: tokens, norm, GEGLU
            heads = cfg.heads_at(c)
            block += attention_bytes(1, heads, p, c // heads, 1, backend)
        widest = max(widest, block)
    conv = 9 * widths[-1] * 2 * widths[-1]  # the widest output block's first conv: 2c -> c
    return int((batch * (kept + widest) + conv) * item) + SCRATCH


def tiled_unet_bytes(cfg: UNetConfig, batch: int, h: int, w: int, item: int, backend: Backend,
                     tile: int | None) -> int:
    """One tile's UNet, plus the blend's float32 sum, weights and result at full size (`models.vae.tiled`)."""
    if tile is None or (h <= tile and w <= tile):
        return unet_bytes(cfg, batch, h, w, item, backend)
    blend = 3 * batch * cfg.out_channels * h * w * 4
    return blend + unet_bytes(cfg, batch, min(h, tile), min(w, tile), item, backend)


def vae_decode_bytes(
    cfg: VAEConfig, batch: int, h: int, w: int, item: int, backend: Backend = "sdpa", *,
    tile: int | None = None, images: int | None = None,
) -> int:
    """The decoder's widest level for a (batch, z, h, w) latent; tiled, one tile's plus the blend."""
    images = batch if images is None else images
    f = cfg.downsample_factor
    pixels_out = images * 3 * h * w * f * f * 4  # float32 image, and its conversion to 8 bits
    if tile is not None and (h > tile or w > tile):
        # The blend's float32 sum, weights and result (see `models.vae.tiled`), and one tile at a time.
        return 3 * pixels_out + vae_decode_bytes(cfg, batch, min(h, tile), min(w, tile), item, backend,
                                                 images=1) - SCRATCH
    widths = [cfg.ch * m for m in cfg.ch_mult]
    top, p = widths[-1], h * w
    widest = p * conv_block(top, top) + attention_bytes(1, 1, p, top, 1, backend)
    c_in = top
    for i in reversed(range(len(widths))):  # running order: lowest resolution first
        # The level's input stays alive while its later blocks run.
        widest = max(widest, p * conv_block(c_in, widths[i]), p * (c_in + conv_block(widths[i], widths[i])))
        if i > 0:  # nearest x2 then a conv at the next level's resolution: input, upsampled, copy, output
            widest = max(widest, p * widths[i] * (1 + 3 * 4))
            p *= 4
        c_in = widths[i]
    return int((batch * widest + 9 * top * top) * item) + 2 * pixels_out + SCRATCH


def vae_encode_bytes(
    cfg: VAEConfig, batch: int, h: int, w: int, item: int, backend: Backend = "sdpa", *,
    tile: int | None = None,
) -> int:
    """The encoder's widest level for a (batch, 3, h*f, w*f) image giving an (h, w) latent."""
    f = cfg.downsample_factor
    if tile is not None and (h > tile or w > tile):
        moments = batch * 2 * cfg.embed_dim * h * w * 4
        return 3 * moments + vae_encode_bytes(cfg, batch, min(h, tile), min(w, tile), item, backend)
    widths = [cfg.ch * m for m in cfg.ch_mult]
    p = h * w * f * f
    widest, c_in = 0, cfg.ch
    for i, c in enumerate(widths):
        widest = max(widest, p * conv_block(c_in, c), p * (c_in + conv_block(c, c)))
        if i < len(widths) - 1:
            widest = max(widest, p * c * 3)  # the level input, its padded copy, the strided conv's input
            p //= 4
        c_in = c
    widest = max(widest, p * conv_block(c_in, c_in) + attention_bytes(1, 1, p, c_in, 1, backend))
    return int(batch * widest * item) + batch * 3 * h * w * f * f * 4 + SCRATCH


# --- budgets ---------------------------------------------------------------------------------------

def _status_kib(path: str, field: str) -> int:
    with open(path) as f:
        return int(next(line for line in f if line.startswith(field)).split()[1])


def memory_available(device: str | torch.device = "cpu") -> int:
    """Bytes that can be allocated now: MemAvailable on the CPU, free VRAM plus torch's cached blocks."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        raise ValueError(f"no memory budget for device {device}; use cpu or cuda")
    if os.path.exists("/proc/meminfo"):
        return _status_kib("/proc/meminfo", "MemAvailable:") * 1024
    import psutil  # not Linux: psutil, where installed

    return psutil.virtual_memory().available


def memory_budget(device: str | torch.device = "cpu") -> int:
    """The peak this process can reach: what is free now plus what it already holds (its RSS, or the
    VRAM torch holds), so an estimate of the whole process compares with it directly."""
    device = torch.device(device)
    if device.type == "cuda":
        return memory_available(device) + torch.cuda.memory_allocated(device)
    held = _status_kib("/proc/self/status", "VmRSS:") * 1024 if os.path.exists("/proc/self/status") else 0
    return memory_available(device) + held


# --- the check ------------------------------------------------------------------------------------

def check_fits(
    config: ModelConfig, *, width: int, height: int, batch: int = 1, dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu", tiling: VAETiling = WHOLE, budget: int | None = None, **options,
) -> MemoryEstimate:
    """The estimate if it fits `budget` (default: `memory_budget(device)`), else MemoryLimitError.

    `tiling` is the run's VAE setting: `auto` counts the tiled VAE only if the whole one does not
    fit, and the estimate returned says which (`MemoryEstimate.vae_tile`). `options` go to
    `estimate_peak` (guidance, encode, attention).
    """
    budget = memory_budget(device) if budget is None else budget
    tile = tiling.tile_size if tiling.mode != "off" else None

    def estimate(size: tuple[int, int], n: int, tile: int | None = tile) -> MemoryEstimate:
        return estimate_peak(config, width=size[0], height=size[1], batch=n, dtype=dtype, device=device,
                             vae_tile=tile, vae_sliced=tiling.sliced, **options)

    found = estimate((width, height), batch, None if tiling.mode == "auto" else tile)
    if found.total > budget and tiling.mode == "auto":
        found = estimate((width, height), batch)
    if found.total <= budget:
        return found
    ways = _ways_out(estimate, config, (width, height), batch, budget, tiling)
    raise MemoryLimitError(f"{width}x{height}, batch {batch} needs about {found} but {device} has "
                           f"{gib(budget)}; {ways}")


def _ways_out(estimate, config: ModelConfig, size: tuple[int, int], batch: int, budget: int,
              tiling: VAETiling) -> str:
    """What would fit: a smaller size, tiling (if the run may not tile), fewer images at a time."""
    ways = []
    side = _largest_fitting_side(lambda s: estimate((s, s), batch).total <= budget,
                                 config.vae.downsample_factor * 8)
    if side:
        ways.append(f"{side}x{side} at this batch")
    if tiling.mode == "off" and estimate(size, batch, tiling.tile_size).total <= budget:
        ways.append("--vae-tiling on")
    fewer = next((n for n in range(batch - 1, 0, -1) if estimate(size, n).total <= budget), None)
    if fewer:
        ways.append(f"--batch-size {fewer}")
    return f"would fit: {', '.join(ways)}" if ways else "nothing smaller fits either"


def _largest_fitting_side(fits, step: int) -> int | None:
    """The largest multiple of `step` for which `fits(side)` holds (fits shrinks with side), if any."""
    if not fits(step):
        return None
    low, high = 1, 2
    while fits(high * step):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid * step) else (low, mid)
    return low * step
