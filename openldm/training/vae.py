"""VAE training: reconstruction (+ LPIPS) + KL (+ PatchGAN), from scratch or fine-tuning (optionally
decoder only).

Losses follow ldm's convention: per-sample sums averaged over the batch, so a `kl_weight` taken
from an ldm config means the same here. ldm adds `perceptual_weight * LPIPS` to every pixel's error
before that sum, so the perceptual term counts c*h*w times per sample, here as there (`lpips.py`).
With `disc_weight > 0` a discriminator joins after `disc_start` steps, trained by its own optimizer
on its own loss (see `discriminator.py`). The result is written as a standalone VAE file in the
original key layout (`encoder.*`, `decoder.*`, ...), the form SD VAE files are shared in.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from openldm.atomic import write_bytes_atomic
from openldm.checkpoints.io import CheckpointError, read_state_dict, write_safetensors_atomic
from openldm.checkpoints.layout import VAE_PREFIX
from openldm.config import get_preset
from openldm.models.vae import AutoencoderKL
from openldm.training.config import TrainConfig
from openldm.training.data import Batch, BatchStream, make_source, transform
from openldm.training.discriminator import NLayerDiscriminator, adaptive_weight, generator_loss, hinge_d_loss
from openldm.training.loop import MAIN, Auxiliary, Losses
from openldm.training.lpips import load_lpips
from openldm.training.optim import make_optimizer

VAE_FILE = "vae.safetensors"
STATS_FILE = "latent_stats.json"
STATS_IMAGES = 2048


def read_vae_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """VAE weights from a standalone VAE file or from a whole single-file checkpoint."""
    tensors, _ = read_state_dict(path)
    if any(k.startswith(VAE_PREFIX) for k in tensors):
        return {k[len(VAE_PREFIX):]: v for k, v in tensors.items() if k.startswith(VAE_PREFIX)}
    if not any(k.startswith("encoder.") or k.startswith("decoder.") for k in tensors):
        raise CheckpointError(f"{path}: holds no VAE weights (no encoder.* / decoder.* / {VAE_PREFIX}* keys)")
    return tensors


def load_vae_into(vae: AutoencoderKL, path: str | Path) -> None:
    state = read_vae_weights(path)
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: VAE weights do not fit the preset's VAE "
                              f"(missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})")


def loss_unit(config: TrainConfig) -> str:
    """What the logged loss counts: ldm's per-image sum, not the per-value mean docs usually quote."""
    side = config.data.crop_size or config.data.image_size
    values = get_preset(config.vae.preset).vae.out_ch * side * side
    return (f"per image: the reconstruction error summed over its {values:,} values, ldm's convention, plus "
            "the weighted terms; rec_per_pixel in metrics.jsonl is the mean per value")


class VAETask:
    def __init__(self, config: TrainConfig, rank: int = 0, world: int = 1):
        self.config = config
        self.options = config.vae
        self.model = AutoencoderKL(get_preset(self.options.preset).vae).to(config.run.device)
        if self.options.init:
            load_vae_into(self.model, self.options.init)
        if self.options.decoder_only:
            for module in (self.model.encoder, self.model.quant_conv):
                module.requires_grad_(False)
        if config.run.gradient_checkpointing:
            self.model.set_gradient_checkpointing(True)
        source = make_source(config.data)
        self.stream = BatchStream(source, config.data, config.run.seed, config.run.batch_size, rank, world)
        self.discriminator = None
        if self.options.disc_weight > 0:
            self.discriminator = NLayerDiscriminator(self.model.cfg.out_ch, self.options.disc_channels,
                                                     self.options.disc_layers).to(config.run.device)
        self._vae, self._disc = self.model, self.discriminator  # what forward passes run through
        self.lpips = None  # frozen, never checkpointed: it comes from the config's files
        if self.options.perceptual_weight > 0:
            self.lpips = load_lpips(self.options.lpips_weights).to(config.run.device)

    def trainable(self) -> dict[str, nn.Module]:
        return {"vae": self.model}

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def auxiliary(self) -> dict[str, Auxiliary]:
        """The discriminator's optimizer: Adam with taming's betas (0.5, 0.9), no weight decay."""
        if self.discriminator is None:
            return {}
        lr = self.options.disc_lr or self.config.optim.lr
        optim = replace(self.config.optim, lr=lr, betas=(0.5, 0.9), weight_decay=0.0)
        groups = [{"params": list(self.discriminator.parameters())}]
        optimizer = make_optimizer(groups, optim, torch.device(self.config.run.device))
        return {"disc": Auxiliary(self.discriminator, optimizer)}

    def use_wrapped(self, modules: dict[str, nn.Module]) -> None:
        self._vae, self._disc = modules["vae"], modules.get("disc")

    def loss(self, batch: Batch, generator: torch.Generator, step: int = 0
             ) -> tuple[Losses, dict[str, float]]:
        x = batch.images.to(self.config.run.device)
        reconstruction, posterior = self._vae(x, sample=self.options.sample_posterior, generator=generator)
        error = (reconstruction.float() - x).abs() if self.options.reconstruction == "l1" else \
            (reconstruction.float() - x).pow(2)
        rec = error.flatten(1).sum(1).mean()
        kl = posterior.kl().float().mean()
        pixels = x[0].numel()
        parts = {"rec_per_pixel": rec.item() / pixels, "kl": kl.item()}
        if self.lpips is not None:
            distance = self.lpips(reconstruction.float(), x).mean()
            rec = rec + self.options.perceptual_weight * pixels * distance
            parts["lpips"] = distance.item()
        loss = rec + self.options.kl_weight * kl
        if self.discriminator is None or step < self.options.disc_start:
            return loss, parts
        return self._adversarial(x, reconstruction, rec, loss, parts)

    def _adversarial(self, x: torch.Tensor, reconstruction: torch.Tensor, rec: torch.Tensor,
                     loss: torch.Tensor, parts: dict[str, float]) -> tuple[Losses, dict[str, float]]:
        """Add the adaptively weighted generator term; the discriminator's hinge loss goes under "disc".

        The generator term runs the bare discriminator: its gradient is meant for the VAE alone (the
        loop keeps each loss to its own optimizer's parameters), so DDP must not wait for it.
        """
        g_loss = generator_loss(self.discriminator(reconstruction).float())
        weight = adaptive_weight(rec, g_loss, self.model.decoder.conv_out.weight, self.options.disc_weight)
        real, fake = self._disc(torch.cat([x, reconstruction.detach()])).float().chunk(2)
        d_loss = hinge_d_loss(real, fake)
        parts |= {"g_loss": g_loss.item(), "gan_weight": weight.item(), "disc_loss": d_loss.item()}
        return {MAIN: loss + weight * g_loss, "disc": d_loss}, parts

    def sample_images(self, step: int) -> list:
        return []  # sample grids are for diffusion models

    def export(self, output_dir: Path) -> list[Path]:
        """The VAE file, and the latent statistics a model preset needs (`LatentFormat.scale_factor`)."""
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
        metadata = {"openldm.kind": "vae"}
        written = [write_safetensors_atomic(Path(output_dir) / VAE_FILE, state, metadata=metadata)]
        count = min(STATS_IMAGES, len(self.stream.source))
        with tqdm(total=count, desc="latent statistics", unit="image", dynamic_ncols=True) as bar:
            images, mean, std = latent_statistics(self.model, self._full_images(count), bar.update)
        stats = {"images": images, "mean": mean, "std": std, "scale_factor": 1 / std}
        stats_json = json.dumps(stats, indent=2).encode()
        written.append(write_bytes_atomic(Path(output_dir) / STATS_FILE, stats_json))
        print(f"latents of {images} images: mean {mean:.4f}, std {std:.4f} -> "
              f"scale_factor {1 / std:.5f}")
        return written

    def _full_images(self, count: int, batch_size: int = 32) -> Iterator[torch.Tensor]:
        """Batches of the first `count` training images, whole (center, no crop or flip), as the LDM will
        see them; made as they are encoded, so a progress bar over the encoding covers both."""
        data = replace(self.config.data, crop_size=None, random_crop=False, flip=False)
        source = self.stream.source
        for start in range(0, count, batch_size):
            examples = (source[i] for i in range(start, min(start + batch_size, count)))
            batch = [transform(e.image, data, random.Random(0)) for e in examples if e is not None]
            if batch:
                yield torch.stack(batch).to(self.config.run.device)


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, batches: Iterable[torch.Tensor],
                      progress: Callable[[int], object] = lambda n: None) -> tuple[int, float, float]:
    """(images, mean, std) of the posterior means over `batches`: SD's scale factor is 1 / std.

    `progress(n)` is called after each batch of n images."""
    means = []
    for batch in batches:
        means.append(vae.encode(batch).mode().float())
        progress(len(batch))
    means = torch.cat(means)
    return len(means), means.mean().item(), means.std().item()
