"""A corpus of broken and hostile inputs: each fails at once, in one line, with exit code 2 and no output.

The CLI runs in-process (`openldm.cli.main`); runs that get as far as sampling use the embedded
model. Every case checks the exit code, that stderr is one `openldm CMD: error:` line naming the
problem (no traceback), that no output file is left, and, where failing early is the point, the time.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from openldm import cli
from openldm.pipelines.infotext import read_png
from openldm.pipelines.params import GenerationParams, Limits, SettingsError, params_from_infotext

pytestmark = pytest.mark.usefixtures("one_thread")
EARLY_S = 10.0  # a refusal before any model load; generous for a loaded CI machine
RUN = ["--steps", "2", "--width", "32", "--height", "32"]


def refused(capsys, tmp_path, argv: list, names: str, limit: float | None = EARLY_S) -> str:
    """Run the CLI; assert exit 2, one error line mentioning `names`, no traceback, no PNG written."""
    out = tmp_path / "out"
    argv = [str(a) for a in argv]
    if "-o" not in argv and argv[0] not in ("info", "convert", "png-info"):
        argv += ["-o", str(out / "o.png")]
    started = time.perf_counter()
    code = cli.main(argv)
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line or "Traceback" in line]
    assert code == 2, f"exit {code}, stderr: {err!r}"
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"openldm {argv[0]}: error: ") and names.lower() in lines[0].lower(), lines[0]
    assert not [p for p in tmp_path.rglob("o*.png") if p.is_file()], "an output file was left behind"
    if limit is not None:
        assert elapsed < limit, f"took {elapsed:.1f} s to refuse; the point is to fail before any work"
    return lines[0]


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8)).save(path)
    return path


# --- settings: refused by GenerationParams / Limits before any model is loaded -----------------

SETTINGS = [
    (["--cfg", "nan"], "cfg"),
    (["--cfg", "inf"], "cfg"),
    (["--cfg", "-inf"], "cfg"),
    (["--cfg", "-50"], "cfg"),
    (["--cfg", "1000"], "cfg"),
    (["--steps", "0"], "steps"),
    (["--steps", "-3"], "steps"),
    (["--steps", "100000"], "steps"),
    (["--batch-size", "0"], "batch_size"),
    (["--batch-size", "-1"], "batch_size"),
    (["--batch-size", "1000"], "batch_size"),
    (["--n-iter", "0"], "batch_count"),
    (["--batch-size", "64", "--n-iter", "100"], "batch_count"),
    (["--seed", "-2"], "seed"),
    (["--seed", "4294967296"], "seed"),
    (["--subseed", "4294967296"], "subseed"),
    (["--subseed-strength", "1.5"], "subseed_strength"),
    (["--subseed-strength", "nan"], "subseed_strength"),
    (["--width", "100000", "--height", "64"], "width"),
    (["--width", "0"], "width"),
    (["--width", "-64"], "width"),
    (["--width", "8192", "--height", "8192"], "8192x8192"),
    (["--width", "100", "--height", "64"], "multiples of 8"),
    (["--sampler", "nope"], "sampler"),
    (["--scheduler", "nope"], "nope"),
    (["--clip-skip", "-1"], "clip_skip"),
    (["--refiner-switch", "2"], "refiner_switch"),
    (["--device", "nonsense"], "device"),
    (["--device", "cuda:7"], "device"),
    (["--device", "cuda" if not torch.cuda.is_available() else "cuda:99"], "device"),
    (["--dtype", "fp16", "--device", "cpu"], "fp16"),
    (["--dtype", "bf16", "--device", "cpu"], "bf16"),
    (["--original-size", "0x0"], "original_size"),
]


@pytest.mark.parametrize(("extra", "names"), SETTINGS, ids=[" ".join(e) for e, _ in SETTINGS])
def test_txt2img_refuses_bad_settings(capsys, tmp_path, extra, names):
    refused(capsys, tmp_path, ["txt2img", "a red circle", *extra], names)


IMAGE_SETTINGS = [
    (["img2img", "{image}", "x", "--strength", "1.5"], "strength"),
    (["img2img", "{image}", "x", "--strength", "-0.1"], "strength"),
    (["img2img", "{image}", "x", "--strength", "nan"], "strength"),
    (["outpaint", "{image}", "x", "--extend", "-8,0,0,0"], "outpaint"),
    (["outpaint", "{image}", "x", "--extend=-8,0,0,0"], "outpaint"),
    (["outpaint", "{image}", "x", "--extend", "0,0,0,0"], "nothing to outpaint"),
    # The grown canvas is what is sampled, even when --width/--height resize it: refused before the
    # model is looked for (a missing --model would be the error otherwise).
    (["outpaint", "{image}", "x", "--extend", "4,0,0,0", "--width", "32", "--model", "missing.safetensors"],
     "makes 36x32"),
    (["outpaint", "{image}", "x", "--extend", "0,0,3,0", "--height", "40", "--model", "missing.safetensors"],
     "makes 32x35"),
    (["inpaint", "{image}", "{image}", "x", "--mask-blur", "-1"], "mask_blur"),
    (["inpaint", "{image}", "{image}", "x", "--padding", "-5"], "only_masked_padding"),
    (["upscale", "{image}", "x", "--scale", "0"], "upscale_by"),
    (["upscale", "{image}", "x", "--scale", "-2"], "upscale_by"),
    (["upscale", "{image}", "x", "--scale", "100"], "upscale_by"),
    (["upscale", "{image}", "x", "--scale", "nan"], "upscale_by"),
    (["upscale", "{image}", "x", "--scale", "7.9", "--width", "4096", "--height", "4096"], "upscaled size"),
    (["upscale", "{image}", "x", "--hires-steps", "0"], "hires_steps"),
]


@pytest.mark.parametrize(("argv", "names"), IMAGE_SETTINGS,
                         ids=[" ".join(a[:1] + a[2:]) for a, _ in IMAGE_SETTINGS])
def test_image_commands_refuse_bad_settings(capsys, tmp_path, picture, argv, names):
    refused(capsys, tmp_path, [str(picture) if a == "{image}" else a for a in argv], names)


def test_prompts_over_the_length_limit_are_refused(capsys, tmp_path):
    long = "a " * (Limits().max_prompt_chars // 2 + 1)
    refused(capsys, tmp_path, ["txt2img", long], "prompt of")
    refused(capsys, tmp_path, ["txt2img", "x", "--negative", long], "negative of")


@pytest.mark.parametrize(("argv", "names"), [
    (["txt2img"], "no prompt"), (["txt2img", "--prompt-file", "{tmp}/missing.txt"], "prompt file"),
    (["txt2img", "--prompt-file", "{tmp}/empty.txt"], "empty"),
    (["txt2img", "<lora:nothere:1>"], "openldm serve"),  # the --lora-dir text says where a server looks
])
def test_prompt_problems_are_one_line(capsys, tmp_path, argv, names):
    (tmp_path / "empty.txt").write_text("\n\n")
    refused(capsys, tmp_path, [a.replace("{tmp}", str(tmp_path)) for a in argv], names)


# --- files: broken, hostile or the wrong kind, as models and as images -------------------------

class _Marker:
    """Unpickling this would create the marker file: loading must never run it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _bad_model(kind: str, tmp_path):
    """A file that is not a model, of the given kind."""
    random = np.random.default_rng(0).bytes(4096)
    if kind == "zero-byte":
        (path := tmp_path / "m.safetensors").write_bytes(b"")
    elif kind == "random bytes":
        (path := tmp_path / "m.safetensors").write_bytes(random)
    elif kind == "random bytes ckpt":
        (path := tmp_path / "m.ckpt").write_bytes(random)
    elif kind == "oversized header":
        (path := tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    elif kind == "truncated":
        save_file({"a": torch.zeros(64, 64)}, tmp_path / "full.safetensors")
        data = (tmp_path / "full.safetensors").read_bytes()
        (path := tmp_path / "m.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "plain pickle":
        (path := tmp_path / "m.ckpt").write_bytes(pickle.dumps({"state_dict": _Marker(tmp_path / "PWNED")}))
    elif kind == "torch zip pickle":
        torch.save({"state_dict": _Marker(tmp_path / "PWNED")}, path := tmp_path / "m.ckpt")
    elif kind == "lora":
        save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
                   "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)},
                  path := tmp_path / "m.safetensors")
    elif kind == "vae only":
        save_file({"encoder.conv_in.weight": torch.zeros(32, 3, 3, 3), "decoder.conv_out.weight":
                   torch.zeros(3, 32, 3, 3)}, path := tmp_path / "m.safetensors")
    elif kind == "unrelated":
        save_file({"classifier.weight": torch.zeros(10, 10)}, path := tmp_path / "m.safetensors")
    else:
        path = tmp_path / "missing.safetensors"
    return path


MODEL_KINDS = ["zero-byte", "random bytes", "random bytes ckpt", "oversized header", "truncated",
               "plain pickle", "torch zip pickle", "lora", "vae only", "unrelated", "missing"]


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_a_bad_model_file_is_one_line(capsys, tmp_path, kind):
    refused(capsys, tmp_path, ["txt2img", "x", "--model", _bad_model(kind, tmp_path), *RUN], "m", limit=30)
    assert not (tmp_path / "PWNED").exists(), "loading ran code from a pickle"


@pytest.mark.parametrize("kind", ["truncated", "random bytes", "plain pickle", "torch zip pickle",
                                  "unrelated"])
def test_info_and_convert_refuse_bad_files(capsys, tmp_path, kind):
    path = _bad_model(kind, tmp_path)
    refused(capsys, tmp_path, ["info", path], "m", limit=30)
    converted = tmp_path / "o.safetensors"
    refused(capsys, tmp_path, ["convert", path, converted, "--to", "single-file"], "m", limit=30)
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "o.safetensors").exists()


def _png_bomb(path) -> None:
    """A valid PNG header claiming 100,000 x 100,000 pixels: PIL's bomb check must refuse to decode it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize(("make", "names"), [
    (lambda p: p.write_text("not a picture"), "not a readable image"), (_png_bomb, "not a readable image"),
    (lambda p: p.write_bytes(b""), "not a readable image"), (lambda p: None, "not found"),
])
@pytest.mark.parametrize("command", ["img2img", "inpaint-mask"])
def test_a_bad_image_is_one_line(capsys, tmp_path, picture, make, names, command):
    bad = tmp_path / "bad.png"
    make(bad)
    argv = ["img2img", bad, "x"] if command == "img2img" else ["inpaint", picture, bad, "x"]
    refused(capsys, tmp_path, argv, names)


@pytest.mark.parametrize("make", [lambda p: p.write_text("text"), lambda p: Image.new("RGB", (8, 8)).save(p)])
def test_from_png_without_settings_is_one_line(capsys, tmp_path, make):
    make(source := tmp_path / "src.png")
    refused(capsys, tmp_path, ["txt2img", "--from-png", source], "src.png")
    refused(capsys, tmp_path, ["png-info", source], "src.png")


# --- output paths: checked before the model is loaded, naming the user's path -----------------

def test_an_output_under_a_file_is_refused_at_once(capsys, tmp_path):
    (tmp_path / "afile").write_text("")
    line = refused(capsys, tmp_path, ["txt2img", "x", "-o", tmp_path / "afile" / "o.png"], "afile")
    assert ".tmp" not in line


def test_an_impossible_output_is_refused_at_once(capsys, tmp_path):
    line = refused(capsys, tmp_path, ["txt2img", "x", "-o", "/proc/openldm-o.png"], "/proc/openldm-o.png")
    assert ".tmp" not in line


def test_a_folder_where_an_output_file_goes_is_refused(capsys, tmp_path):
    (tmp_path / "o-0002.png").mkdir()
    refused(capsys, tmp_path, ["txt2img", "x", "--batch-size", "2", "-o", tmp_path / "o.png"], "o-0002.png")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused_at_once(capsys, tmp_path):
    (folder := tmp_path / "ro").mkdir()
    folder.chmod(0o555)
    refused(capsys, tmp_path, ["txt2img", "x", "-o", folder / "o.png"], "ro/o.png")


def test_an_output_that_is_not_png_is_refused(capsys, tmp_path):
    refused(capsys, tmp_path, ["txt2img", "x", "-o", tmp_path / "o.jpg"], "o.jpg")


# --- same settings, same bytes -----------------------------------------------------------------

def test_two_runs_with_the_same_seed_write_identical_files(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for out in (a, b):
        assert cli.main(["txt2img", "a red circle", *RUN, "--seed", "7", "-o", str(out)]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert read_png(a)[1]["params"]["subseed"] == -1  # no variation seed recorded when none is in use


def test_an_a1111_hires_steps_of_0_means_as_many_as_steps():
    settings_ = {"Hires upscale": "2", "Hires steps": "0", "Steps": "20"}
    assert params_from_infotext("x", "", settings_).hires_steps is None


def test_a_variation_seed_is_drawn_and_recorded_when_in_use():
    params = GenerationParams("x", subseed_strength=0.5).with_seed()
    assert 0 <= params.subseed < 2**32 and GenerationParams("x").with_seed().subseed == -1


# --- settings through the JSON API ----------------------------------------------------------

BAD_JSON = [
    [], "prompt", None, {}, {"prompt": 5}, {"prompt": "x", "steps": "20"}, {"prompt": "x", "steps": True},
    {"prompt": "x", "steps": 2.5}, {"prompt": "x", "cfg": float("nan")}, {"prompt": "x", "cfg": "7"},
    {"prompt": "x", "seed": 2**32}, {"prompt": "x", "seed": -5}, {"prompt": "x", "outpaint": [1, 2]},
    {"prompt": "x", "outpaint": ["a", "b", "c", "d"]}, {"prompt": "x", "outpaint": [0, -1, 0, 0]},
    {"prompt": "x", "loras": [["a"]]}, {"prompt": "x", "loras": [[1, 2]]}, {"prompt": "x", "loras": 3},
    {"prompt": "x", "bogus": 1}, {"prompt": "x", "batch_size": 100_000}, {"prompt": "x" * 1_000_000},
    {"prompt": "x", "width": 1e10}, {"prompt": "x", "width": 10**400}, {"prompt": "x", "upscale_by": 10**400},
    {"prompt": "x", "resize_mode": "zoom"}, {"prompt": "x", "original_size": [0, 0]},
    {"prompt": "x", "loras": [["a", float("inf")]]},
]


@pytest.mark.parametrize("data", BAD_JSON, ids=[repr(d)[:40] for d in BAD_JSON])
def test_from_json_refuses_bad_settings_in_one_line(data):
    with pytest.raises(SettingsError) as error:
        GenerationParams.from_json(data)
    assert "\n" not in str(error.value) and len(str(error.value)) < 300


def test_from_json_reads_back_what_to_json_wrote():
    params = GenerationParams("a cat", steps=3, cfg=4.5, seed=9, outpaint=(8, 0, 0, 0), loras=(("l", 0.5),))
    assert GenerationParams.from_json(json.loads(json.dumps(params.to_json()))) == params


_FIELDS = [f for f in GenerationParams.__dataclass_fields__] + ["bogus"]
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                                 max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=6) | _JSON)
def test_from_json_raises_only_settings_errors(data):
    try:
        params = GenerationParams.from_json(data)
    except SettingsError:
        return
    assert isinstance(params, GenerationParams) and params == GenerationParams.from_json(params.to_json())
