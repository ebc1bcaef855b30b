"""`openldm.cli`: the parser starts no torch, and main's one handler turns expected failures into one line."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from openldm import cli
from openldm.cli import generate
from openldm.client import ServerError

ROOT = Path(__file__).resolve().parent.parent


_HELP_EVERY_COMMAND = """
import contextlib, io, sys
from openldm import cli
names = sorted(cli.build_parser()._subparsers._group_actions[0].choices)
with contextlib.redirect_stdout(io.StringIO()):
    for name in names:
        try:
            cli.main([name, "--help"])
        except SystemExit:
            pass
print(len(names), "TORCH" if "torch" in sys.modules else "NO TORCH")
"""


def test_every_commands_help_imports_no_torch():
    """In a fresh process: the run functions import torch, declaring the commands does not."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-c", _HELP_EVERY_COMMAND]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    count, torch = done.stdout.split(maxsplit=1)
    assert int(count) >= 13 and torch.strip() == "NO TORCH", done.stdout + done.stderr


def _command_raising(error: BaseException):
    def run(args: argparse.Namespace) -> int:
        raise error
    return run


@pytest.mark.parametrize(("error", "expected"), [
    (ValueError("bad\nsetting"), "openldm samplers: error: bad setting"),
    (OSError("output x.png cannot be written"), "openldm samplers: error: output x.png cannot be written"),
    (ServerError("no openldm server at http://h:1"), "openldm samplers: error: no openldm server at http://h:1"),
    (MemoryError(), "openldm samplers: error: MemoryError"),
    (RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"),
     "openldm samplers: error: out of memory: [enforce fail] DefaultCPUAllocator"),
])
def test_main_maps_expected_errors_to_one_line_and_exit_2(monkeypatch, capsys, error, expected):
    monkeypatch.setattr(generate, "_samplers", _command_raising(error))
    assert cli.main(["samplers"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1, err


def test_training_and_torch_errors_are_expected_once_their_module_is_loaded():
    import torch

    from openldm.training.loop import TrainingError

    assert cli.expected_error(TrainingError("diverged")) and cli.expected_error(torch.OutOfMemoryError("x"))
    assert not cli.expected_error(RuntimeError("a bug")) and not cli.expected_error(KeyError("a bug"))


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr(generate, "_samplers", _command_raising(KeyError("a bug")))
    with pytest.raises(KeyError):
        cli.main(["samplers"])


def test_ctrl_c_is_exit_130(monkeypatch, capsys):
    monkeypatch.setattr(generate, "_samplers", _command_raising(KeyboardInterrupt()))
    assert cli.main(["samplers"]) == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err == "openldm samplers: interrupted\n"


def test_the_server_side_flags_are_what_add_model_options_declares():
    parser = argparse.ArgumentParser()
    generate.add_model_options(parser)
    declared = {a.option_strings[-1] for a in parser._actions if a.option_strings and a.dest != "help"}
    assert set(generate._SERVER_SIDE) == declared and "--refiner" in declared


def test_negative_values_after_a_flag_are_values():
    assert cli.signed_values(["outpaint", "a.png", "x", "--extend", "-8,0,0,0", "--cfg", "-inf"]) == [
        "outpaint", "a.png", "x", "--extend=-8,0,0,0", "--cfg=-inf"]
    assert cli.signed_values(["txt2img", "-o", "-8,0", "--negative", "-x"]) == [
        "txt2img", "-o", "-8,0", "--negative", "-x"]


@pytest.mark.parametrize("extra", [["--width", "100000", "--height", "64"], ["--cfg", "nan"],
                                   ["--batch-size", "64", "--n-iter", "100"], ["-o", "/proc/o.png"]])
def test_bad_settings_are_refused_before_torch_starts(extra):
    """Refusing takes no model load and not even torch's start-up (seconds on a busy machine)."""
    code = ("import sys; from openldm import cli; "
            f"code = cli.main(['txt2img', 'x', *{extra!r}]); "
            "print(code, 'TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.strip() == "2 NO TORCH", done.stdout + done.stderr
    assert done.stderr.startswith("openldm txt2img: error: ") and done.stderr.count("\n") == 1, done.stderr
