"""A loaded model that generates: txt2img, img2img, inpainting and hires-fix upscaling.

Every mode is the same few steps: encode the prompts, make the starting latents, sample, decode.
They differ only in where sampling starts (noise, or a noised image latent), which denoiser wraps
the model (guidance, prompt editing, masks) and what happens to the pixels afterwards.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from openldm.checkpoints.io import CheckpointError
from openldm.checkpoints.layout import TEXT_ENCODER_NAMES
from openldm.checkpoints.load import Components, load_components
from openldm.config import ModelConfig
from openldm.diffusion.denoisers import CFGDenoiser, DiscreteDenoiser
from openldm.diffusion.noise import BatchNoise, BrownianTreeNoise
from openldm.diffusion.registry import resolve
from openldm.diffusion.samplers import Denoiser, Step
from openldm.diffusion.schedules import DiscreteSchedule, make_betas
from openldm.diffusion.sigmas import img2img_sigmas, schedule_options, switch_step
from openldm.models.tokenizer import CLIPTokenizer, find_tokenizers
from openldm.networks import (
    AppliedNetworks,
    Embedding,
    LoadedNetwork,
    NetworkLibrary,
    NetworkReport,
    apply_networks,
    network_refs,
    read_embeddings,
)
from openldm.pipelines import images as im
from openldm.pipelines.common import (
    MaskedDenoiser,
    ScheduledDenoiser,
    StepTracker,
    schedule_prompts,
    starting_noise,
)
from openldm.pipelines.conditioning import PromptEncoder, TextEncoder, vector_conditioning
from openldm.pipelines.params import MASKED_CONTENT, GenerationParams, seeds_for

StepCallback = Callable[[int, int, torch.Tensor], None]  # (step, total, denoised latents)


@dataclass
class Result:
    """One generated image with the exact settings (concrete seed) that reproduce it."""

    image: Image.Image
    params: GenerationParams
    mode: str
    latent: torch.Tensor
    networks: list[NetworkReport] = field(default_factory=list)  # what the prompts' LoRA tags merged


@dataclass
class _Overlay:
    """The picture to inpaint at working size, and how to put results back into the original."""

    image: Image.Image
    mask: Image.Image
    original: Image.Image
    original_mask: Image.Image
    box: tuple[int, int, int, int] | None = None

    def apply(self, picture: Image.Image) -> Image.Image:
        """Outside the mask the result keeps the original pixels ("only masked": pasted back)."""
        if self.box is not None:
            return im.paste_back(self.original, picture, self.box, self.original_mask)
        return Image.composite(picture, self.original, self.mask)


@dataclass
class _Start:
    """Where sampling begins: the image latent (None for txt2img) and the mask handling."""

    latent: torch.Tensor | None = None
    keep: torch.Tensor | None = None  # latent-resolution mask of what to keep (ordinary models)
    concat: torch.Tensor | None = None  # inpainting models' extra UNet input: mask + masked image


class Pipeline:
    def __init__(self, components: Components, tokenizers: Sequence[CLIPTokenizer] | None = None):
        self.components = components
        self.config: ModelConfig = components.config
        self.unet, self.vae = components.unet.eval(), components.vae.eval()
        if tokenizers is None:
            tokenizers = default_tokenizers(components)
        self.text_encoders = [TextEncoder(t, m.eval()) for t, m in zip(tokenizers, components.text_encoders)]
        cfg = self.config
        betas = make_betas("scaled_linear", cfg.timesteps, cfg.linear_start, cfg.linear_end)
        self.schedule = DiscreteSchedule.from_betas(betas)
        self.denoiser = DiscreteDenoiser(self._unet, self.schedule, cfg.prediction)
        self.progress = False
        self.networks = NetworkLibrary()  # the LoRA files that prompts name: <lora:name:weight>

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def _unet(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None,
              concat: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet as the denoiser sees it; inpainting models also get the mask and masked image."""
        if concat is not None:
            x = torch.cat([x, concat.to(x)], dim=1)
        return self.unet(x, t.to(x.dtype), context.to(x.dtype), None if y is None else y.to(x.dtype))

    # --- extra networks and embeddings -----------------------------------------------------------

    def merge_networks(self, networks: Iterable[tuple[LoadedNetwork, float]]) -> AppliedNetworks:
        """Merge (network, weight) pairs into the UNet and text encoders; the result's `remove` undoes it."""
        encoders = {name: encoder.model for name, encoder in zip(TEXT_ENCODER_NAMES, self.text_encoders)}
        return apply_networks({"unet": self.unet, **encoders}, networks, self.config)

    def prompt_networks(self, params: GenerationParams) -> AppliedNetworks:
        """Merge the networks that the prompt and negative prompt name, found by name in `networks`."""
        refs = network_refs(params.prompt, params.negative)
        return self.merge_networks(self.networks.load(refs)) if refs else AppliedNetworks([])

    def add_embeddings(self, embeddings: Iterable[Embedding]) -> list[str]:
        """Make embeddings usable by name in prompts; returns why each made for another model was skipped."""
        fitting, skipped = {}, []
        for embedding in embeddings:
            try:
                fitting[embedding.name] = embedding.for_model(self.config)
            except CheckpointError as e:
                skipped.append(f"{embedding.source or embedding.name}: skipped: {e}")
        for i, (component, encoder) in enumerate(zip(TEXT_ENCODER_NAMES, self.text_encoders)):
            own = {name: parts[component] for name, parts in fitting.items() if component in parts}
            self.text_encoders[i] = dataclasses.replace(encoder, embeddings={**encoder.embeddings, **own})
        return skipped

    # --- public modes ----------------------------------------------------------------------

    # `settings` are `GenerationParams` fields; `callback(step, total, denoised)` sees every step.

    # `refiner`, another pipeline (the SDXL refiner), finishes each sampling run from `refiner_switch` on;
    # this pipeline's VAE encodes and decodes (SDXL base and refiner ship the same one).

    def txt2img(
        self, prompt: str, *, callback: StepCallback | None = None, refiner: Pipeline | None = None,
        **settings: Any,
    ) -> list[Image.Image]:
        params = GenerationParams(prompt, **settings)
        return [r.image for r in self.generate(params, callback=callback, refiner=refiner)]

    def img2img(
        self, image: Image.Image, prompt: str, *, callback: StepCallback | None = None,
        refiner: Pipeline | None = None, **settings: Any,
    ) -> list[Image.Image]:
        """Redraw `image`; `outpaint=(left, right, top, bottom)` first extends it and paints the new area."""
        params = GenerationParams(prompt, **settings)
        return [r.image for r in self.generate(params, image=image, callback=callback, refiner=refiner)]

    def inpaint(
        self, image: Image.Image, mask: Image.Image, prompt: str, *, callback: StepCallback | None = None,
        refiner: Pipeline | None = None, **settings: Any,
    ) -> list[Image.Image]:
        params = GenerationParams(prompt, **settings)
        return [r.image for r in self.generate(params, image=image, mask=mask, callback=callback,
                                               refiner=refiner)]

    def upscale(
        self, prompt: str, image: Image.Image | None = None, *, callback: StepCallback | None = None,
        refiner: Pipeline | None = None, **settings: Any,
    ) -> list[Image.Image]:
        """Hires fix: generate (or take `image`), enlarge, then refine with img2img."""
        params = GenerationParams(prompt, **settings)
        return [r.image for r in self.generate(params, image=image, hires=True, callback=callback,
                                               refiner=refiner)]

    # --- the shared path ---------------------------------------------------------------------

    def generate(
        self, params: GenerationParams, *, image: Image.Image | None = None, mask: Image.Image | None = None,
        hires: bool = False, callback: StepCallback | None = None, latents: torch.Tensor | None = None,
        refiner: Pipeline | None = None,
    ) -> list[Result]:
        """All images of a run (batch_count batches of batch_size), each with its exact seed and size."""
        if refiner is not None:
            self._check_refiner(refiner)
        params = dataclasses.replace(params.with_seed(), refiner_model=refiner and refiner.name,
                                     cfg=self.config.guidance if params.cfg is None else params.cfg)
        image, mask = _outpaint(params, image, mask)
        width, height = self._size(params, image)
        mode = "inpaint" if mask is not None else "img2img" if image is not None else "txt2img"
        mode = "outpaint" if any(params.outpaint) else mode
        results = []
        with self.prompt_networks(params) as applied:  # merged for this run; weights restored bit for bit
            for batch in range(params.batch_count):
                seeds = seeds_for(params.seed, params.batch_size, batch * params.batch_size)
                subseeds = seeds_for(params.subseed, params.batch_size, batch * params.batch_size)
                images, x = self._run(
                    params, seeds, subseeds, width, height, image, mask, hires, callback, latents, refiner
                )
                for i, (picture, seed, subseed) in enumerate(zip(images, seeds, subseeds)):
                    one = dataclasses.replace(params, seed=seed, subseed=subseed, width=width, height=height,
                                              batch_size=1, batch_count=1)
                    results.append(Result(picture, one, "upscale" if hires else mode, x[i : i + 1],
                                          applied.reports))
        return results

    def _size(self, params: GenerationParams, image: Image.Image | None) -> tuple[int, int]:
        native = self.config.image_size
        width = params.width or (image.width if image is not None else native)
        height = params.height or (image.height if image is not None else native)
        im.check_size(width, height, 8)
        return width, height

    def _run(self, params, seeds, subseeds, width, height, image, mask, hires, callback, latents, refiner):
        if hires:
            return self._hires(params, seeds, subseeds, width, height, image, callback, refiner)
        start, overlay = _Start(), None
        if image is not None:
            if mask is not None:
                overlay = self._prepare_inpaint(params, image, mask, width, height)
                image, mask = overlay.image, overlay.mask
            else:
                image = im.resize_image(image, width, height, params.resize_mode)
            start = self._start_from_image(params, image, mask, seeds)
        strength = params.strength if start.latent is not None else 1.0
        x = self.sample(params, seeds, subseeds, width, height, start, strength, callback, latents, refiner)
        pictures = self.decode(x)
        if overlay is not None and params.overlay:
            pictures = [overlay.apply(p) for p in pictures]
        return pictures, x

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """Pixels -> model-space latent (the posterior's mean: deterministic)."""
        x = im.to_tensor([image]).to(self.device, self.dtype)
        with torch.no_grad():
            return self.config.latent_format.to_model(self.vae.encode(x).mode())

    def decode(self, x: torch.Tensor) -> list[Image.Image]:
        with torch.no_grad():
            return im.to_pil(self.vae.decode(self.config.latent_format.from_model(x).to(self.dtype)))

    # --- sampling ------------------------------------------------------------------------------

    def sample(
        self, params: GenerationParams, seeds: list[int], subseeds: list[int], width: int, height: int,
        start: _Start, strength: float = 1.0, callback: StepCallback | None = None,
        latents: torch.Tensor | None = None, refiner: Pipeline | None = None,
    ) -> torch.Tensor:
        """Run the sampler from noise (txt2img) or from a noised image latent (strength < 1).

        With a refiner, this model runs the steps down to the switch and the refiner the rest: one
        schedule and one noise stream, so ancestral noise is what a single run would draw.
        """
        spec, schedule_name = resolve(params.sampler, params.schedule)
        f = self.config.vae.downsample_factor
        shape = (self.config.latent_format.channels, height // f, width // f)
        options = schedule_options(schedule_name, self.config.family)
        sigmas = spec.sigmas(schedule_name, params.steps, self.schedule, **options).to(self.device)
        if start.latent is not None:
            sigmas = img2img_sigmas(sigmas, strength)
        if self.config.is_inpainting and start.concat is None:  # txt2img, img2img, hires fix
            start = dataclasses.replace(start, concat=self._unmasked_concat(width, height))
        if latents is not None and tuple(latents.shape) != (len(seeds), *shape):
            raise ValueError(f"latents of shape {tuple(latents.shape)} do not fit {len(seeds)} images of "
                             f"{width}x{height}: expected {(len(seeds), *shape)}")
        noise = BatchNoise(seeds, shape, device=self.device, dtype=torch.float32)
        first = latents if latents is not None else starting_noise(
            noise, subseeds, params.subseed_strength, shape
        )
        if len(sigmas) < 2:  # strength 0: nothing to do
            return start.latent.expand(len(seeds), -1, -1, -1).float()
        from_noise = start.latent is None or strength >= 1  # strength 1 is txt2img, as in diffusers
        x = first * sigmas[0] if from_noise else start.latent + first * sigmas[0]
        noise_sampler = noise
        if spec.noise == "brownian":
            noise_sampler = BrownianTreeNoise.for_sigmas(seeds, shape, sigmas, device=self.device)
        options = {k: v for k, v in (("eta", params.eta), ("s_noise", params.s_noise)) if v is not None}
        steps = len(sigmas) - 1
        switch = steps if refiner is None else switch_step(sigmas, self.schedule, params.refiner_switch)
        parts = [(self, start, sigmas[: switch + 1], 0)]
        if refiner is not None:  # the same latents on, without an inpainting model's extra input
            parts.append((refiner, _Start(start.latent, start.keep), sigmas[switch:], switch))
        with torch.no_grad():
            for pipe, part_start, part, offset in parts:
                if len(part) > 1:
                    denoiser, tracker = pipe._denoiser(params, len(seeds), width, height, part_start, steps,
                                                       offset, callback)
                    x = spec(denoiser, x, part, noise_sampler=noise_sampler, callback=tracker, **options)
        return x

    def _check_refiner(self, refiner: Pipeline) -> None:
        """A refiner continues this model's latents: the same latent space and device, no inpainting input."""
        if refiner.config.latent_format != self.config.latent_format or refiner.config.is_inpainting:
            raise ValueError(f"{refiner.config.name} cannot refine {self.config.name}: a refiner must share "
                             "its latent format and take plain latents (not an inpainting model)")
        if refiner.device != self.device:
            raise ValueError(f"the refiner is on {refiner.device} and the model on {self.device}: "
                             "load both on the same device")

    @property
    def name(self) -> str:
        """What PNGs call this model: its file's stem or folder's name (its preset's, if built in memory)."""
        source = self.components.source
        if source is None:
            return self.config.name
        source = Path(source).parent if Path(source).name == MODEL_FILE else Path(source)
        return source.name if source.is_dir() else source.stem

    def _denoiser(self, params, batch, width, height, start, steps, offset, callback):
        """Guidance per prompt-schedule segment, switched by step; masks applied around it.

        `steps` counts the whole run; this sampler starts at step `offset` (a refiner's, at the switch).
        """
        positive = schedule_prompts([params.prompt] * batch, steps)
        negative = schedule_prompts([params.negative] * batch, steps)
        ends = sorted(set(positive.ends) | set(negative.ends))
        encoder = PromptEncoder(self.text_encoders, params.clip_skip)
        sizes = _size_conditioning(params, width, height)
        denoisers = []
        for end in ends:
            cond_texts = next(t for e, t in zip(positive.ends, positive.texts) if e >= end)
            uncond_texts = next(t for e, t in zip(negative.ends, negative.texts) if e >= end)
            count = max(encoder.chunk_count(t) for t in cond_texts + uncond_texts)
            cond = self._cond(encoder(cond_texts, count), sizes, start, params.aesthetic_score)
            uncond = self._cond(encoder(uncond_texts, count), sizes, start, params.negative_aesthetic_score)
            denoisers.append(CFGDenoiser(self.denoiser, cond, uncond, params.cfg, params.guidance_rescale))
        tracker = StepTracker(self._step_callback(callback, steps, offset), offset)
        denoiser: Denoiser = ScheduledDenoiser(ends, denoisers, tracker) if len(ends) > 1 else denoisers[0]
        if start.keep is not None:
            denoiser = MaskedDenoiser(denoiser, start.latent, start.keep)
        return denoiser, tracker

    def _cond(self, encoded, sizes: dict[str, tuple[int, ...]], start: _Start, aesthetic: float) -> dict:
        device = self.device
        cond: dict[str, Any] = {"context": encoded.context.to(device)}
        if self.config.vector_conds:
            values = sizes | {"aesthetic_score": (aesthetic,)}
            cond["y"] = vector_conditioning(self.config, encoded.pooled, values).to(device)
        if start.concat is not None:
            cond["concat"] = start.concat.expand(encoded.context.shape[0], -1, -1, -1)
        return cond

    def _step_callback(
        self, callback: StepCallback | None, total: int, offset: int = 0
    ) -> Callable[[Step], None] | None:
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=offset, desc="sampling", unit="step", leave=False)

        def on_step(info: Step) -> None:
            if bar is not None:
                bar.update(1)
                if offset + info.i + 1 >= total:
                    bar.close()
            if callback is not None:
                callback(offset + info.i + 1, total, info.denoised)

        return on_step if (callback or bar) else None

    # --- img2img and inpainting ----------------------------------------------------------------

    def _start_from_image(self, params, image, mask, seeds) -> _Start:
        latent = self.encode_image(image)
        if mask is None:
            return _Start(latent)
        binary = im.mask_to_tensor(mask).to(self.device).round()
        small = F.interpolate(binary, size=latent.shape[-2:], mode="nearest")
        if self.config.is_inpainting:
            masked = im.to_tensor([image]).to(self.device, self.dtype) * (binary < 0.5)
            with torch.no_grad():
                masked_latent = self.config.latent_format.to_model(self.vae.encode(masked).mode())
            latent = self._masked_content(params, latent, small, seeds)
            return _Start(latent, concat=torch.cat([small, masked_latent.to(small)], dim=1))
        latent = self._masked_content(params, latent, small, seeds)
        return _Start(latent, keep=1 - small)

    def _unmasked_concat(self, width: int, height: int) -> torch.Tensor:
        """An inpainting model's extra input with no mask, as A1111 makes it: everything is to be painted.

        The mask is all ones and the masked image is the image times (1 - mask), all zeros (mid-grey).
        """
        grey = torch.zeros(1, self.vae.cfg.in_channels, height, width, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            masked_latent = self.config.latent_format.to_model(self.vae.encode(grey).mode())
        return torch.cat([torch.ones_like(masked_latent[:, :1]), masked_latent], dim=1).float()

    def _masked_content(self, params, latent, small_mask, seeds):
        """What the masked area starts from: the image, its fill, fresh noise or zeros."""
        if params.masked_content not in MASKED_CONTENT:
            raise ValueError(f"unknown masked content {params.masked_content!r}; choose one of "
                             f"{', '.join(MASKED_CONTENT)}")
        if params.masked_content == "latent_noise":
            noise = BatchNoise([s + 0x5EED for s in seeds[:1]], latent.shape[1:], device=latent.device)()
            return latent * (1 - small_mask) + noise * small_mask
        if params.masked_content == "latent_nothing":
            return latent * (1 - small_mask)
        return latent

    def _prepare_inpaint(self, params, image, mask, width, height) -> _Overlay:
        """Mask blur/invert, "fill" content, and the "only masked" crop of the region to repaint."""
        if mask.size != image.size:
            raise ValueError(f"mask size {mask.size[0]}x{mask.size[1]} does not match the image size "
                             f"{image.size[0]}x{image.size[1]}")
        image = image.convert("RGB")
        mask = im.prepare_mask(mask, params.mask_blur, params.invert_mask)
        original = image
        if params.masked_content == "fill":
            image = im.fill_masked(image, mask)
        if not params.only_masked:
            image = im.resize_image(image, width, height)
            mask = mask.resize((width, height), im.LANCZOS)
            return _Overlay(image, mask, image if params.masked_content != "fill" else
                            im.resize_image(original, width, height), mask)
        box = im.masked_region(mask, params.only_masked_padding, width, height)
        work = im.resize_image(image.crop(box), width, height)
        return _Overlay(work, mask.crop(box).resize((width, height), im.LANCZOS), original, mask, box)

    # --- hires fix ----------------------------------------------------------------------------

    def _hires(self, params, seeds, subseeds, width, height, image, callback, refiner):
        """Generate at the base size (or take `image`), enlarge, then img2img at hires_strength."""
        if image is None:
            base = self.sample(params, seeds, subseeds, width, height, _Start(), 1.0, callback, None, refiner)
        else:
            base = self.encode_image(im.resize_image(image, width, height)).expand(len(seeds), -1, -1, -1)
        big_w, big_h = _round8(width * params.upscale_by), _round8(height * params.upscale_by)
        if params.upscaler == "latent":
            f = self.config.vae.downsample_factor
            start = F.interpolate(base, size=(big_h // f, big_w // f), mode="bilinear", align_corners=False)
        elif params.upscaler == "lanczos":
            pictures = [p.resize((big_w, big_h), im.LANCZOS) for p in self.decode(base)]
            start = torch.cat([self.encode_image(p) for p in pictures])
        else:
            raise ValueError(f"unknown upscaler {params.upscaler!r}; choose latent or lanczos")
        hires = dataclasses.replace(params, steps=params.hires_steps or params.steps)
        x = self.sample(hires, seeds, subseeds, big_w, big_h, _Start(start), params.hires_strength, callback,
                        None, refiner)
        return self.decode(x), x


def _size_conditioning(params: GenerationParams, width: int, height: int) -> dict[str, tuple[int, ...]]:
    """SDXL's size numbers in sgm's order: (height, width) and (top, left); unset sizes are the image's."""
    original_w, original_h = params.original_size or (width, height)
    target_w, target_h = params.target_size or (width, height)
    return {"original_size": (original_h, original_w), "crop_coords": tuple(params.crop_coords),
            "target_size": (target_h, target_w)}


def _outpaint(
    params: GenerationParams, image: Image.Image | None, mask: Image.Image | None
) -> tuple[Image.Image | None, Image.Image | None]:
    """The image on a canvas grown by `params.outpaint` and the mask of the new area (plus `mask`'s)."""
    if not any(params.outpaint):
        return image, mask
    if image is None:
        raise ValueError("outpainting extends an image: give one")
    left, right, top, bottom = params.outpaint
    if min(params.outpaint) < 0:
        raise ValueError(f"outpainting adds pixels: (left, right, top, bottom) {params.outpaint} is negative")
    canvas, new_area = im.extend_canvas(image.convert("RGB"), left=left, top=top, right=right, bottom=bottom,
                                        mask=mask)
    if canvas.width % 8 or canvas.height % 8:
        raise ValueError(f"outpainting {image.width}x{image.height} by (left, right, top, bottom) "
                         f"{params.outpaint} makes {canvas.width}x{canvas.height}: choose the pixels added "
                         "so that the new size is a multiple of 8")
    return canvas, new_area


def _round8(value: float) -> int:
    return max(8, int(round(value / 8)) * 8)


def default_tokenizers(components: Components, folder: Path | None = None) -> list[CLIPTokenizer]:
    """Each text encoder's tokenizer: the loaded model's, else from `folder`, its header or standard CLIP."""
    if folder is None and components.tokenizers:
        return components.tokenizers
    if folder is None and components.layout == "diffusers" and components.source is not None:
        folder = Path(components.source)
    return find_tokenizers(components.config.text_encoders, folder, components.metadata)


MODEL_FILE = "model.safetensors"  # the weights of a "model folder": one single file plus its tokenizer


def load(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         prediction: str | None = None, config_file: str | Path | None = None,
         lora_dirs: Iterable[str | Path] = (), embedding_dirs: Iterable[str | Path] = (),
         vae: str | Path | None = None) -> Pipeline:
    """A checkpoint file, diffusers folder or model folder (`model.safetensors` + tokenizer), ready to use.

    `dtype=None` keeps the stored precision on accelerators and computes in float32 on the CPU,
    where half-precision kernels are slow or missing (fp16 files are upcast once, at load).
    Prompts may name the LoRA files under `lora_dirs` (`<lora:file_stem:weight>`) and the embeddings
    under `embedding_dirs` (the file stem); an embedding made for another model is skipped with a warning.
    `vae` replaces the model's VAE with a standalone one (`checkpoints.vae_file`).
    """
    networks, embeddings = NetworkLibrary(lora_dirs), read_embeddings(embedding_dirs)  # fail before loading
    path = Path(path)
    if dtype is None and torch.device(device).type == "cpu":
        dtype = torch.float32
    folder = path if path.is_dir() and not (path / "model_index.json").exists() else None
    if folder is not None and not (folder / MODEL_FILE).is_file():
        raise CheckpointError(f"{folder}: neither a diffusers folder (model_index.json) nor a model folder "
                              f"({MODEL_FILE})")
    components = load_components(folder / MODEL_FILE if folder else path, prediction=prediction,
                                 config_file=config_file, dtype=dtype, device=device, vae=vae)
    pipe = Pipeline(components, default_tokenizers(components, folder))
    pipe.networks = networks
    for skipped in pipe.add_embeddings(embeddings):
        warnings.warn(skipped, stacklevel=2)
    return pipe
