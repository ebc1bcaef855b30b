"""A loaded model that generates: txt2img, img2img, inpainting and hires-fix upscaling.

Every mode is the same few steps: encode the prompts, make the starting latents, sample, decode.
They differ only in where sampling starts (noise, or a noised image latent: `inpaint`, `upscale`),
which denoiser wraps the model (`guidance`: prompt editing, masks, extras) and what happens to the
pixels afterwards. `run.Run` describes one batch; `loading.load` makes a Pipeline from files.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import torch
from PIL import Image

from openldm.checkpoints.layout import TEXT_ENCODER_NAMES
from openldm.checkpoints.load import Components
from openldm.config import ModelConfig
from openldm.diffusion.denoisers import DiscreteDenoiser
from openldm.diffusion.schedules import DiscreteSchedule, make_betas
from openldm.engines.base import Component, Engine, Runner, get_engine
from openldm.engines.calibration import decoder_inputs, unet_inputs
from openldm.models.controlnet import ControlNet
from openldm.models.domain import Domain, warn_outside
from openldm.models.taesd import TAESD
from openldm.models.tokenizer import CLIPTokenizer
from openldm.models.vae_tiling import AUTO_TILING, VAETiling
from openldm.networks import (
    AppliedNetworks,
    Embedding,
    LoadedNetwork,
    NetworkLibrary,
    apply_networks,
    network_refs,
)
from openldm.pipelines import images as im
from openldm.pipelines import sampling
from openldm.pipelines.conditioning import PromptEncoder, TextEncoder, with_embeddings
from openldm.pipelines.control import ControlUnit, control_infotext, make_control
from openldm.pipelines.decoding import check_taesd, decode_finite, decode_latents, encode_finite
from openldm.pipelines.guidance import Extra
from openldm.pipelines.inpaint import Overlay, inpaint_start, outpaint_canvas, prepare_inpaint
from openldm.pipelines.params import GenerationParams
from openldm.pipelines.prompt_cache import PromptCache
from openldm.pipelines.run import Interrupted, Result, Run, Start, StepCallback, batch_params, run_mode
from openldm.pipelines.upscale import hires_fix, upscaler_infotext
from openldm.pipelines.x4 import tiled_call

__all__ = ["Pipeline", "Result", "StepCallback"]


class Pipeline:
    def __init__(self, components: Components, tokenizers: Sequence[CLIPTokenizer] | None = None,
                 engine: str | Engine = "eager"):
        self.components = components
        self.config: ModelConfig = components.config
        self.vae = components.vae.eval()
        if tokenizers is None:
            from openldm.pipelines.loading import default_tokenizers  # loading builds Pipelines

            tokenizers = default_tokenizers(components)
        files = components.text_weights or [None] * len(components.text_encoders)
        self.text_encoders = [TextEncoder(t, m.eval(), weights=w)
                              for t, m, w in zip(tokenizers, components.text_encoders, files)]
        # False (a one-shot run): once a sampling's prompts are encoded, the encoders' weights go back to
        # their file, read again only if a later prompt needs them (SD1.5: 0.47 GB less while sampling)
        self.hold_text_encoders = True
        cfg = self.config
        betas = make_betas("scaled_linear", cfg.timesteps, cfg.linear_start, cfg.linear_end)
        self.schedule = DiscreteSchedule.from_betas(betas)
        self.denoiser = DiscreteDenoiser(self._unet, self.schedule, cfg.prediction)
        self.progress = False
        self.networks = NetworkLibrary()  # the LoRA files that prompts name: <lora:name:weight>
        self.controlnets: dict[str, ControlNet] = {}  # loaded ControlNets by resolved path
        self.domain: Domain | None = None  # a narrow model's words (domain.json): prompts outside them warn
        self.taesd: TAESD | None = None  # decodes instead of the VAE when set (`use_decoder`)
        self.prompt_cache = PromptCache()  # recent prompt encodings (`prompt_encoder`)
        self._text_merges: list[tuple[int, AppliedNetworks]] = []  # (serial, merge) reaching the encoders
        self._merge_serials = itertools.count(1)
        unet = components.unet.eval()  # called as a module, so hooks run; calibrated on pipeline inputs
        calibration = functools.partial(unet_inputs, self)
        self._unet_component = Component(unet, unet, "unet", calibration, components.unet_weights)
        self.set_engine(engine)

    def set_engine(self, engine: str | Engine) -> None:
        """Run the UNet and VAE decoder through `engine` (see `openldm.engines`); eager is the reference."""
        engine = get_engine(engine)
        self.engine = engine.name
        self.unet_runner = Runner(engine, self._unet_component)
        decoder = self.taesd or self.vae
        if self.taesd is None:  # the file's VAE: its key unhashed; quantized on this pipeline's latents
            weights, calibration = self.components.vae_weights, functools.partial(decoder_inputs, self)
        else:
            weights, calibration = None, None
        component = Component(decoder, decoder.decode, "vae_decoder", calibration, weights)
        self.decoder_runner = Runner(engine, component)

    def use_decoder(self, taesd: TAESD | None) -> None:
        """Decode with a TAESD (fast, approximate) instead of the VAE; None returns to the VAE."""
        if taesd is not None:
            check_taesd(taesd, self.config.latent_format.channels)
            taesd = taesd.to(self.device, self.vae_dtype)
        self.taesd = taesd
        self.set_engine(self.unet_runner.engine)

    @property
    def unet(self) -> torch.nn.Module:
        """The torch UNet, its weights read back from the file if an engine had dropped them."""
        return self._unet_component.ready()

    @property
    def device(self) -> torch.device:
        return self._unet_component.device

    @property
    def dtype(self) -> torch.dtype:
        weights = self._unet_component.weights
        return weights.dtype if weights is not None else next(self.components.unet.parameters()).dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        """The UNet's, unless a half-precision VAE overflowed and now runs in float32."""
        return next(self.vae.parameters()).dtype

    @property
    def name(self) -> str:
        """What PNGs call this model (`loading.model_name`)."""
        from openldm.pipelines.loading import model_name  # loading builds Pipelines

        return model_name(self.components)

    def _unet(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None,
              concat: torch.Tensor | None = None, control: Any = None,
              control_gate: torch.Tensor | None = None, tiles: tuple[int, int] | None = None) -> torch.Tensor:
        """The UNet as the denoiser sees it; inpainting models also get the mask and masked image.

        `control` and `control_gate` come from `control.Control`: ControlNets see the plain latent.
        `tiles` (tile, overlap in latent pixels; the x4 upscaler's) runs it on blended tiles."""
        if tiles is not None:
            model = partial(self._unet, t=t, context=context, y=y, control=control, control_gate=control_gate)
            return tiled_call(model, x, concat, tiles)
        t, context, y = t.to(x.dtype), context.to(x.dtype), None if y is None else y.to(x.dtype)
        residuals = None if control is None else control.residuals(x, t, context, y, control_gate)
        if concat is not None:
            x = torch.cat([x, concat.to(x)], dim=1)
        if residuals is not None:  # ControlNet residuals: the eager UNet (engines trace the plain call)
            return self.unet(x, t, context, y, control=residuals)
        return self.unet_runner(x, t, context, y)

    # --- extra networks and embeddings -----------------------------------------------------------

    def merge_networks(self, networks: Iterable[tuple[LoadedNetwork, float]]) -> AppliedNetworks:
        """Merge (network, weight) pairs into the UNet and text encoders; the result's `remove` undoes it."""
        encoders = {name: encoder.ready() for name, encoder in zip(TEXT_ENCODER_NAMES, self.text_encoders)}
        applied = apply_networks({"unet": self.unet, **encoders}, networks, self.config)
        if any(component != "unet" for report in applied.reports for component in report.matched):
            live = [(serial, merge) for serial, merge in self._text_merges if merge.active]
            self._text_merges = [*live, (next(self._merge_serials), applied)]
        return applied

    @property
    def text_weights(self) -> tuple[int, ...]:
        """What the text encoders' weights are now: the serial of each merge into them not yet removed."""
        return tuple(serial for serial, merge in self._text_merges if merge.active)

    def prompt_encoder(self, clip_skip: int | None = None) -> PromptEncoder:
        """A run's prompt encoder: this model's encoders, remembering recent prompts (`prompt_cache`)."""
        return PromptEncoder(self.text_encoders, clip_skip, self.prompt_cache, self.text_weights)

    def prompts_encoded(self) -> None:
        """A sampling's prompts are encoded: unless held, drop the encoders' weights to their file.
        Weights changed in memory (a LoRA merged into them) are never dropped (`FileWeights.release`)."""
        if not self.hold_text_encoders:
            for encoder in self.text_encoders:
                if encoder.weights is not None:
                    encoder.weights.release()

    def prompt_networks(self, params: GenerationParams) -> AppliedNetworks:
        """Merge the networks that the prompt and negative prompt name, found by name in `networks`."""
        refs = network_refs(params.prompt, params.negative)
        return self.merge_networks(self.networks.load(refs)) if refs else AppliedNetworks([])

    def add_embeddings(self, embeddings: Iterable[Embedding]) -> list[str]:
        """Make embeddings usable by name in prompts; returns why each made for another model was skipped."""
        self.text_encoders, skipped = with_embeddings(self.text_encoders, embeddings, self.config)
        return skipped

    # --- public modes: `settings` are `GenerationParams` fields; `callback` and `refiner` as in `generate`

    def txt2img(self, prompt: str, *, callback: StepCallback | None = None, refiner: Pipeline | None = None,
                **settings: Any) -> list[Image.Image]:
        return self._images(GenerationParams(prompt, **settings), callback=callback, refiner=refiner)

    def img2img(self, image: Image.Image, prompt: str, *, callback: StepCallback | None = None,
                refiner: Pipeline | None = None, **settings: Any) -> list[Image.Image]:
        """Redraw `image`; `outpaint=(left, right, top, bottom)` first extends it and paints the new area."""
        params = GenerationParams(prompt, **settings)
        return self._images(params, image=image, callback=callback, refiner=refiner)

    def inpaint(self, image: Image.Image, mask: Image.Image, prompt: str, *,
                callback: StepCallback | None = None, refiner: Pipeline | None = None,
                **settings: Any) -> list[Image.Image]:
        params = GenerationParams(prompt, **settings)
        return self._images(params, image=image, mask=mask, callback=callback, refiner=refiner)

    def upscale(self, prompt: str, image: Image.Image | None = None, *, callback: StepCallback | None = None,
                refiner: Pipeline | None = None, **settings: Any) -> list[Image.Image]:
        """Hires fix: generate (or take `image`), enlarge, then refine with img2img."""
        params = GenerationParams(prompt, **settings)
        return self._images(params, image=image, mode="upscale", callback=callback, refiner=refiner)

    def _images(self, params: GenerationParams, **inputs: Any) -> list[Image.Image]:
        return [r.image for r in self.generate(params, **inputs)]

    # --- the shared path: encode, prepare, sample, decode ----------------------------------------

    def generate(
        self, params: GenerationParams, *, image: Image.Image | None = None, mask: Image.Image | None = None,
        mode: str | None = None, hires: bool = False, callback: StepCallback | None = None,
        latents: torch.Tensor | None = None, refiner: Pipeline | None = None, extras: Sequence[Extra] = (),
        controls: Sequence[ControlUnit] = (), upscaler: Pipeline | None = None,
    ) -> list[Result]:
        """All images of a run (batch_count batches of batch_size), each with its exact seed and size.

        `mode` (one of `run.MODES`; `hires=True` means "upscale") defaults to what the inputs make.
        `callback(step, total, denoised)` is called after every sampling step with the step number
        (1-based, counted through a refiner's hand-off and the hires pass), the steps of that pass and
        the current clean estimate (latents, batch first) for previews. A callback that raises
        `Interrupted` stops the run before the next model call: the batches already finished are returned.
        `extras` add conditioning to every model call of every mode (see `guidance.Extra`); `controls`
        are ControlNet units (`control.ControlUnit`), loaded once per file and added as one extra.
        `upscaler` is the x4-upscaler model the hires fix's "x4" upscaler runs. `refiner` (an SDXL
        refiner) finishes each sampling from `refiner_switch` on; this pipeline's VAE encodes and decodes.
        """
        extras = (*extras, make_control(self, controls, self.controlnets)) if controls else tuple(extras)
        params = self._settle(params, refiner)
        image, mask = outpaint_canvas(params, image, mask)
        mode = run_mode(params, image, mask, "upscale" if hires else mode)
        width, height = self._size(params, image)
        results: list[Result] = []
        with self.prompt_networks(params) as applied:  # merged for this run; weights restored bit for bit
            for batch in batch_params(params):
                run = Run.of_batch(batch, width, height, mode, callback=callback, refiner=refiner,
                                   latents=latents, extras=extras, upscaler=upscaler)
                try:
                    pictures, x = self._batch(run, image, mask)
                except Interrupted:
                    break
                results += [Result(picture, run.image_params(i), mode, x[i : i + 1], applied.reports,
                                   control_infotext(controls), upscaler_infotext(run))
                            for i, picture in enumerate(pictures)]
        return results

    def _settle(self, params: GenerationParams, refiner: Pipeline | None) -> GenerationParams:
        """The run's own settings: a concrete seed, the refiner's name and the model's CFG scale if unset."""
        if refiner is not None:
            sampling.check_refiner(self, refiner)
        warn_outside(self.domain, [params.prompt])  # once per caller's line and words (Python's filter)
        return dataclasses.replace(params.with_seed(), refiner_model=refiner and refiner.name,
                                   cfg=self.config.guidance if params.cfg is None else params.cfg)

    def _batch(self, run: Run, image: Image.Image | None,
               mask: Image.Image | None) -> tuple[list[Image.Image], torch.Tensor]:
        """One batch's pictures and final latents: the mode prepares the start, then sample and decode."""
        if run.mode == "upscale":
            x = hires_fix(self, run, image)
            return self.decode(x, run.params.tiling()), x
        start, overlay = self._prepare(run, image, mask)
        x = self.sample(run, start)
        pictures = self.decode(x, run.params.tiling())
        if overlay is not None and run.params.overlay:
            pictures = [overlay.apply(p) for p in pictures]
        return pictures, x

    def _prepare(self, run: Run, image: Image.Image | None,
                 mask: Image.Image | None) -> tuple[Start, Overlay | None]:
        """Where sampling starts for txt2img (noise), img2img (the image) and in/outpainting."""
        params = run.params
        if run.mode in ("inpaint", "outpaint"):
            overlay = prepare_inpaint(params, image, mask, run.width, run.height)
            return inpaint_start(self, params, overlay, run.seeds), overlay
        if run.mode == "img2img":
            image = im.resize_image(image, run.width, run.height, params.resize_mode)
            return Start(self.encode_image(image, params.tiling()), params.strength), None
        return Start(), None

    def _size(self, params: GenerationParams, image: Image.Image | None) -> tuple[int, int]:
        native = self.config.image_size
        width = params.width or (image.width if image is not None else native)
        height = params.height or (image.height if image is not None else native)
        im.check_size(width, height, 8)
        return width, height

    def encode_image(self, image: Image.Image | torch.Tensor,
                     tiling: VAETiling = AUTO_TILING) -> torch.Tensor:
        """A picture (or pixels in [-1, 1], batch first) -> model-space latent (the posterior's mean)."""
        x = im.to_tensor([image]) if isinstance(image, Image.Image) else image
        return self.config.latent_format.to_model(encode_finite(self.vae, x.to(self.device), tiling))

    def txt2img_latents(self, params: GenerationParams) -> torch.Tensor:
        """One txt2img batch's final latents, settled as `generate` settles them, and not decoded."""
        params = self._settle(params, None)
        width, height = self._size(params, None)
        return self.sample(Run.of_batch(params, width, height, "txt2img"))

    def sample(self, run: Run, start: Start | None = None) -> torch.Tensor:
        """One batch's final latents from `start` (None: pure noise), a refiner finishing (`sampling`)."""
        return sampling.sample(self, run, start)

    def decode(self, x: torch.Tensor, tiling: VAETiling = AUTO_TILING) -> list[Image.Image]:
        """Model-space latents -> pictures under `tiling`; NaN or inf is never a picture (`decoding`)."""
        if self.taesd is not None:  # TAESD takes model-space latents, and no tiles
            return im.to_pil(decode_finite(self.taesd, x, self.decoder_runner))
        z = self.config.latent_format.from_model(x)
        return im.to_pil(decode_latents(self.vae, z, tiling, self.decoder_runner))

