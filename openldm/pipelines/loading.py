"""Files to a ready `Pipeline`: checkpoints, diffusers folders and model folders, with their tokenizers."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from openldm.checkpoints.io import CheckpointError
from openldm.checkpoints.load import Components, load_components
from openldm.engines.base import Engine, get_engine
from openldm.models.domain import read_domain
from openldm.models.tokenizer import CLIPTokenizer, find_tokenizers
from openldm.networks import NetworkLibrary, read_embeddings
from openldm.pipelines.pipeline import Pipeline


def default_tokenizers(components: Components, folder: Path | None = None) -> list[CLIPTokenizer]:
    """Each text encoder's tokenizer: the loaded model's, else from `folder`, its header or standard CLIP."""
    if folder is None and components.tokenizers:
        return components.tokenizers
    if folder is None and components.layout == "diffusers" and components.source is not None:
        folder = Path(components.source)
    return find_tokenizers(components.config.text_encoders, folder, components.metadata)


MODEL_FILE = "model.safetensors"  # the weights of a "model folder": one single file plus its tokenizer


def model_name(components: Components) -> str:
    """What PNGs call a model: its file's stem or folder's name (its preset's, if built in memory)."""
    if components.source is None:
        return components.config.name
    source = Path(components.source)
    source = source.parent if source.name == MODEL_FILE else source
    return source.name if source.is_dir() else source.stem


def load(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         prediction: str | None = None, config_file: str | Path | None = None,
         lora_dirs: Iterable[str | Path] = (), embedding_dirs: Iterable[str | Path] = (),
         vae: str | Path | None = None, engine: str | Engine = "eager") -> Pipeline:
    """A checkpoint file, diffusers folder or model folder (`model.safetensors` + tokenizer), ready to use.

    `dtype=None` keeps the stored precision on accelerators and computes in float32 on the CPU,
    where half-precision kernels are slow or missing (fp16 files are upcast once, at load).
    Prompts may name the LoRA files under `lora_dirs` (`<lora:file_stem:weight>`) and the embeddings
    under `embedding_dirs` (the file stem); an embedding made for another model is skipped with a warning.
    `vae` replaces the model's VAE with a standalone one (`checkpoints.vae_file`).
    `engine` runs the UNet and VAE decoder (`openldm.engines`: eager, compile, openvino).
    """
    engine = get_engine(engine)  # a missing engine fails before loading
    networks, embeddings = NetworkLibrary(lora_dirs), read_embeddings(embedding_dirs)  # fail before loading
    path = Path(path)
    if dtype is None and torch.device(device).type == "cpu":
        dtype = torch.float32
    folder = path if path.is_dir() and not (path / "model_index.json").exists() else None
    if folder is not None and not (folder / MODEL_FILE).is_file():
        raise CheckpointError(f"{folder}: neither a diffusers folder (model_index.json) nor a model folder "
                              f"({MODEL_FILE})")
    defer = getattr(engine, "bakes_weights", False) and torch.device(device).type == "cpu"
    components = load_components(folder / MODEL_FILE if folder else path, prediction=prediction,
                                 config_file=config_file, dtype=dtype, device=device, vae=vae,
                                 defer_unet=defer)
    pipe = Pipeline(components, default_tokenizers(components, folder), engine)
    pipe.networks, pipe.domain = networks, read_domain(folder) if folder else None
    for skipped in pipe.add_embeddings(embeddings):
        warnings.warn(skipped, stacklevel=2)
    return pipe
