"""Latent diffusion training: the UNet (and optionally the text encoder) on VAE latents.

The loss is the diffusion core's `DiscreteDenoiser.loss` (eps or v targets, the SD discrete
schedule), with min-SNR-gamma weighting, offset noise and input perturbation as options. The VAE
stays frozen; with `cache_latents` every training image is encoded once (posterior mean and std)
and each step draws a fresh latent sample from the cached posterior. The result is one single-file
checkpoint in the original layout, with the tokenizer beside it when the vocabulary is not the
standard one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from openldm.atomic import write_bytes_atomic
from openldm.checkpoints.io import read_state_dict, write_safetensors_atomic
from openldm.checkpoints.load import Components, build_component, load_components
from openldm.checkpoints.save import save_diffusers, save_single_file
from openldm.config import ModelConfig, get_preset
from openldm.diffusion.denoisers import DiscreteDenoiser, PredictionType, min_snr_weights
from openldm.diffusion.samplers import append_dims
from openldm.diffusion.schedules import DiscreteSchedule
from openldm.models.domain import DOMAIN_FILE, Domain
from openldm.models.tokenizer import CLIPTokenizer
from openldm.pipelines.pipeline import Pipeline
from openldm.training.config import TrainConfig
from openldm.training.data import Batch, BatchStream, DataError, make_source, sample_rng, transform
from openldm.training.loop import Auxiliary, TrainingError
from openldm.training.vae import load_vae_into
from openldm.training.vocab import build_tokenizer, carry_embedding, extend_tokenizer

MODEL_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
LATENT_CACHE = "latents.safetensors"


def _fresh_components(config: ModelConfig, device: str) -> Components:
    modules = {name: build_component(name, config, device) for name in ("unet", "vae", "text_encoder")}
    return Components(config=config, unet=modules["unet"], vae=modules["vae"],
                      text_encoders=[modules["text_encoder"]])


def _captions(source) -> list[str]:
    if hasattr(source, "dataset"):  # shapes: captions come from the scene, without drawing it
        return [source.caption(i, sample_rng(0, i, "vocabulary")) for i in range(len(source))]
    return list(source.captions)


def perturb(x0: torch.Tensor, noise: torch.Tensor, extra: torch.Tensor, sigma: torch.Tensor,
            prediction: PredictionType) -> tuple[torch.Tensor, torch.Tensor]:
    """Input perturbation (Ning et al. 2023) as an (x0, noise) pair for the unchanged denoiser loss.

    The network is to see x0 + sigma (noise + extra) but learn the target of (x0, noise). Both the
    input and every target (eps: noise; x0; v: alpha (noise - sigma x0)) are linear in (x0, noise),
    so one shifted pair gives exactly that: eps moves x0 by sigma extra, x0 moves the noise by extra,
    and v moves both in the ratio that keeps noise - sigma x0 fixed.
    """
    s = append_dims(sigma, x0.ndim).to(x0.dtype)
    if prediction == "eps":
        return x0 + s * extra, noise
    if prediction == "x0":
        return x0, noise + extra
    if prediction == "v":
        shift = s * extra / (1 + s * s)
        return x0 + shift, noise + s * shift
    raise ValueError(f"unknown prediction type {prediction!r}; choose eps, v or x0")


def _vae_digest(vae: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(vae.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class LDMTask:
    def __init__(self, config: TrainConfig, rank: int = 0, world: int = 1):
        self.config, self.options = config, config.ldm
        device = config.run.device
        if self.options.init:
            # fp32 master weights whatever the file stores (run.precision sets the compute dtype)
            self.components = load_components(self.options.init, device=device, dtype=torch.float32)
        else:
            self.components = _fresh_components(get_preset(self.options.preset), device)
        if self.options.vae:
            load_vae_into(self.components.vae, self.options.vae)
        self.model_config = self.components.config
        if len(self.components.text_encoders) != 1:
            raise DataError("ldm training supports single-text-encoder families (SD1, SD2) for now")
        self.source = make_source(config.data)
        self.tokenizer, self.own_vocab = self._tokenizer()
        self.unet, self.vae = self.components.unet, self.components.vae
        self.text_encoder = self.components.text_encoders[0]
        self._text_encoder = self.text_encoder  # what forward passes run through (DDP-wrapped if trained)
        self.vae.requires_grad_(False).eval()
        self.text_encoder.requires_grad_(self.options.train_text_encoder)
        if config.run.gradient_checkpointing:
            self.unet.set_gradient_checkpointing(True)
        self.denoiser = DiscreteDenoiser(self.unet, self._schedule(), self.model_config.prediction)
        self.latents = self._cache_latents() if config.data.cache_latents else None
        self.stream = BatchStream(self.source, config.data, config.run.seed, config.run.batch_size, rank,
                                  world, load_images=self.latents is None)

    def _extend_vocabulary(self, tokenizer: CLIPTokenizer) -> CLIPTokenizer:
        """New words of the captions (and of the source's vocabulary) become one token each: the text
        encoder's embedding grows to fit, and the model's config with it (it is then no preset)."""
        words = self.source.words() if hasattr(self.source, "words") else ()
        extended = extend_tokenizer(tokenizer, [*_captions(self.source), " ".join(sorted(words))])
        if extended is tokenizer:
            return tokenizer
        encoder = self.components.text_encoders[0]
        encoder.set_vocabulary(carry_embedding(encoder.embedding_weight(), tokenizer, extended),
                               extended.pad_id)
        config = replace(self.model_config, text_encoders=(encoder.cfg,))
        self.components = replace(self.components, config=config)
        self.model_config = config
        print(f"vocabulary extended: {len(tokenizer.vocab)} -> {len(extended.vocab)} tokens")
        return extended

    def _schedule(self) -> DiscreteSchedule:
        return DiscreteSchedule.stable_diffusion()

    def _tokenizer(self) -> tuple[CLIPTokenizer, bool]:
        encoder = self.model_config.text_encoders[0]
        choice = self.options.tokenizer
        if choice == "captions":
            tokenizer = build_tokenizer(_captions(self.source), max_length=encoder.max_length)
            own = True
        elif choice:
            tokenizer, own = CLIPTokenizer.for_config(encoder, choice), True
        else:
            tokenizer, own = CLIPTokenizer.for_config(encoder), False
        if self.options.extend_vocabulary:
            tokenizer, own = self._extend_vocabulary(tokenizer), True
            encoder = self.model_config.text_encoders[0]
        if len(tokenizer.vocab) != encoder.vocab_size:
            raise DataError(f"the tokenizer has {len(tokenizer.vocab)} tokens but the text encoder's "
                            f"embedding has {encoder.vocab_size}; use the vocabulary the preset was made for")
        return tokenizer, own

    # --- latents -------------------------------------------------------------------------------
    def _cache_key(self) -> str:
        data = self.config.data
        facts = {"vae": _vae_digest(self.vae), "source": self.source.describe(), "size": data.image_size,
                 "crop": data.crop_size, "random_crop": data.random_crop, "flip": data.flip}
        return json.dumps(facts, sort_keys=True)

    @torch.no_grad()
    def _cache_latents(self) -> torch.Tensor:
        """(N, 2C, h, w) posterior moments of every image, from disk when the cache key matches."""
        data = self.config.data
        if data.flip or data.random_crop:
            raise DataError("cache_latents stores one latent per image: it cannot be combined with flip or "
                            "random_crop")
        path = Path(self.config.run.output_dir) / LATENT_CACHE
        key = self._cache_key()
        if path.is_file():
            tensors, metadata = read_state_dict(path)
            if metadata.get("openldm.cache_key") == key:
                return tensors["moments"]
        moments = []
        chunk = 32
        indices = range(len(self.source))
        for start in tqdm(range(0, len(indices), chunk), desc="caching latents", unit="batch"):
            images = []
            for index in indices[start:start + chunk]:
                example = self.source[index]
                if example is None:
                    raise DataError(f"{self.source.describe()}: image {index} is unreadable")
                images.append(transform(example.image, data, sample_rng(0, index, "cache")))
            moments.append(self.vae._moments(torch.stack(images).to(self.config.run.device)).cpu())
        result = torch.cat(moments).contiguous()
        write_safetensors_atomic(path, {"moments": result}, metadata={"openldm.cache_key": key})
        return result

    def _x0(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        device = self.config.run.device
        if self.latents is not None:
            mean, logvar = self.latents[batch.indices].float().chunk(2, dim=1)
            noise = torch.randn(mean.shape, generator=generator)
            z = mean + (0.5 * logvar.clamp(-30, 20)).exp() * noise
        else:
            with torch.no_grad():
                z = self.vae.encode(batch.images.to(device)).sample(generator)
        return self.model_config.latent_format.to_model(z.to(device))

    # --- the loss ------------------------------------------------------------------------------
    def trainable(self) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"unet": self.unet}
        if self.options.train_text_encoder:
            modules["text_encoder"] = self.text_encoder
        return modules

    def param_groups(self) -> list[dict]:
        groups = [{"params": list(self.unet.parameters())}]
        if self.options.train_text_encoder:
            lr = self.options.text_encoder_lr or self.config.optim.lr
            groups.append({"params": list(self.text_encoder.parameters()), "lr": lr})
        return groups

    def auxiliary(self) -> dict[str, Auxiliary]:
        return {}

    def use_wrapped(self, modules: dict[str, nn.Module]) -> None:
        self.denoiser.model = modules["unet"]
        self._text_encoder = modules.get("text_encoder", self.text_encoder)

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(captions).to(self.config.run.device)
        hidden, _ = self._text_encoder(ids)
        return hidden

    def loss(self, batch: Batch, generator: torch.Generator, step: int = 0
             ) -> tuple[torch.Tensor, dict[str, float]]:
        device = self.config.run.device
        x0 = self._x0(batch, generator)
        b = x0.shape[0]
        t = torch.randint(0, len(self.denoiser.schedule.alphas_cumprod), (b,), generator=generator)
        sigma = self.denoiser.schedule.sigmas[t].float().to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        if self.options.offset_noise:
            offset = torch.randn(b, x0.shape[1], 1, 1, generator=generator).to(device)
            noise = noise + self.options.offset_noise * offset
        if self.options.input_perturbation:
            extra = torch.randn(x0.shape, generator=generator).to(device) * self.options.input_perturbation
            x0, noise = perturb(x0, noise, extra, sigma, self.model_config.prediction)
        weighting = None
        if self.options.min_snr_gamma:
            weighting = min_snr_weights(sigma, self.options.min_snr_gamma, self.model_config.prediction)
        context = self.encode_text(batch.captions)
        loss = self.denoiser.loss(x0, noise, sigma, weighting=weighting, context=context)
        return loss, {}

    # --- samples -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_images(self, step: int, count: int = 4) -> list[Image.Image]:
        """The first `count` captions of the data, drawn by the generation pipeline with the current
        weights (not the EMA's)."""
        run, size = self.config.run, self.config.data.image_size
        modules = [self.unet, self.vae, self.text_encoder]
        modes = [m.training for m in modules]
        pipeline = self.sampling_pipeline()  # puts the modules in eval mode
        try:
            prompts = self.sample_prompts(count)
            return [pipeline.txt2img(prompt, steps=run.sample_steps, seed=run.seed + i, width=size,
                                     height=size)[0] for i, prompt in enumerate(prompts)]
        finally:
            for module, mode in zip(modules, modes):
                module.train(mode)

    def sampling_pipeline(self) -> Pipeline:
        return Pipeline(self.components, [self.tokenizer])

    def sample_prompts(self, count: int) -> list[str]:
        return [self.stream.source_caption(i) for i in range(min(count, len(self.source)))]

    # --- export --------------------------------------------------------------------------------
    def export(self, output_dir: Path) -> list[Path]:
        output_dir = Path(output_dir)
        components = replace(self.components, metadata={"openldm.trained_by": "openldm train ldm"},
                             tokenizers=[self.tokenizer])  # an own vocabulary rides in the file's header too
        written = [save_single_file(components, output_dir / MODEL_FILE)]
        if self.own_vocab:
            written.append(self.tokenizer.save(output_dir / TOKENIZER_DIR))
        if self.options.domain:
            domain = Domain(self.options.domain, self.source.words())
            written.append(write_bytes_atomic(output_dir / DOMAIN_FILE, domain.to_json().encode()))
        if self.options.export_diffusers:
            written.append(save_diffusers(components, output_dir / "diffusers"))
        return written


class FrozenModelTask(LDMTask):
    """The LDM loss with the UNet and text encoder frozen: subclasses add the few weights that learn.

    One process only: what they add runs where DDP cannot follow it (hooks, an extended embedding).
    """

    what = "adapter"  # named in the error for a multi-process launch

    def __init__(self, config: TrainConfig, rank: int = 0, world: int = 1):
        if world > 1:
            raise TrainingError(f"{self.what} training runs in one process; launch it without torchrun")
        super().__init__(config, rank, world)
        self.unet.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
