"""`openldm info | convert | init`: the checkpoint subcommands, declared and run here.

What they do is `openldm.checkpoints.commands`, imported when one of them runs, so that declaring
these commands (for `--help` and every other command) starts no torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from openldm.config import PRESETS, WEIGHT_DTYPES


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


def info(args: argparse.Namespace) -> int:
    from openldm.checkpoints import commands

    return commands.info(args)


def convert(args: argparse.Namespace) -> int:
    from openldm.checkpoints import commands

    return commands.convert(args)


def init(args: argparse.Namespace) -> int:
    from openldm.checkpoints import commands

    return commands.init(args)
