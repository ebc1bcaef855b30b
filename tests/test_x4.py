"""The SD 2 x4 upscaler: its UNet and VAE against diffusers', its detection, its pipeline against
diffusers' `StableDiffusionUpscalePipeline` on the tiny random preset (same weights via our folder)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from openldm import cli, memory
from openldm.checkpoints.detect import infer_shapes
from openldm.checkpoints.hashing import model_hash
from openldm.checkpoints.save import save_diffusers
from openldm.config import SD_X4_UPSCALER, TINY_X4_UPSCALER
from openldm.diffusion.noise import initial_noise
from openldm.memory import estimate_peak
from openldm.pipelines import loading, render
from openldm.pipelines.infotext import parse_infotext
from openldm.pipelines.outputs import read_settings
from openldm.pipelines.params import GenerationParams
from openldm.pipelines.render import Renderer
from openldm.pipelines.x4 import X4Settings, X4Tiling, upscale_x4
from tests.helpers import checkpoint_shapes, make_checkpoint
from tests.test_pipeline import (
    CFG,
    NEGATIVE,
    PROMPT,
    REF_ARGS,
    SAMPLERS,
    SEED,
    STEPS,
    _compare,
    _decode,
    _diffusers_start,
    _with_scheduler,
)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")
COMPONENT_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def x4(tmp_path_factory):
    """(openldm pipeline from the original layout, diffusers pipeline from the folder we write)."""
    tmp = tmp_path_factory.mktemp("x4")
    pipe = loading.load(make_checkpoint(tmp, TINY_X4_UPSCALER, seed=3))
    folder = save_diffusers(pipe.components, tmp / "folder")
    ref = diffusers.StableDiffusionUpscalePipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    ref.folder = folder
    return pipe, ref


@pytest.mark.parametrize("config", [TINY_X4_UPSCALER, SD_X4_UPSCALER], ids=lambda c: c.name)
def test_original_layout_is_detected_as_the_upscaler_with_v_prediction(config):
    inferred = infer_shapes(checkpoint_shapes(config))
    assert inferred.config.name == config.name
    assert inferred.config.prediction == "v"


def test_sd2_is_not_taken_for_the_upscaler():
    assert infer_shapes(checkpoint_shapes("tiny-sd2")).config.name == "tiny-sd2"


def test_diffusers_folder_is_detected_and_has_the_low_res_scheduler(x4):
    pipe, ref = x4
    again = loading.load(ref.folder)
    assert (again.config.name, again.config.prediction) == (pipe.config.name, "v")
    assert ref.config.max_noise_level == TINY_X4_UPSCALER.low_res.max_noise_level
    lr = ref.low_res_scheduler.config
    assert (lr.beta_start, lr.beta_end) == (0.0001, 0.02)


def test_unet_matches_diffusers(x4):
    pipe, ref = x4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 16, 24, generator=g)
    t = torch.tensor([999.0, 321.0])
    context = torch.randn(2, 77, 32, generator=g)
    level = torch.tensor([20, 350])
    with torch.no_grad():
        ours = pipe.unet(x, t, context, level)
        theirs = ref.unet(x, t, encoder_hidden_states=context, class_labels=level).sample
    err = (ours - theirs).abs().max().item()
    assert err <= COMPONENT_TOLERANCE, f"UNet max abs err {err:.2e}"
    with torch.no_grad():  # the noise level matters: a different one changes the output
        other = pipe.unet(x, t, context, torch.tensor([21, 350]))
    assert (other - ours)[0].abs().max() > 100 * COMPONENT_TOLERANCE


def test_vae_with_factor_4_matches_diffusers(x4):
    pipe, ref = x4
    x = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z, z_ref = pipe.vae.encode(x).mode(), ref.vae.encode(x).latent_dist.mode()
        pixels, pixels_ref = pipe.vae.decode(z), ref.vae.decode(z_ref).sample
    assert z.shape[-2:] == (8, 10)
    err = max((z - z_ref).abs().max().item(), (pixels - pixels_ref).abs().max().item())
    assert err <= COMPONENT_TOLERANCE, f"VAE max abs err {err:.2e}"
    assert ref.vae.config.scaling_factor == pipe.config.latent_format.scale_factor == 0.08333


# --- the pipeline against diffusers' StableDiffusionUpscalePipeline ---------------------------

LOW = 16  # input side: the latent is as large, the output 4x


def _low_res_image(seed: int = 5) -> Image.Image:
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 256, (LOW, LOW + 8, 3), dtype=np.uint8))


def _x4_params(sampler, **changes) -> GenerationParams:
    settings = {"negative": NEGATIVE, "steps": STEPS, "cfg": CFG, "seed": SEED} | changes
    return GenerationParams(PROMPT, sampler=sampler.sampler, schedule=sampler.schedule, **settings)


def _ours_x4(pipe, sampler, image, noise, latents, level):
    pipe.denoiser.quantize = sampler.quantize
    try:
        return upscale_x4(pipe, image, _x4_params(sampler), noise_level=level,
                          latents=latents, noise=noise)[0]
    finally:
        pipe.denoiser.quantize = False


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("level", [20, 350])
def test_upscale_matches_diffusers(x4, name, level):
    """diffusers draws the augmentation noise first from its generator: we give ours those numbers."""
    pipe, ref = x4
    sampler, image = SAMPLERS[name], _low_res_image()
    noise = torch.randn((1, 3, LOW, LOW + 8), generator=torch.Generator().manual_seed(SEED))
    latent_noise = initial_noise(SEED, (4, LOW, LOW + 8))[None]
    ours = _ours_x4(pipe, sampler, image, noise, _diffusers_start(pipe, sampler, latent_noise), level)
    ref_latents = _with_scheduler(ref, sampler)(
        **REF_ARGS, image=image, noise_level=level, generator=torch.Generator().manual_seed(SEED),
        latents=latent_noise.clone()).images
    assert ours.image.size == (4 * (LOW + 8), 4 * LOW)
    _compare(f"x4 {name} noise level {level}", ours, ref, ref_latents)
    pixel_err = np.abs(np.asarray(ours.image, dtype=np.float64) - _decode(ref, ref_latents)).max()
    assert pixel_err <= 1, f"x4 {name} level {level}: pixel max abs err {pixel_err:.0f}/255 (the bar: 1/255)"


def test_noise_level_and_seed_change_the_image(x4):
    pipe, _ = x4
    image, euler = _low_res_image(), SAMPLERS["euler"]

    def run(level, seed):
        return upscale_x4(pipe, image, _x4_params(euler, seed=seed, steps=3), noise_level=level)[0].latent

    base = run(20, 1)
    assert torch.equal(base, run(20, 1))
    assert (base - run(100, 1)).abs().max() > 1e-3
    assert (base - run(20, 2)).abs().max() > 1e-3


def test_whole_image_tile_is_the_untiled_run_and_small_tiles_stay_close(x4):
    pipe, _ = x4
    image, euler = _low_res_image(), SAMPLERS["euler"]
    params = _x4_params(euler, steps=3)
    whole = upscale_x4(pipe, image, params)[0]
    one_tile = upscale_x4(pipe, image, params, tiling=X4Tiling(tile=32, overlap=8))[0]
    assert torch.equal(whole.latent, one_tile.latent)
    tiles = upscale_x4(pipe, image, params, tiling=X4Tiling(tile=16, overlap=4))[0]
    err = (tiles.latent - whole.latent).abs().max().item()
    scale = whole.latent.abs().max().item()
    assert 0 < err < 0.5 * scale, f"16-px tiles: latent max abs err {err:.3f} of {scale:.3f}"


def test_bad_inputs_fail_in_one_line(x4):
    pipe, _ = x4
    with pytest.raises(ValueError, match="noise level must be in"):
        upscale_x4(pipe, _low_res_image(), GenerationParams("a"), noise_level=351)
    with pytest.raises(ValueError, match="multiples of 4"):
        upscale_x4(pipe, Image.new("RGB", (10, 16)), GenerationParams("a"))
    with pytest.raises(ValueError, match="x4 tiles"):
        X4Tiling(tile=20)


# --- the CLI -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def x4_file(tmp_path_factory):
    """A random tiny x4 checkpoint as a user would write it (`openldm init`), and a 24x16 input."""
    tmp = tmp_path_factory.mktemp("x4cli")
    assert cli.main(["init", "tiny-x4-upscaler", str(tmp / "x4.safetensors"), "--seed", "3"]) == 0
    _low_res_image().save(tmp / "small.png")
    return tmp / "x4.safetensors", tmp / "small.png"


def test_cli_upscale_writes_the_4x_image_and_info_names_the_model(x4_file, tmp_path, capsys):
    model, small = x4_file
    out = tmp_path / "big.png"
    argv = ["upscale", small, "a castle", "--model", model, "--noise-level", "30", "--steps", "2",
            "--tile", "16", "--tile-overlap", "4", "--seed", "7", "-o", out]
    assert cli.main([str(a) for a in argv]) == 0
    big = Image.open(out)
    assert big.size == (4 * (LOW + 8), 4 * LOW)
    assert "Seed: 7" in big.info["parameters"]
    capsys.readouterr()
    assert cli.main(["info", str(model)]) == 0
    assert "tiny-x4-upscaler" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["txt2img", "a castle"], "is an x4 upscaler: it only upscales"),
    (["upscale", "{small}", "a castle", "--noise-level", "400"], "noise level must be in [0, 350]"),
    (["upscale", "{small}", "a castle", "--tile", "20"], "x4 tiles must be a multiple of 8"),
])
def test_cli_bad_x4_input_is_one_line(x4_file, tmp_path, capsys, argv, message):
    model, small = x4_file
    argv = [a.format(small=small) for a in argv]
    assert cli.main([*argv, "--model", str(model), "--steps", "1", "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err.strip().splitlines()[-1], err


def test_hires_fix_with_the_x4_model_as_its_upscaler(x4_file, tmp_path, capsys):
    """The hires fix of a tiny SD2 image, enlarged by the x4 model; without the model, one line."""
    x4_model, _ = x4_file
    base = tmp_path / "sd2.safetensors"
    assert cli.main(["init", "tiny-sd2", str(base), "--seed", "1"]) == 0
    Image.new("RGB", (16, 16), (200, 40, 40)).save(tmp_path / "in.png")
    common = ["upscale", str(tmp_path / "in.png"), "a castle", "--model", str(base), "--steps", "2",
              "--scale", "2"]
    out = tmp_path / "big.png"
    assert cli.main([*common, "--hires-upscaler", str(x4_model), "-o", str(out)]) == 0
    big = Image.open(out)
    assert big.size == (32, 32) and "Hires upscaler: x4" in big.info["parameters"]
    assert cli.main([*common, "--upscaler", "x4", "-o", str(tmp_path / "o.png")]) == 2
    assert "needs an x4-upscaler model" in capsys.readouterr().err.strip().splitlines()[-1]
    assert cli.main([*common, "--hires-upscaler", str(base), "-o", str(tmp_path / "o.png")]) == 2
    assert "is not an x4-upscaler model" in capsys.readouterr().err.strip().splitlines()[-1]


# --- what the PNG records, and the memory check -------------------------------------------------

def test_x4_png_records_noise_level_tiles_and_its_mode(x4_file, tmp_path):
    model, small = x4_file
    out = tmp_path / "big.png"
    argv = ["upscale", small, "a castle", "--model", model, "--noise-level", "30", "--steps", "1",
            "--tile", "16", "--tile-overlap", "4", "--seed", "7", "-o", out]
    assert cli.main([str(a) for a in argv]) == 0
    _, _, settings = parse_infotext(Image.open(out).info["parameters"])
    assert (settings["Noise level"], settings["x4 tile"], settings["x4 tile overlap"]) == ("30", "16", "4")
    assert settings["Model"] == "x4" and not {"Denoising strength", "Hires upscale"} & set(settings)
    assert read_settings(out).mode == "x4"


def test_hires_fix_png_names_its_x4_model(x4_file, tmp_path):
    x4_model, _ = x4_file
    base = tmp_path / "sd2.safetensors"
    assert cli.main(["init", "tiny-sd2", str(base), "--seed", "1"]) == 0
    Image.new("RGB", (16, 16), (200, 40, 40)).save(tmp_path / "in.png")
    out = tmp_path / "big.png"
    assert cli.main(["upscale", str(tmp_path / "in.png"), "a castle", "--model", str(base), "--steps", "1",
                     "--scale", "2", "--hires-upscaler", str(x4_model), "-o", str(out)]) == 0
    _, _, settings = parse_infotext(Image.open(out).info["parameters"])
    assert settings["Hires upscaler"] == "x4" and settings["Hires upscaler model"] == "x4"
    assert settings["Hires upscaler hash"] == model_hash(x4_model) and settings["Noise level"] == "20"
    assert read_settings(out).mode == "upscale"


def _checked_sizes(pipe, monkeypatch, image, tiling, **renderer):
    """What `Renderer.check_memory` asks `memory.check_fits` about for an x4 upscale of `image`."""
    seen = {}
    monkeypatch.setattr(render, "check_fits", lambda config, **kw: seen.update(kw))
    Renderer(pipe, "x4", "0", **renderer).check_memory(
        "upscale", GenerationParams("a", upscale_by=2.0), image, x4=X4Settings(tiling=tiling))
    return seen


def test_memory_check_counts_the_x4_output_and_its_tiles(x4, monkeypatch):
    pipe, _ = x4
    seen = _checked_sizes(pipe, monkeypatch, _low_res_image(), X4Tiling(16, 4))
    assert (seen["width"], seen["height"]) == (4 * (LOW + 8), 4 * LOW)  # the model's 4, not upscale_by
    tiling = seen["tiling"]
    assert (seen["unet_tile"], tiling.mode, tiling.tile_size, seen["encode"]) == (16, "on", 16, False)
    weights = sum(p.numel() * p.element_size() for m in (pipe.unet, pipe.vae) for p in m.parameters())
    assert seen["weights"] > weights  # the text encoder's too
    with_upscaler = _checked_sizes(pipe, monkeypatch, _low_res_image(), X4Tiling(16, 4), upscaler=pipe)
    assert with_upscaler["weights"] == 2 * seen["weights"]  # a loaded hires upscaler counts


def test_memory_check_lets_tiles_fit_where_the_whole_image_does_not(x4, monkeypatch):
    """A budget between the tiled and the whole estimate of a 256 -> 1024 px upscale: tiles pass."""
    pipe, _ = x4
    tiled = estimate_peak(pipe.config, width=1024, height=1024, unet_tile=32, vae_tile=32, encode=False)
    whole = estimate_peak(pipe.config, width=1024, height=1024, encode=False)
    assert tiled.unet < whole.unet / 4 and tiled.total < whole.total
    monkeypatch.setattr(memory, "memory_budget", lambda device: (tiled.total + whole.total) // 2)
    image = Image.new("RGB", (256, 256))
    renderer = Renderer(pipe, "x4", "0")
    params = GenerationParams("a", upscale_by=2.0)
    renderer.check_memory("upscale", params, image, x4=X4Settings(tiling=X4Tiling(32, 8)))
    with pytest.raises(memory.MemoryLimitError, match="1024x1024, batch 1 needs about"):
        renderer.check_memory("upscale", params, image, x4=X4Settings(tiling=X4Tiling(None)))


# --- full size: memory of a 512 px -> 2048 px upscale in tiles (slow) --------------------------

_FULL_SIZE_RUN = """
import resource, sys, time, torch
from PIL import Image
from openldm.checkpoints.load import Components, build_component
from openldm.config import SD_X4_UPSCALER as C
from openldm.pipelines.params import GenerationParams
from openldm.pipelines.pipeline import Pipeline
from openldm.pipelines.x4 import X4Tiling, upscale_x4
torch.manual_seed(0)
parts = {n: build_component(n, C, "cpu").eval() for n in ("unet", "vae", "text_encoder")}
pipe = Pipeline(Components(C, parts["unet"], parts["vae"], [parts["text_encoder"]]))
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
image = Image.new("RGB", (512, 512), (90, 120, 200))
out = upscale_x4(pipe, image, GenerationParams("a lake", steps=1, cfg=1.0, seed=1), noise_level=20,
                 tiling=X4Tiling(int(sys.argv[1]), 16))[0].image
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(out.size, loaded, peak, round(time.perf_counter() - start))
"""


@pytest.mark.slow
def test_full_size_512_to_2048_fits_in_tiles(tmp_path):
    """A random full-size x4 upscaler, 512x512 -> 2048x2048, one step without CFG, tiles of 128 px:
    peak RSS stays within a few GiB of the weights (the untiled UNet and decode would need far more)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _FULL_SIZE_RUN, "128"], capture_output=True, text=True,
                          check=True)
    size, loaded, peak, seconds = done.stdout.strip().rsplit("\n", 1)[-1].rsplit(" ", 3)
    loaded_gib, peak_gib = int(loaded) / 2**20, int(peak) / 2**20
    print(f"x4 512->2048 tiled: {size}, weights loaded {loaded_gib:.1f} GiB, peak RSS {peak_gib:.1f} GiB, "
          f"{seconds} s")
    assert size == "(2048, 2048)"
    over = peak_gib - loaded_gib
    assert over < 6, f"peak RSS {peak_gib:.1f} GiB, {over:.1f} GiB over the weights"
