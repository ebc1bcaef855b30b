"""The `openldm` command: the parser, and the one place that turns expected failures into one line.

Each command group is a module here (`checkpoints`, `generate`, `train`, `eval`, `serve`) whose
`add_commands` declares its subcommands and points each at the function that runs it. Declaring
imports no torch: the run functions import what they need, so `--help`, `png-info` and clients of
`openldm serve` start at once. Expected failures (a bad file, a bad setting, an unreachable server,
memory running out) print `openldm COMMAND: error: ...` on one line and exit with status 2; a
traceback means a bug.
"""

from __future__ import annotations

import argparse
import re
import sys

from openldm.cli import bench, checkpoints, generate, serve, train
from openldm.cli import eval as eval_command
from openldm.client import ServerError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C
COMMAND_GROUPS = (checkpoints, generate, train, eval_command, serve, bench)

# What a command may fail with and still be the user's problem, not a bug: bad settings, files and
# configs (CheckpointError, ConfigError, DataError and SettingsError are ValueErrors), paths, the server.
_EXPECTED = (ValueError, OSError, ServerError, MemoryError)
# Error types of modules that import torch: named here, checked only once their module is loaded.
_LOADED_EXPECTED = (("openldm.training.loop", "TrainingError"), ("torch", "OutOfMemoryError"))
_CPU_OUT_OF_MEMORY = "DefaultCPUAllocator: can't allocate memory"  # torch's CPU allocator: a RuntimeError
_NEGATIVE_VALUE = re.compile(r"-(\d[\d.,x]*|inf|nan)", re.IGNORECASE)  # "-8,0,0,0", "-inf": not flags


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each command group adds its subcommands."""
    parser = argparse.ArgumentParser(
        prog="openldm", description="Stable Diffusion checkpoints and models, made readable.",
        epilog="Run `openldm COMMAND --help` for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_commands(sub)
    return parser


def signed_values(argv: list[str]) -> list[str]:
    """`--extend -8,0,0,0` as `--extend=-8,0,0,0` (argparse takes it for a flag): no openldm flag looks so."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE_VALUE.fullmatch(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def expected_error(error: BaseException) -> bool:
    """Whether `error` is a failure to report in one line (else it is a bug, and gets its traceback)."""
    if isinstance(error, _EXPECTED):
        return True
    if isinstance(error, RuntimeError) and _CPU_OUT_OF_MEMORY in str(error):
        return True
    for module, name in _LOADED_EXPECTED:  # an error of a module not imported cannot have been raised
        kind = getattr(sys.modules.get(module), name, None)
        if kind is not None and isinstance(error, kind):
            return True
    return False


def one_line(error: BaseException) -> str:
    """The error's message on one line (torch's out-of-memory messages run over several)."""
    text = " ".join(str(error).split())
    if _CPU_OUT_OF_MEMORY in text or type(error).__name__ == "OutOfMemoryError":
        return f"out of memory: {text}"
    return text or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; expected failures print one line and return 2, Ctrl-C returns 130."""
    args = build_parser().parse_args(signed_values(sys.argv[1:] if argv is None else list(map(str, argv))))
    try:
        return args.run(args)
    except KeyboardInterrupt:  # files already written are whole; the one being written is not there
        print(f"openldm {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if not expected_error(error):
            raise
        print(f"openldm {args.command}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
