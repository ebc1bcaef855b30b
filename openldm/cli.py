"""The `openldm` command: every subcommand plugs in here.

Each subcommand has a function that declares its arguments (`_add_<name>(subparsers)`, or a
module's `add_commands`) and one that runs it. Declaring imports no torch: the modules that run
models are imported when a command needs them, so `--help`, `png-info` and clients of `openldm
serve` start at once. Expected failures (a bad file, a missing path) print one line to stderr and
exit with status 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from openldm import cli_bench, cli_eval, cli_generate, cli_serve, cli_train
from openldm.checkpoints.errors import CheckpointError
from openldm.config import PRESETS, WEIGHT_DTYPES

EXIT_USAGE = 2


def _deferred(module: str, function: str):
    """A command's run function, imported when the command runs: parsing and `--help` load no torch."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)

    return run


# --- checkpoint subcommands (openldm.cli_checkpoints runs them) -----------------------------

def _add_info(sub) -> None:
    p = sub.add_parser("info", help="say what a checkpoint is: family, prediction, sizes, dtypes",
                       description="Inspect a single-file checkpoint or a diffusers folder without "
                       "loading its weights: which preset it matches, its parameterization, "
                       "parameter counts per component, dtypes, EMA weights and header metadata.")
    p.add_argument("path", type=Path, help="a .safetensors/.ckpt file or a diffusers folder")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    _add_prediction_options(p)
    p.set_defaults(run=_deferred("openldm.cli_checkpoints", "info"))


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
    p.set_defaults(run=_deferred("openldm.cli_checkpoints", "convert"))


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
    p.set_defaults(run=_deferred("openldm.cli_checkpoints", "init"))


# --- entry point ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each subcommand adds itself."""
    parser = argparse.ArgumentParser(
        prog="openldm", description="Stable Diffusion checkpoints and models, made readable.",
        epilog="Run `openldm COMMAND --help` for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_info, _add_convert, _add_init):
        add(sub)
    cli_generate.add_commands(sub)
    cli_train.add_commands(sub)
    cli_eval.add_commands(sub)
    cli_serve.add_commands(sub)
    cli_bench.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; expected failures print one line and return 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (CheckpointError, OSError) as e:
        print(f"openldm {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
