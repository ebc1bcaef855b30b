"""`openldm txt2img | img2img | inpaint | upscale | png-info` on a tiny random checkpoint, run in-process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from openldm import cli
from openldm.cli import generate as cli_generate
from openldm.pipelines.infotext import read_png
from openldm.pipelines.outputs import output_paths

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--steps", "2", "--cfg", "5"]


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread):
    """A random tiny-sd1 checkpoint, written the way a user would: `openldm init`."""
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    assert cli.main(["init", "tiny-sd1", str(path), "--seed", "3"]) == 0
    return path


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def settings(path) -> str:
    text, exact = read_png(path)
    assert exact is not None and exact["params"]["seed"] >= 0
    return text


@pytest.fixture
def picture(tmp_path):
    """A 24x32 input image: left half dark red, right half light blue."""
    array = np.zeros((32, 24, 3), dtype=np.uint8)
    array[:, :12] = (120, 20, 20)
    array[:, 12:] = (150, 200, 240)
    path = tmp_path / "in.png"
    Image.fromarray(array).save(path)
    return path


# --- each command writes a PNG of the right size that says how it was made ---------------------

def test_txt2img_writes_a_png_with_its_settings(model, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert run("txt2img", "a red circle", "--model", model, *FAST, "--seed", 5, "--width", 32,
               "--height", 24, "--negative", "blurry", "-o", out) == 0
    with Image.open(out) as image:
        assert (image.format, image.size) == ("PNG", (32, 24))
    text = settings(out)
    assert text.startswith("a red circle\nNegative prompt: blurry\nSteps: 2, Sampler: Euler")
    assert "Seed: 5" in text and "Size: 32x24" in text and "Model: tiny" in text
    assert f"wrote {out} (seed 5)" in capsys.readouterr().out

    assert run("png-info", out) == 0
    assert capsys.readouterr().out.strip() == text


def test_from_png_regenerates_the_same_image(model, tmp_path):
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    assert run("txt2img", "a (blue:1.2) square", "--model", model, *FAST, "--sampler", "DPM++ 2M",
               "--seed", -1, "-o", first) == 0  # a random seed, recorded in the PNG
    assert run("txt2img", "--from-png", first, "--model", model, "-o", again) == 0
    assert read_png(again) == read_png(first)
    assert np.array_equal(pixels(again), pixels(first))

    changed = tmp_path / "changed.png"  # options given beside --from-png override the stored ones
    assert run("txt2img", "--from-png", first, "--model", model, "--cfg", 9, "-o", changed) == 0
    assert "CFG scale: 9.0" in settings(changed) and not np.array_equal(pixels(changed), pixels(first))


def test_batches_and_prompt_files_number_their_outputs(model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na green triangle\n")
    out = tmp_path / "many.png"
    assert run("txt2img", "--prompt-file", prompts, "--model", model, *FAST, "--seed", 10, "--batch-size", 2,
               "--n-iter", 2, "-o", out) == 0
    files = sorted(tmp_path.glob("many-*.png"))
    assert files == output_paths(out, 8)
    seeds = [read_png(f)[1]["params"]["seed"] for f in files]
    assert seeds == [10, 11, 12, 13] * 2
    assert [read_png(f)[0].split("\n")[0] for f in files[::4]] == ["a red circle", "a green triangle"]

    alone = tmp_path / "alone.png"  # image 3 (second batch) equals its seed run on its own
    assert run("txt2img", "a red circle", "--model", model, *FAST, "--seed", 12, "-o", alone) == 0
    assert np.abs(pixels(alone).astype(int) - pixels(files[2])).max() <= 1


def test_img2img_keeps_the_input_size(model, picture, tmp_path):
    out = tmp_path / "b.png"
    assert run("img2img", picture, "an oil painting", "--model", model, *FAST, "--strength", 0.5,
               "--seed", 1, "-o", out) == 0
    with Image.open(out) as image:
        assert image.size == (24, 32)
    assert "Denoising strength: 0.5" in settings(out)


def test_inpaint_keeps_the_pixels_outside_the_mask(model, picture, tmp_path):
    mask = np.zeros((32, 24), dtype=np.uint8)
    mask[8:24, 4:20] = 255
    mask_path, out = tmp_path / "mask.png", tmp_path / "c.png"
    Image.fromarray(mask).save(mask_path)
    assert run("inpaint", picture, mask_path, "a cat", "--model", model, *FAST, "--mask-blur", 0, "--seed", 2,
               "-o", out) == 0
    result, original = pixels(out), pixels(picture)
    assert result.shape == original.shape
    assert np.array_equal(result[mask == 0], original[mask == 0])
    assert not np.array_equal(result[mask == 255], original[mask == 255])


def test_upscale_doubles_the_size(model, picture, tmp_path):
    out = tmp_path / "d.png"
    assert run("upscale", picture, "a castle", "--model", model, *FAST, "--scale", 2, "--seed", 4,
               "-o", out) == 0
    with Image.open(out) as image:
        assert image.size == (48, 64)
    assert "Hires upscale: 2.0" in settings(out) and "Size: 24x32" in settings(out)


def test_lora_is_merged_and_reported(model, tmp_path, capsys):
    """A kohya LoRA on one cross-attention projection, plus a key that names no layer."""
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    lora = tmp_path / "style.safetensors"
    tensors = {f"{stem}.lora_down.weight": torch.randn(4, 32), f"{stem}.lora_up.weight": torch.randn(32, 4),
               f"{stem}.alpha": torch.tensor(4.0)}
    tensors |= {f"lora_unet_no_such_layer.lora_{d}.weight": torch.ones(4, 4) for d in ("down", "up")}
    save_file(tensors, lora)
    plain, styled = tmp_path / "plain.png", tmp_path / "styled.png"
    assert run("txt2img", "a red circle", "--model", model, *FAST, "--seed", 6, "-o", plain) == 0
    assert run("txt2img", "a red circle", "--model", model, *FAST, "--seed", 6, "--lora", f"{lora}:0.8",
               "-o", styled) == 0
    report = capsys.readouterr().err
    assert "style x0.8: applied 3 unet keys" in report, report
    assert "2 keys match no module: lora_unet_no_such_layer.lora_down.weight" in report, report
    assert 'Lora weights: "style: 0.8"' in settings(styled)
    assert not np.array_equal(pixels(plain), pixels(styled))


# --- bad input: one line, status 2, no traceback, no file -----------------------------------------

def _bad(tmp_path, picture, model):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    small = tmp_path / "small.png"
    Image.new("L", (8, 8)).save(small)
    return {
        "size": (["txt2img", "x", "--width", 30], "width 30"),
        "model": (["txt2img", "x", "--model", tmp_path / "gone.safetensors"], "gone.safetensors: no such"),
        "prompt file": (["txt2img", "--prompt-file", empty], "empty.txt is empty"),
        "no prompt": (["txt2img"], "no prompt"),
        "sampler": (["txt2img", "x", "--sampler", "nope"], "unknown sampler 'nope'; valid samplers: euler"),
        "image": (["img2img", tmp_path / "gone.png", "x"], "image not found"),
        "mask size": (["inpaint", picture, small, "x"], "mask size 8x8 does not match the image size 24x32"),
        "suffix": (["txt2img", "x", "-o", tmp_path / "out.jpg"], "must be a .png file"),
        "lora": (["txt2img", "x", "--lora", tmp_path / "none.safetensors:1"], "none.safetensors: no such"),
        "lora in prompt": (["txt2img", "a cat <lora:grain:0.6>"], "names <lora:grain>, but no LoRA folders"),
        "png-info": (["png-info", small], "holds no generation parameters"),
    }


BAD_INPUTS = ["size", "model", "prompt file", "no prompt", "sampler", "image", "mask size", "suffix", "lora",
              "lora in prompt", "png-info"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_clear_line(case, model, picture, tmp_path, capsys):
    argv, message = _bad(tmp_path, picture, model)[case]
    out = tmp_path / "out.png"
    extra = [] if argv[0] == "png-info" else [*FAST, *([] if "-o" in argv else ["-o", out])]
    extra += [] if argv[0] == "png-info" or "--model" in argv else ["--model", model]
    assert run(*argv, *extra) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"openldm {argv[0]}: error: ") and message in last, err
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".*.tmp"))


def test_missing_embedded_model_says_to_pass_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_generate, "default_model_path", lambda: tmp_path / "weights" / "shapes")
    assert run("txt2img", "x", "-o", tmp_path / "out.png") == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass --model PATH" in err and "shapes" in err


def test_an_interrupted_write_leaves_no_file(model, tmp_path, monkeypatch, capsys):
    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    assert run("txt2img", "x", "--model", model, *FAST, "-o", tmp_path / "out.png") == cli.EXIT_ERROR
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_output_names(tmp_path):
    assert output_paths(tmp_path / "a.png", 1) == [tmp_path / "a.png"]
    assert output_paths(tmp_path / "a", 2) == [tmp_path / "a-0001.png", tmp_path / "a-0002.png"]
    assert output_paths(tmp_path, 1, "txt2img") == [tmp_path / "txt2img.png"]  # an existing folder
    assert output_paths(f"{tmp_path}/new/", 2, "upscale")[1] == tmp_path / "new" / "upscale-0002.png"
    with pytest.raises(ValueError, match="must be a .png file"):
        output_paths(tmp_path / "a.jpg", 1)


def test_ctrl_c_is_one_line_and_leaves_no_file(model, tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupt)
    assert run("txt2img", "x", "--model", model, *FAST, "-o", tmp_path / "out.png") == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "openldm txt2img: interrupted"
    assert list(tmp_path.iterdir()) == []


def test_help_names_every_option_a_newcomer_needs(capsys):
    with pytest.raises(SystemExit):
        cli.main(["txt2img", "--help"])
    text = capsys.readouterr().out
    for option in ("--negative", "--model", "--sampler", "--scheduler", "--steps", "--cfg", "--seed",
                   "--width", "--batch-size", "--n-iter", "--prompt-file", "--from-png", "--lora", "--device",
                   "--dtype", "--server", "openldm samplers", "example:"):
        assert option in text


def test_samplers_lists_every_sampler_and_schedule_with_its_a1111_name(capsys):
    from openldm.diffusion.registry import SAMPLERS, SCHEDULE_DISPLAY

    assert cli.main(["samplers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for spec in SAMPLERS.values():
        assert any(line.split()[:1] == [spec.name] and spec.display in line for line in lines), spec.name
    for name, display in SCHEDULE_DISPLAY.items():
        assert any(line.split()[:1] == [name] and line.endswith(display) for line in lines), name


# --- the hires fix as A1111 has it, and A1111's PNGs read back ----------------------------------

HIRES = ["--hires", "--hires-scale", 1.5, "--upscaler", "Latent (bicubic)", "--hires-steps", 3,
         "--denoising-strength", 0.6, "--hires-prompt", "a blue circle", "--hires-cfg", 4, "--hires-sampler",
         "DPM++ 2M"]


def _a1111_png(path, text):
    """A PNG as A1111 writes it: the `parameters` infotext chunk only."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_txt2img_hires_records_a1111s_keys(model, tmp_path):
    out = tmp_path / "hires.png"
    assert run("txt2img", "a red circle", "--model", model, *FAST, "--seed", 2, "--width", 16, "--height", 16,
               *HIRES, "--eta", 0.5, "--s-noise", 0.9, "--cfg-rescale", 0.3, "-o", out) == 0
    with Image.open(out) as image:
        assert image.size == (24, 24)
    text = settings(out)
    for pair in ("Size: 16x16", "Denoising strength: 0.6", "Hires upscale: 1.5", "Hires steps: 3",
                 "Hires upscaler: Latent (bicubic)", "Hires prompt: a blue circle", "Hires sampler: DPM++ 2M",
                 "Hires CFG Scale: 4.0", "Eta: 0.5", "Sigma noise: 0.9", "CFG Rescale phi: 0.3"):
        assert pair in text
    resized = tmp_path / "resized.png"  # a target of another aspect: cover, then crop the middle
    assert run("txt2img", "a red circle", "--model", model, *FAST, "--seed", 2, "--width", 16, "--height", 16,
               "--hires", "--hires-width", 32, "--hires-height", 24, "-o", resized) == 0
    with Image.open(resized) as image:
        assert image.size == (32, 24)
    assert "Hires resize: 32x24" in settings(resized)


def test_from_png_of_an_a1111_hires_png_regenerates_it_with_hires(model, tmp_path, capsys):
    explicit = tmp_path / "explicit.png"
    assert run("txt2img", "a red circle", "--model", model, *FAST, "--seed", 2, "--width", 16, "--height", 16,
               *HIRES, "-o", explicit) == 0
    a1111 = _a1111_png(tmp_path / "a1111.png", (
        "a red circle\nSteps: 2, Sampler: Euler, Schedule type: Automatic, CFG scale: 5, Seed: 2, "
        "Size: 16x16, Model hash: 0123abcd, Model: other, Denoising strength: 0.6, "
        "Hires prompt: a blue circle, "
        "Hires upscale: 1.5, Hires steps: 3, Hires upscaler: Latent (bicubic), Hires sampler: DPM++ 2M, "
        "Hires CFG Scale: 4, Version: v1.10.1"))
    again = tmp_path / "again.png"
    assert run("txt2img", "--from-png", a1111, "--model", model, "-o", again) == 0
    with Image.open(again) as image:
        assert image.size == (24, 24)
    assert np.array_equal(pixels(again), pixels(explicit))


@pytest.mark.parametrize(("pair", "named"), [("ENSD: 31337", "ENSD: '31337'"),
                                             ("Hires upscaler: R-ESRGAN 4x+", "Hires upscaler")])
def test_from_png_refuses_what_it_cannot_honour_unless_lenient(model, tmp_path, capsys, pair, named):
    png = _a1111_png(tmp_path / "a1111.png", "a red circle\nSteps: 2, CFG scale: 5, Seed: 2, Size: 16x16, "
                     f"Denoising strength: 0.6, Hires upscale: 1.5, {pair}")
    out = tmp_path / "out.png"
    capsys.readouterr()
    assert run("txt2img", "--from-png", png, "--model", model, "-o", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot honour" in err and named in err and "--lenient" in err
    assert not out.exists()
    assert run("txt2img", "--from-png", png, "--model", model, "--lenient", "-o", out) == 0
    assert "warning:" in capsys.readouterr().err
    with Image.open(out) as image:
        assert image.size == (24, 24)
