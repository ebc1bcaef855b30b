"""`openldm info | convert | init`: the checkpoint subcommands, declared and run here.

torch and the checkpoint code are imported by the functions that run a command, so that declaring
these commands (for `--help` and every other command) starts no torch.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from openldm.checkpoints.errors import CheckpointError
from openldm.config import PRESETS, WEIGHT_DTYPES, get_preset

if TYPE_CHECKING:
    import torch

    from openldm.config import ModelConfig


def add_commands(sub) -> None:
    """Register `info`, `convert` and `init` on `openldm`'s subparsers."""
    for add in (_add_info, _add_convert, _add_init):
        add(sub)


# --- arguments ------------------------------------------------------------------------------

def _add_info(sub) -> None:
    p = sub.add_parser("info", help="say what a checkpoint is: family, prediction, sizes, dtypes",
                       description="Inspect a single-file checkpoint or a diffusers folder without "
                       "loading its weights: which preset it matches, its parameterization, "
                       "parameter counts per component, dtypes, EMA weights and header metadata.")
    p.add_argument("path", type=Path, help="a .safetensors/.ckpt file or a diffusers folder")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    _add_prediction_options(p)
    p.set_defaults(run=info)


def _add_prediction_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prediction", choices=("eps", "v"),
                   help="what the network predicts, when the file cannot tell (SD2 768-v models: v)")
    p.add_argument("--config", metavar="YAML",
                   help="the model's original ldm YAML; its `parameterization` sets the prediction")


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="rewrite a checkpoint as a single file or a diffusers folder",
                       description="Convert between the original single-file layout (.safetensors or "
                       ".ckpt in, .safetensors out) and the diffusers folder layout, optionally casting "
                       "the weights. The output is re-read afterwards and checked tensor by tensor.")
    p.add_argument("src", type=Path, help="a .safetensors/.ckpt file or a diffusers folder")
    p.add_argument("dst", type=Path, help="the .safetensors file or the folder to write")
    p.add_argument("--to", required=True, choices=("single-file", "diffusers"), help="the layout to write")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES,
                   help="cast floating-point weights (fp16 halves the size); default: keep as stored")
    p.add_argument("--prune-ema", action="store_true",
                   help="drop the EMA copy of the UNet (`model_ema.*` keys) that training checkpoints carry")
    _add_prediction_options(p)
    p.set_defaults(run=convert)


def _add_init(sub) -> None:
    p = sub.add_parser("init", help="write a checkpoint of any preset with random weights",
                       description="Write a random-weight checkpoint in the original single-file layout, "
                       "e.g. to try the tools before downloading real weights. The same seed gives the "
                       "same file. Full-size presets need memory for one copy of the weights.")
    p.add_argument("preset", metavar="PRESET", choices=tuple(PRESETS),
                   help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("out", type=Path, help="the .safetensors file to write")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default="fp32", help="weight dtype (default fp32)")
    p.set_defaults(run=init)


# --- reading whatever the user points at --------------------------------------------------

_SAFETENSORS_DTYPES = {  # safetensors' dtype names -> torch's
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def _header_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Shapes and dtypes without the data: meta tensors from a safetensors header."""
    import torch
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            slices = {key: f.get_slice(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
            dtypes = {key: getattr(torch, _SAFETENSORS_DTYPES[s.get_dtype()]) for key, s in slices.items()}
            return {key: torch.empty(s.get_shape(), dtype=dtypes[key], device="meta")
                    for key, s in slices.items()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(t.shape) for key, t in tensors.items()}


def _prediction(path: Path, args: argparse.Namespace, metadata: dict[str, str]) -> str | None:
    """What the keys cannot tell, as `load_components` decides it: flag, header, then ldm YAML."""
    from openldm.checkpoints import save
    from openldm.checkpoints.ldm_config import read_ldm_config

    if getattr(args, "prediction", None):
        return args.prediction
    for key in (save.META_PREDICTION, "modelspec.prediction_type"):
        if key in metadata:
            return "v" if metadata[key].lower().startswith("v") else "eps"
    beside = [path.with_suffix(s) for s in (".yaml", ".yml") if path.is_file()]
    yamls = [Path(args.config)] if getattr(args, "config", None) else [p for p in beside if p.is_file()]
    return read_ldm_config(yamls[0]).prediction if yamls else None


def _describe(path: Path, args: argparse.Namespace) -> dict:
    """Facts about a checkpoint file or diffusers folder, reading headers rather than data if we can."""
    from openldm.checkpoints import diffusers_layout as dl
    from openldm.checkpoints.detect import detect
    from openldm.checkpoints.io import read_metadata, read_state_dict
    from openldm.checkpoints.layout import split_state_dict

    if path.is_dir():
        config = dl.detect_diffusers(path, _prediction(path, args, {}))
        parts = {name: _folder_tensors(path / sub) for name, sub in dl.folder_names(config).items()}
        return _facts(path, "diffusers", config, parts, {}, {})
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.suffix == ".safetensors":
        tensors, metadata = _header_tensors(path), read_metadata(path)
    else:
        tensors, metadata = read_state_dict(path)
    config = detect(_shapes(tensors), prediction=_prediction(path, args, metadata))
    parts, rest = split_state_dict(tensors, config)
    return _facts(path, "single-file", config, parts, rest, metadata)


def _folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from openldm.checkpoints import diffusers_layout as dl
    from openldm.checkpoints.io import read_state_dict

    tensors: dict[str, torch.Tensor] = {}
    for file in dl._weight_files(folder):
        tensors |= _header_tensors(file) if file.suffix == ".safetensors" else read_state_dict(file)[0]
    return tensors


def _facts(path, layout, config: ModelConfig, parts, rest, metadata) -> dict:
    from openldm.checkpoints import save

    everything = [t for part in parts.values() for t in part.values()] + list(rest.values())
    ema = [t for key, t in rest.items() if key.startswith(save.EMA_PREFIX)]
    return {
        "path": str(path), "layout": layout, "preset": config.name, "family": config.family,
        "prediction": config.prediction, "inpainting": config.is_inpainting,
        "dtypes": dict(Counter(str(t.dtype).removeprefix("torch.") for t in everything)),
        "parameters": {name: sum(t.numel() for t in part.values()) for name, part in parts.items()},
        "ema": bool(ema), "ema_parameters": sum(t.numel() for t in ema),
        "other_keys": len(rest) - len(ema), "metadata": metadata,
    }


def info(args: argparse.Namespace) -> int:
    facts = _describe(args.path, args)
    if args.json:
        print(json.dumps(facts))
        return 0
    total = sum(facts["parameters"].values())
    rows = [
        ("path", f"{facts['path']} ({facts['layout']})"),
        ("preset", f"{facts['preset']} (family {facts['family']}, {facts['prediction']} prediction)"),
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
    from openldm.checkpoints import diffusers_layout as dl
    from openldm.checkpoints import save
    from openldm.checkpoints.load import load_components

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
    from openldm.checkpoints import save
    from openldm.checkpoints.detect import detect
    from openldm.checkpoints.io import read_state_dict

    state, metadata = read_state_dict(args.src)
    config = detect(_shapes(state), prediction=_prediction(args.src, args, metadata))
    save.save_single_file(state, args.dst, config=config, dtype=dtype, prune_ema=args.prune_ema,
                          metadata=metadata, progress=True)
    return config, save.verify_single_file(args.dst, state, dtype=dtype, prune_ema=args.prune_ema)


def init(args: argparse.Namespace) -> int:
    from openldm.checkpoints import save

    config = get_preset(args.preset)
    state = save.random_state_dict(config, seed=args.seed, dtype=save.DTYPES[args.dtype], progress=True)
    save.save_single_file(state, args.out, config=config, metadata={"openldm.seed": str(args.seed)})
    count = sum(t.numel() for t in state.values())
    print(f"wrote {args.out}: random {config.name} weights, seed {args.seed}, {count:,} parameters")
    return 0


