"""`openldm info | convert | init`: what the checkpoint subcommands do (`openldm.cli` declares them).

Imported only when one of them runs, so that other commands start without torch.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from openldm.checkpoints import diffusers_layout as dl
from openldm.checkpoints import save
from openldm.checkpoints.detect import detect, infer_shapes
from openldm.checkpoints.infer import META_CONFIG, Inferred
from openldm.checkpoints.io import CheckpointError, read_metadata, read_state_dict
from openldm.checkpoints.layout import model_files, split_state_dict
from openldm.checkpoints.load import load_components, prediction_source, sidecar_for, sidecar_hints
from openldm.config import ModelConfig, get_preset
from openldm.models.tokenizer import META_TOKENIZER

# --- reading whatever the user points at --------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _header_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Shapes and dtypes without the data: meta tensors from a safetensors header."""
    try:
        with safe_open(path, framework="pt") as f:
            slices = {key: f.get_slice(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
            return {key: torch.empty(s.get_shape(), dtype=_SAFETENSORS_DTYPES[s.get_dtype()], device="meta")
                    for key, s in slices.items()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(t.shape) for key, t in tensors.items()}


def _prediction(path: Path, args: argparse.Namespace, metadata: dict[str, str]) -> str | None:
    """What the keys cannot tell, decided by the loader's own rule (flag, header, then ldm yaml)."""
    return _prediction_source(path, args, metadata)[0]


def _prediction_source(path: Path, args: argparse.Namespace, metadata: dict[str, str]) -> tuple:
    return prediction_source(getattr(args, "prediction", None), metadata, _sidecar(path, args))


def _sidecar(path: Path, args: argparse.Namespace):
    return sidecar_for(path, getattr(args, "config", None))


def _describe(path: Path, args: argparse.Namespace) -> dict:
    """Facts about a model in any form, reading headers rather than data if we can."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    path, _ = model_files(path)
    if path.is_dir():
        config = dl.detect_diffusers(path, _prediction(path, args, {}))
        parts = {name: _folder_tensors(path / sub) for name, sub in dl.folder_names(config).items()}
        inferred = Inferred(config, {"everything": "the folder's config.json files"})
        return _facts(path, "diffusers", inferred, parts, {}, {})
    if path.suffix == ".safetensors":
        tensors, metadata = _header_tensors(path), read_metadata(path)
    else:
        tensors, metadata = read_state_dict(path)
    prediction, source = _prediction_source(path, args, metadata)
    inferred = infer_shapes(_shapes(tensors), prediction=prediction, metadata=metadata,
                            hints=sidecar_hints(_sidecar(path, args)))
    named = {"option": "--prediction", "default": "default (eps)", "yaml": "the sidecar yaml"}
    inferred.sources["prediction"] = named.get(source, source)
    parts, rest = split_state_dict(tensors, inferred.config)
    return _facts(path, "single-file", inferred, parts, rest, metadata)


def _folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in dl._weight_files(folder):
        tensors |= _header_tensors(file) if file.suffix == ".safetensors" else read_state_dict(file)[0]
    return tensors


def _facts(path, layout, inferred: Inferred, parts, rest, metadata) -> dict:
    config = inferred.config
    everything = [t for part in parts.values() for t in part.values()] + list(rest.values())
    ema = [t for key, t in rest.items() if key.startswith(save.EMA_PREFIX)]
    shown = {k: v for k, v in metadata.items() if not k.startswith((META_CONFIG, META_TOKENIZER))}
    return {
        "path": str(path), "layout": layout, "preset": config.name, "model": inferred.label,
        "inferred": inferred.sources, "family": config.family,
        "prediction": config.prediction, "inpainting": config.is_inpainting,
        "dtypes": dict(Counter(str(t.dtype).removeprefix("torch.") for t in everything)),
        "parameters": {name: sum(t.numel() for t in part.values()) for name, part in parts.items()},
        "ema": bool(ema), "ema_parameters": sum(t.numel() for t in ema),
        "other_keys": len(rest) - len(ema), "metadata": shown,
    }


def info(args: argparse.Namespace) -> int:
    facts = _describe(args.path, args)
    if args.json:
        print(json.dumps(facts))
        return 0
    total = sum(facts["parameters"].values())
    rows = [
        ("path", f"{facts['path']} ({facts['layout']})"),
        ("model", f"{facts['model']} (family {facts['family']}, {facts['prediction']} prediction)"),
        *((f"  {fact}", f"from {source}") for fact, source in facts["inferred"].items()),
        ("dtypes", ", ".join(f"{d}: {n} tensors" for d, n in facts["dtypes"].items())),
        *((f"  {name}", f"{n:,} parameters") for name, n in facts["parameters"].items()),
        ("total", f"{total:,} parameters"),
        ("EMA", f"yes ({facts['ema_parameters']:,} parameters)" if facts["ema"] else "no"),
        *((f"  {key}", value) for key, value in facts["metadata"].items()),
    ]
    for label, value in rows:
        print(f"{label:<16} {value}")
    return 0


def convert(args: argparse.Namespace) -> int:
    dtype = save.DTYPES[args.dtype] if args.dtype else None
    if args.to == "single-file" and args.src.is_file():
        config, count = _rewrite_single_file(args, dtype)
    else:  # through the loader: its allow-list, EMA choice and OpenCLIP conversion
        components = load_components(args.src, prediction=args.prediction, config_file=args.config)
        config, parts = components.config, save.component_parts(components)
        if args.to == "single-file":
            save.save_single_file(components, args.dst, dtype=dtype, progress=True)
            count = save.verify_single_file(args.dst, save.single_file_state_dict(parts, config), dtype=dtype)
        else:
            save.save_diffusers(components, args.dst, dtype=dtype, progress=True)
            count = save.verify_diffusers(args.dst, parts, config, dtype=dtype)
    cast = f" after the cast to {args.dtype}" if dtype else ""
    print(f"wrote {args.dst} ({args.to}, {config.name}, {config.prediction} prediction)")
    if args.to == "diffusers" and any(dl.drops_last_layer(e) for e in config.text_encoders):
        print("note: the text encoder is stored without its last layer, which SD2 never reads, as in the "
              "published SD2 diffusers folders; reading the folder back fills that layer with zeros")
    print(f"verified: re-read all {count} tensors; each equals the source{cast}")
    return 0


def _rewrite_single_file(args: argparse.Namespace, dtype: torch.dtype | None) -> tuple[ModelConfig, int]:
    """File to file keeps every key (EMA copies too, unless pruned) and the header metadata."""
    state, metadata = read_state_dict(args.src)
    config = detect(_shapes(state), prediction=_prediction(args.src, args, metadata), metadata=metadata,
                    hints=sidecar_hints(_sidecar(args.src, args)))
    save.save_single_file(state, args.dst, config=config, dtype=dtype, prune_ema=args.prune_ema,
                          metadata=metadata, progress=True)
    return config, save.verify_single_file(args.dst, state, dtype=dtype, prune_ema=args.prune_ema)


def init(args: argparse.Namespace) -> int:
    config = get_preset(args.preset)
    state = save.random_state_dict(config, seed=args.seed, dtype=save.DTYPES[args.dtype], progress=True)
    save.save_single_file(state, args.out, config=config, metadata={"openldm.seed": str(args.seed)})
    count = sum(t.numel() for t in state.values())
    print(f"wrote {args.out}: random {config.name} weights, seed {args.seed}, {count:,} parameters")
    return 0


