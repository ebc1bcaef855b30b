"""Training configs: YAML or TOML files validated into frozen dataclasses.

A config file has the sections `data`, `optim` and `run`, plus `vae` or `ldm` for the model being
trained. Every key is checked: a misspelt key is an error that names it and lists the valid ones,
never a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from openldm.training import KINDS


class ConfigError(ValueError):
    """A training config that cannot be used as written."""


@dataclass(frozen=True)
class DataConfig:
    source: Literal["shapes", "folder"] = "shapes"
    path: str | None = None  # image folder (source: folder)
    length: int = 10_000  # number of shapes images (source: shapes)
    seed: int = 0  # shapes dataset seed
    image_size: int = 128  # images are resized (shorter side) and cropped to this
    crop_size: int | None = None  # random crops of this size after resizing (VAE training)
    random_crop: bool = False  # else center crop
    flip: bool = False  # random horizontal flip (never for captions that say left or right)
    two_shape_fraction: float = 0.0
    caption_dropout: float = 0.0  # replace the caption by "" this often, for classifier-free guidance
    captions: Literal["template", "varied"] = "template"  # shapes: one fixed form, or the phrasing grammar
    buckets: bool = False  # aspect-ratio bucketing (folder source): one size per batch, near its images'
    bucket_step: int = 64  # bucket sides are multiples of this (64 for SD; 8 at least)
    cache_latents: bool = False  # ldm: encode once with the VAE, reuse every epoch
    num_workers: int = 0


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "linear", "cosine", "cosine_restarts", "lambda_linear"] = "constant"
    warmup_steps: int = 0
    restarts: int = 1  # cycles of cosine_restarts
    min_lr_ratio: float = 0.0  # cosine schedules end at lr * min_lr_ratio
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    ema_decay: float | None = None  # EMA of the weights, with warm-up (None: no EMA)
    ema_warmup: bool = True


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/train"
    steps: int = 1000
    batch_size: int = 8
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = "cpu"
    checkpoint_every: int = 500
    keep_last: int = 2
    log_every: int = 50
    sample_every: int | None = None  # write a grid of samples to `samples/` every N steps
    sample_steps: int = 20  # sampler steps of those samples
    gradient_checkpointing: bool = False
    threads: int | None = None  # torch CPU threads (None: torch's default)
    # bit-identical reruns (MKL's reproducible mode, deterministic kernels, fixed threads; see
    # `determinism.py`); None: on for the CPU, off on accelerators
    deterministic: bool | None = None
    distributed: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate (ddp) or shard (fsdp) the model


@dataclass(frozen=True)
class VAELossConfig:
    preset: str = "tiny-sd1"  # the architecture (its `vae` part)
    init: str | None = None  # fine-tune from this VAE or full checkpoint
    reconstruction: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1e-6
    disc_weight: float = 0.0  # PatchGAN hinge loss, 0 disables it
    disc_start: int = 0  # steps before the discriminator joins
    disc_lr: float | None = None  # defaults to optim.lr
    disc_channels: int = 64  # PatchGAN width (taming: 64)
    disc_layers: int = 3  # PatchGAN stride-2 layers (taming: 3); images need a side of 3 * 2**layers
    sample_posterior: bool = True  # decode a posterior sample (ldm); False: its mean, a noise-free loss
    decoder_only: bool = False  # fine-tune the decoder, keep the encoder (and latents) fixed
    perceptual_weight: float = 0.0  # LPIPS term (ldm: 1.0), 0 disables it; needs lpips_weights
    # LPIPS v0.1 weights, never downloaded: one file holding torchvision's VGG16 `features.*` and the
    # heads `lin0..lin4`, or a list of two files (VGG16, LPIPS heads); .safetensors or .pth
    lpips_weights: tuple[str, str] | str | None = None


@dataclass(frozen=True)
class LDMConfig:
    preset: str = "tiny-sd1"  # the architecture; from scratch unless `init` is given
    init: str | None = None  # fine-tune from this checkpoint (any layout openldm loads)
    vae: str | None = None  # replace the VAE by this trained VAE file
    tokenizer: str | None = None  # a tokenizer folder (vocab.json, merges.txt); else standard CLIP
    extend_vocabulary: bool = False  # add merges so each caption word is one token; grows the embedding
    domain: str | None = None  # "the ... model knows only ...": export domain.json (its captions' words) too
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None  # defaults to optim.lr
    min_snr_gamma: float | None = None
    offset_noise: float = 0.0
    input_perturbation: float = 0.0
    export_diffusers: bool = False  # also write the diffusers folder layout at the end


@dataclass(frozen=True)
class LoRAConfig:
    """A LoRA over the `ldm` section's model (kind: lora), saved in kohya's format."""

    rank: int = 4
    alpha: float | None = None  # the delta is scaled by alpha / rank; None: alpha = rank
    text_encoder: bool = False  # also adapt the text encoder's attention and MLP layers


@dataclass(frozen=True)
class EmbeddingConfig:
    """A textual-inversion embedding for the `ldm` section's model (kind: embedding), A1111's format."""

    token: str = "my-concept"  # the trigger word, and the file's name
    vectors: int = 1  # prompt tokens the embedding takes up
    init_word: str = "object"  # every vector starts as this word's (first) token embedding
    template: str = "a picture of {token}"  # each image's caption; {caption} is the dataset's own


@dataclass(frozen=True)
class TrainConfig:
    kind: Literal["vae", "ldm", "lora", "embedding"]
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    vae: VAELossConfig = field(default_factory=VAELossConfig)
    ldm: LDMConfig = field(default_factory=LDMConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check one value against its field's annotation (the few types configs use)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        if value not in typing.get_args(annotation):
            choices = ", ".join(map(repr, typing.get_args(annotation)))
            raise ConfigError(f"{where}: {value!r} is not one of {choices}")
        return value
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, str, bool) and type(value) is annotation:
        return value
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{where}: expected {name}, got {value!r}")


def _section(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a table of settings, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(names)}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()})


_SECTIONS = {"data": DataConfig, "optim": OptimConfig, "run": RunConfig, "vae": VAELossConfig,
             "ldm": LDMConfig, "lora": LoRAConfig, "embedding": EmbeddingConfig}


def parse_config(values: dict[str, Any], kind: str | None = None, where: str = "config") -> TrainConfig:
    """A `TrainConfig` from plain data; `kind` (see `KINDS`) overrides the file's `kind` key."""
    values = dict(values)
    kind = kind or values.pop("kind", None)
    values.pop("kind", None)
    if kind not in KINDS:
        raise ConfigError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    unknown = sorted(set(values) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(unknown)}; "
                          f"valid: kind, {', '.join(_SECTIONS)}")
    sections = {name: _section(cls, values[name], f"{where}: {name}") for name, cls in _SECTIONS.items()
                if name in values}
    config = TrainConfig(kind=kind, **sections)
    _validate(config, where)
    return config


def _validate(config: TrainConfig, where: str) -> None:
    run, optim, data = config.run, config.optim, config.data
    positive = {"run.steps": run.steps, "run.batch_size": run.batch_size,
                "optim.grad_accum": optim.grad_accum, "run.checkpoint_every": run.checkpoint_every,
                "run.keep_last": run.keep_last, "data.image_size": data.image_size, "optim.lr": optim.lr}
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{where}: {name} must be positive, got {value}")
    if data.image_size % 8 or (data.crop_size is not None and data.crop_size % 8):
        raise ConfigError(f"{where}: data.image_size and data.crop_size must be multiples of 8")
    if data.buckets and (data.source != "folder" or data.cache_latents or data.bucket_step % 8):
        raise ConfigError(f"{where}: data.buckets needs source: folder, no cache_latents, and a "
                          "bucket_step that is a multiple of 8")
    if data.source == "folder" and not data.path:
        raise ConfigError(f"{where}: data.source is 'folder' but data.path is not set")
    if data.captions != "template" and data.source != "shapes":
        raise ConfigError(f"{where}: data.captions {data.captions!r} needs source: shapes")
    if not 0 <= data.caption_dropout < 1:
        raise ConfigError(f"{where}: data.caption_dropout must be in [0, 1)")
    if optim.ema_decay is not None and not 0 < optim.ema_decay < 1:
        raise ConfigError(f"{where}: optim.ema_decay must be in (0, 1)")
    if run.distributed == "fsdp":
        _validate_fsdp(config, where)
    _validate_vae(config.vae, data, where)
    _validate_networks(config.lora, config.embedding, where)


def _validate_fsdp(config: TrainConfig, where: str) -> None:
    """What sharded training does not support, each with the reason."""
    if config.kind in ("lora", "embedding"):
        raise ConfigError(f"{where}: run.distributed: fsdp shards whole models; a {config.kind} trains a few "
                          "small tensors inside a frozen model, use ddp")
    if config.run.precision == "fp16":
        raise ConfigError(f"{where}: run.distributed: fsdp trains in fp32 or bf16; fp16's loss scaling is "
                          "not supported over sharded gradients")
    if config.kind == "vae" and config.vae.disc_weight:
        raise ConfigError(f"{where}: run.distributed: fsdp cannot train the GAN term (vae.disc_weight): its "
                          "adaptive weight differentiates by the decoder's last weight in an extra autograd "
                          "pass, which FSDP's backward hooks take for the real backward; use ddp")


def _validate_vae(vae: VAELossConfig, data: DataConfig, where: str) -> None:
    if vae.disc_weight < 0 or vae.disc_start < 0 or vae.perceptual_weight < 0:
        raise ConfigError(f"{where}: vae.disc_weight, vae.disc_start and vae.perceptual_weight must not be "
                          "negative")
    if vae.perceptual_weight and not vae.lpips_weights:
        raise ConfigError(f"{where}: vae.perceptual_weight needs vae.lpips_weights: LPIPS is never "
                          "downloaded; give torchvision's VGG16 weights and the LPIPS v0.1 vgg heads (one "
                          "file with both, or a list of the two files)")
    if vae.disc_layers < 1:
        raise ConfigError(f"{where}: vae.disc_layers must be at least 1, got {vae.disc_layers}")
    side = data.crop_size or data.image_size
    if vae.disc_weight and side < 3 * 2**vae.disc_layers:
        raise ConfigError(f"{where}: a {vae.disc_layers}-layer discriminator needs images of at least "
                          f"{3 * 2**vae.disc_layers} px, the training images are {side} px; "
                          "lower vae.disc_layers")


def _validate_networks(lora: LoRAConfig, embedding: EmbeddingConfig, where: str) -> None:
    if lora.rank < 1 or embedding.vectors < 1:
        raise ConfigError(f"{where}: lora.rank and embedding.vectors must be at least 1")
    if not embedding.token.strip() or "{token}" not in embedding.template:
        raise ConfigError(f"{where}: embedding.token must not be empty and embedding.template must "
                          "contain {token}")


SHIPPED = Path(__file__).resolve().parents[1] / "configs"  # package data: `openldm train vae shapes-vae`
_PATHS = {"data": ("path",), "vae": ("init", "lpips_weights"), "ldm": ("init", "vae", "tokenizer")}
_NOT_PATHS = {"captions"}  # ldm.tokenizer: learn a vocabulary from the captions


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def find_config(name: str | Path) -> tuple[Path, Path]:
    """(the config file, the folder its relative paths start from) for a path or a shipped config's name.

    A file's paths start from its own folder. A shipped config is read as if it were in the working
    directory: its folder is the installed package, which holds none of the user's files."""
    path = Path(name)
    if path.is_file():
        return path, path.resolve().parent
    shipped = SHIPPED / f"{path.name}.yaml"
    if path.name == str(name) and not path.suffix and shipped.is_file():
        return shipped, Path.cwd()
    raise ConfigError(f"{path}: no such config file (shipped configs: {', '.join(shipped_configs())})")


def _resolved(value: Any, folder: Path) -> Any:
    if isinstance(value, tuple):
        return tuple(_resolved(v, folder) for v in value)
    if value is None or value in _NOT_PATHS or Path(value).is_absolute():
        return value
    return str(folder / value)


def resolve_paths(config: TrainConfig, folder: Path) -> TrainConfig:
    """Relative input paths made relative to `folder`. `run.output_dir` is left to the working
    directory: outputs go where the command runs, like `--output-dir`."""
    sections = {}
    for name, keys in _PATHS.items():
        section = getattr(config, name)
        sections[name] = dataclasses.replace(section, **{k: _resolved(getattr(section, k), folder)
                                                         for k in keys})
    return dataclasses.replace(config, **sections)


def load_config(name: str | Path, kind: str | None = None) -> TrainConfig:
    """Read a `.yaml`/`.yml` or `.toml` training config, by path or by a shipped config's name."""
    path, folder = find_config(name)
    text = path.read_text(encoding="utf-8")
    import yaml  # here, not at the top: `openldm` declares its commands without it

    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as error:
        language = "TOML" if path.suffix == ".toml" else "YAML"
        raise ConfigError(f"{path}: not valid {language}: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return resolve_paths(parse_config(values, kind, where=str(path)), folder)
