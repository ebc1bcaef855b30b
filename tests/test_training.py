"""Training on tiny presets: configs, schedules, EMA, losses that fall, exact resume, exports, the CLI.

Runs are a few steps at 16-32 px so the file stays fast on a busy CPU. Measured on the 2-core
development machine: the VAE's reconstruction loss (L2, 32 px, 40 steps) fell 6.6x (test: >= 3x);
the LDM's loss on a fixed evaluation batch fell 1.005 -> 0.242 after 16 steps (test: < 0.7x).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from openldm.checkpoints.io import read_state_dict
from openldm.cli import main
from openldm.config import get_preset
from openldm.diffusion.denoisers import DiscreteDenoiser, get_scalings, get_target
from openldm.diffusion.samplers import append_dims
from openldm.diffusion.schedules import DiscreteSchedule
from openldm.models.vae import AutoencoderKL
from openldm.pipelines.loading import load as load_pipeline
from openldm.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from openldm.training.config import SHIPPED, ConfigError, OptimConfig, load_config
from openldm.training.data import BatchStream, FolderSource
from openldm.training.discriminator import NLayerDiscriminator, adaptive_weight, hinge_d_loss
from openldm.training.ldm import perturb
from openldm.training.logs import image_grid
from openldm.training.loop import MAIN, Distributed, History, Trainer, log_summary
from openldm.training.optim import EMA, lr_factor
from openldm.training.run import make_task, train
from openldm.training.vae import VAE_FILE, load_vae_into, loss_unit
from tests.training_helpers import (
    fixed_loss,
    make_config,
    make_trainer,
    one_thread_and_one_clip_tokenizer,  # noqa: F401 (an autouse fixture)
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def keep_threads():
    """`run.threads` sets torch's thread count process-wide; put it back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --- configs ---------------------------------------------------------------------------------

BAD_CONFIGS = {  # what is wrong -> (YAML, TOML, words the error must contain)
    "unknown key": ("optim:\n  lr: 0.001\n  lrr: 2\n", "[optim]\nlr = 0.001\nlrr = 2\n",
                    ["optim", "lrr", "valid keys"]),
    "unknown section": ("optimizer:\n  lr: 0.001\n", "[optimizer]\nlr = 0.001\n",
                        ["optimizer", "unknown section"]),
    "wrong type": ("run:\n  steps: ten\n", "[run]\nsteps = \"ten\"\n", ["run.steps", "expected int", "ten"]),
    "bad choice": ("optim:\n  schedule: cosin\n", "[optim]\nschedule = \"cosin\"\n",
                   ["optim.schedule", "'cosin'", "'cosine'"]),
}


def test_varied_shapes_captions_change_with_the_stream_position_and_stay_reproducible(tmp_path):
    from openldm.data.phrasing import read_prompt
    from openldm.training.data import make_source

    config = make_config(tmp_path, "ldm", data={"length": 4, "captions": "varied"})
    stream = BatchStream(make_source(config.data), config.data, seed=1, batch_size=4, load_images=False)
    epochs = [stream(step).captions for step in range(30)]  # the same 4 images, phrased anew each epoch
    assert epochs == [stream(step).captions for step in range(30)]
    by_image = {}
    for step in range(30):
        batch = stream(step)
        for index, text in zip(batch.indices, batch.captions):
            by_image.setdefault(index, set()).add(text)
            scene = stream.source.dataset.scene(index)[0]
            assert read_prompt(text).shapes[0].kind == scene.shapes[0].kind  # a caption of that image
    assert min(len(texts) for texts in by_image.values()) > 10
    template = make_config(tmp_path, "ldm", data={"length": 4})
    fixed = BatchStream(make_source(template.data), template.data, seed=1, batch_size=4, load_images=False)
    first = fixed(0)
    assert all(t == fixed.source.dataset.scene(i)[0].caption for i, t in zip(first.indices, first.captions))
    with pytest.raises(ConfigError, match="data.captions 'varied' needs source: shapes"):
        make_config(tmp_path, "ldm", data={"source": "folder", "path": str(tmp_path), "captions": "varied"})


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
@pytest.mark.parametrize("problem", sorted(BAD_CONFIGS))
def test_config_errors_name_the_problem(tmp_path, suffix, problem):
    yaml_text, toml_text, words = BAD_CONFIGS[problem]
    path = tmp_path / f"config{suffix}"
    path.write_text(yaml_text if suffix == ".yaml" else toml_text)
    with pytest.raises(ConfigError) as error:
        load_config(path, kind="vae")
    assert str(path) in str(error.value)
    for word in words:
        assert word in str(error.value), f"{word!r} missing from: {error.value}"


def test_yaml_and_toml_read_the_same(tmp_path):
    (tmp_path / "a.yaml").write_text("kind: ldm\noptim:\n  betas: [0.8, 0.9]\n  grad_clip: null\n"
                                     "run:\n  steps: 7\n")
    (tmp_path / "a.toml").write_text("kind = \"ldm\"\n[optim]\nbetas = [0.8, 0.9]\n[run]\nsteps = 7\n")
    from_yaml, from_toml = load_config(tmp_path / "a.yaml"), load_config(tmp_path / "a.toml")
    assert from_yaml.optim.betas == from_toml.optim.betas == (0.8, 0.9)
    assert from_yaml.run.steps == from_toml.run.steps == 7
    assert from_yaml.optim.grad_clip is None and from_toml.optim.grad_clip == OptimConfig().grad_clip


# --- schedules and EMA -----------------------------------------------------------------------

def test_warmup_then_cosine_to_the_floor():
    f = lr_factor(OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    after = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:])), "cosine must not rise after the warm-up"
    assert f(10) == pytest.approx(1.0) and f(110) == pytest.approx(0.1)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos(pi / 2) = 0


def test_linear_restarts_and_ldm_lambda_linear():
    linear = lr_factor(OptimConfig(schedule="linear", warmup_steps=0), total_steps=100)
    assert [linear(s) for s in (0, 50, 100)] == pytest.approx([1.0, 0.5, 0.0])
    restarts = lr_factor(OptimConfig(schedule="cosine_restarts", restarts=2), total_steps=100)
    assert restarts(49) < 0.01 and restarts(50) == pytest.approx(1.0)  # the second cycle starts again
    ldm = lr_factor(OptimConfig(schedule="lambda_linear", warmup_steps=1000), total_steps=5000)
    assert ldm(0) == pytest.approx(1e-6) and ldm(500) == pytest.approx(0.5, abs=1e-6)
    assert ldm(1000) == ldm(4999) == 1.0


def test_scheduler_drives_the_optimizer_lr(tmp_path):
    trainer = make_trainer(make_config(tmp_path, "vae", optim={"lr": 0.01, "warmup_steps": 4}))
    lrs = []
    for _ in range(3):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()  # no gradients: changes nothing, keeps the scheduler's call order
        trainer.scheduler.step()
    assert lrs == pytest.approx([0.0025, 0.005, 0.0075])


def test_ema_matches_a_hand_computation():
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = EMA([weight], decay=0.9)
    shadow = weight.detach().clone()
    for n, value in enumerate(([3.0, 0.0], [5.0, 1.0], [-1.0, 4.0])):
        weight.data = torch.tensor(value)
        ema.update()
        decay = min(0.9, (1 + n) / (10 + n))  # 0.1, 0.1818..., 0.25: the warm-up
        shadow = decay * shadow + (1 - decay) * torch.tensor(value)
    torch.testing.assert_close(ema.shadow[0], shadow)
    fixed = EMA([weight], decay=0.9, warmup=False)
    weight.data = torch.tensor([0.0, 0.0])
    fixed.update()
    torch.testing.assert_close(fixed.shadow[0], 0.9 * torch.tensor([-1.0, 4.0]))
    ema.copy_to([weight])
    assert torch.equal(weight.detach(), ema.shadow[0])


# --- losses fall -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """40 steps of the tiny-sd1 VAE on two 32 px shapes images (L2: the loss that falls fastest)."""
    folder = tmp_path_factory.mktemp("vae")
    config = make_config(folder, "vae", data={"image_size": 32, "length": 2},
                         optim={"lr": 2e-3, "weight_decay": 0.0}, run={"steps": 40, "log_every": 10},
                         vae={"reconstruction": "l2"})
    torch.manual_seed(config.run.seed)
    fresh = make_task(config, Distributed())
    before = fixed_loss(fresh, fresh.stream)
    trainer, exported = train(config)
    return config, trainer, exported, before


def test_vae_loss_falls_threefold(vae_run):
    _, trainer, _, before = vae_run
    after = fixed_loss(trainer.task, trainer.task.stream)
    assert before / after >= 3, f"reconstruction loss {before:.1f} -> {after:.1f}: only x{before / after:.2f}"


def test_trained_vae_file_loads_back(vae_run, tmp_path):
    config, trainer, exported, _ = vae_run
    assert exported[0].name == VAE_FILE
    vae = AutoencoderKL(get_preset("tiny-sd1").vae)
    load_vae_into(vae, exported[0])
    for key, value in trainer.task.model.state_dict().items():
        assert torch.equal(vae.state_dict()[key], value), key
    ldm = make_task(make_config(tmp_path, "ldm", ldm={"vae": str(exported[0])}), Distributed())
    assert torch.equal(ldm.vae.decoder.conv_out.weight, trainer.task.model.decoder.conv_out.weight)


@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory):
    """16 steps of the tiny-sd1 UNet at 16 px (standard CLIP tokenizer), samples at the last step."""
    folder = tmp_path_factory.mktemp("ldm")
    config = make_config(folder, "ldm", data={"length": 64}, optim={"lr": 3e-3},
                         run={"steps": 16, "batch_size": 4, "log_every": 4, "sample_every": 16,
                              "sample_steps": 2})
    torch.manual_seed(config.run.seed)
    fresh = make_task(config, Distributed())
    evaluation = BatchStream(fresh.source, config.data, seed=123, batch_size=16)
    before = fixed_loss(fresh, evaluation)
    trainer, exported = train(config)
    return config, trainer, exported, before, fixed_loss(trainer.task, evaluation)


def test_ldm_loss_falls(ldm_run):
    _, trainer, _, before, after = ldm_run
    assert after < 0.7 * before, f"LDM loss on a fixed batch {before:.4f} -> {after:.4f}"


def test_exported_ldm_generates_like_the_trained_model_and_samples_match(ldm_run):
    """The single file loads in the generation pipeline and draws exactly what the run drew."""
    config, trainer, exported, _, _ = ldm_run
    pipeline = load_pipeline(exported[0].parent)
    for key, value in trainer.task.unet.state_dict().items():
        assert torch.equal(pipeline.unet.state_dict()[key], value), key
    captions = [trainer.task.stream.source_caption(i) for i in range(4)]
    images = [pipeline.txt2img(c, steps=2, seed=config.run.seed + i, width=16, height=16)[0]
              for i, c in enumerate(captions)]
    written = Image.open(Path(config.run.output_dir) / "samples" / "step-00000016.png")
    assert written.size == (32, 32)
    assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(image_grid(images)))
    assert trainer.task.unet.training, "sampling must hand the UNet back in training mode"


def test_metrics_log_every_logged_step(ldm_run):
    config, trainer, _, _, _ = ldm_run
    lines = (Path(config.run.output_dir) / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == trainer.history.steps == [1, 4, 8, 12, 16]
    assert [r["loss"] for r in rows] == trainer.history.losses
    assert all(r["samples_per_s"] > 0 and math.isfinite(r["grad_norm"]) for r in rows)


def test_summary_runs_from_the_first_step_to_the_last(tmp_path, capsys):
    """A run shorter than log_every still logs its first and last steps, and says what the loss counts."""
    config = make_config(tmp_path, "vae", run={"steps": 3, "log_every": 25})
    assert make_trainer(config).fit().steps == [1, 3]
    summary = log_summary(History([1, 20], [9000.0, 4500.0]))
    assert summary == "loss 9000 (step 1) -> 4500 (step 20), x2.00 lower"
    assert log_summary(History([1], [7.0]), "u") == "loss 7 at step 1, the only step logged (u)"
    assert "768 values" in loss_unit(config)  # 3 x 16 x 16
    train(replace(config, run=replace(config.run, output_dir=str(tmp_path / "two"), steps=2)))
    out, err = capsys.readouterr()
    assert "loss" in out and "(step 1) -> " in out and "(step 2)" in out and "768 values" in out
    assert "latent statistics" in err and "8/8" in err, "the statistics pass needs a progress bar"


SHIPPED_NAMES = ("shapes-ldm", "shapes-ldm-phrasing", "shapes-ldm-phrasing-2", "shapes-vae")


def test_shipped_configs_load_by_name_and_by_path(tmp_path, monkeypatch):
    """Package data, so a plain `pip install` has them; by name they act as if in the working directory."""
    monkeypatch.chdir(tmp_path)
    assert sorted(p.stem for p in SHIPPED.glob("*.yaml")) == list(SHIPPED_NAMES)
    for name in SHIPPED_NAMES:
        kind = name.split("-")[1]
        by_name, by_path = load_config(name, kind), load_config(SHIPPED / f"{name}.yaml", kind)
        assert by_name.run == by_path.run and by_name.run.output_dir == f"runs/{name}"
    assert load_config("shapes-ldm", "ldm").ldm.vae == str(tmp_path / "runs/shapes-vae/vae.safetensors")
    assert load_config(SHIPPED / "shapes-ldm.yaml", "ldm").ldm.tokenizer == "captions"
    with pytest.raises(ConfigError, match=f"shipped configs: {', '.join(SHIPPED_NAMES)}"):
        load_config("shapes-vea", "vae")


def test_relative_paths_start_from_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    (folder / "c.yaml").write_text(yaml.safe_dump({
        "data": {"source": "folder", "path": "../images"}, "run": {"output_dir": "runs/x"},
        "vae": {"init": "/abs/vae.safetensors", "lpips_weights": ["vgg.pth", "../lin.pth"]}}))
    monkeypatch.chdir(tmp_path)
    config = load_config("project/configs/c.yaml", "vae")
    assert Path(config.data.path).resolve() == tmp_path / "project" / "images"
    assert [Path(p).resolve() for p in config.vae.lpips_weights] == [folder / "vgg.pth",
                                                                      tmp_path / "project" / "lin.pth"]
    assert config.vae.init == "/abs/vae.safetensors" and config.run.output_dir == "runs/x"


def test_tensorboard_scalars_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = make_config(tmp_path, "vae", run={"steps": 2})
    make_trainer(config).fit()
    events = EventAccumulator(str(Path(config.run.output_dir) / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]


# --- exact resume ----------------------------------------------------------------------------

class Crash(Exception):
    pass


def crash_at(trainer: Trainer, step: int) -> None:
    """Make `fit` die (like a killed process) when it is about to run `step`."""
    run_step = trainer.train_step

    def train_step():
        if trainer.step == step:
            raise Crash
        return run_step()

    trainer.train_step = train_step


def assert_identical(a, b, where: str = "state") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs by {(a.double() - b.double()).abs().max().item():.3g}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


RESUMED_RUNS = {
    "vae": {"vae": {"disc_weight": 0.5, "disc_start": 1, "disc_layers": 2, "disc_channels": 8}},
    "ldm": {"ldm": {"offset_noise": 0.1, "input_perturbation": 0.1, "min_snr_gamma": 5.0}},
}


@pytest.mark.parametrize("kind", sorted(RESUMED_RUNS))
def test_resume_after_a_crash_is_bit_identical(tmp_path, kind):
    common = {"optim": {"ema_decay": 0.9, "grad_accum": 2, "schedule": "cosine", "warmup_steps": 1},
              "run": {"batch_size": 1, "checkpoint_every": 2}, **RESUMED_RUNS[kind]}
    straight = make_trainer(make_config(tmp_path / "straight", kind, **common))
    straight.fit()
    config = make_config(tmp_path / "crashed", kind, **common)
    crashed = make_trainer(config)
    crash_at(crashed, 3)
    with pytest.raises(Crash):
        crashed.fit()
    resumed = make_trainer(config)  # a new process would build everything afresh
    assert resumed.resume() and resumed.step == 2
    resumed.fit()
    mine, theirs = straight.state_dict(), resumed.state_dict()
    mine.pop("config"), theirs.pop("config")  # differ in output_dir only
    assert_identical(mine, theirs)
    if kind == "vae":
        assert mine["auxiliary"]["disc"]["optimizer"]["state"], "the discriminator should have trained"


def test_killed_command_line_run_resumes_bit_identically(tmp_path, keep_threads):
    """SIGKILL `openldm train vae` after its first checkpoint, `--resume` it, compare with a clean run."""
    settings = {"kind": "vae", "data": {"image_size": 16, "length": 8}, "optim": {"lr": 1e-3},
                "run": {"steps": 8, "batch_size": 2, "checkpoint_every": 2, "threads": 1,
                        "output_dir": str(tmp_path / "killed"), "deterministic": True},
                "vae": {"preset": "tiny-sd1"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    command = [sys.executable, "-m", "openldm.cli", "train", "vae", str(path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(tmp_path / "log.txt", "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 300
        while not list_checkpoints(tmp_path / "killed") and process.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
    saved = list_checkpoints(tmp_path / "killed")
    assert saved, (tmp_path / "log.txt").read_text()
    stopped_at = saved[-1][0]
    assert stopped_at < 8 and not (tmp_path / "killed" / VAE_FILE).exists(), "the run ended before the kill"
    again = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    # the clean run in a fresh process too: each process sets the deterministic mode before MKL's first call
    clean = subprocess.run([*command, "--output-dir", str(tmp_path / "clean")], env=env, capture_output=True,
                           text=True)
    assert clean.returncode == 0, clean.stderr[-2000:]
    resumed, _ = read_state_dict(tmp_path / "killed" / VAE_FILE)
    uninterrupted, _ = read_state_dict(tmp_path / "clean" / VAE_FILE)
    assert_identical(resumed, uninterrupted, f"weights (killed after step {stopped_at})")


# --- checkpoints -----------------------------------------------------------------------------

def test_keeps_only_the_last_k_checkpoints(tmp_path):
    for step in (1, 2, 3, 4, 5):
        save_checkpoint({"step": step}, tmp_path, step, keep_last=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 5


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")  # fails half-way through writing the file


def test_a_failed_save_leaves_no_partial_checkpoint(tmp_path):
    save_checkpoint({"step": 1, "w": torch.ones(3)}, tmp_path, 1, keep_last=2)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"step": 2, "w": torch.ones(1000), "bad": _Unpicklable()}, tmp_path, 2, keep_last=2)
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["step-00000001.pt"]
    assert torch.equal(load_checkpoint(latest_checkpoint(tmp_path))["w"], torch.ones(3))


# --- the command line ------------------------------------------------------------------------

def _cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    code, err = _cli(capsys, "train", "vae", tmp_path / "missing.yaml")
    assert code == 2 and "no such config file" in err and err.count("\n") == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  stepz: 3\n")
    code, err = _cli(capsys, "train", "vae", bad)
    assert code == 2 and "stepz" in err and err.count("\n") == 1
    good = tmp_path / "good.yaml"
    run = {"output_dir": str(tmp_path / "run"), "steps": 1, "batch_size": 1, "deterministic": False}
    good.write_text(yaml.safe_dump({"data": {"image_size": 16, "length": 4}, "run": run}))
    save_checkpoint({"step": 1}, tmp_path / "run", 1, keep_last=1)
    code, err = _cli(capsys, "train", "vae", good)
    assert code == 2 and "--resume" in err and err.count("\n") == 1


# --- folder data -----------------------------------------------------------------------------

def _image(path: Path, colour: tuple[int, int, int], size=(20, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_folder_source_reads_captions_recursively_and_skips_corrupt_images(tmp_path):
    root = tmp_path / "images"
    _image(root / "a.png", (255, 0, 0))
    (root / "a.txt").write_text("a red picture\n")
    _image(root / "sub" / "b.jpg", (0, 255, 0))
    _image(root / "sub" / "deeper" / "c.webp", (0, 0, 255))
    (root / "sub" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "b.jpg", "text": "green"}) + "\n"
        + json.dumps({"file_name": "deeper/c.webp", "caption": "blue"}) + "\n")
    (root / "sub" / "broken.png").write_bytes(b"\x89PNG not really")
    config = make_config(tmp_path, "vae", data={"source": "folder", "path": str(root)}, run={"steps": 2})
    source = FolderSource(config.data)
    captions = {p.relative_to(root).as_posix(): c for p, c in zip(source.files, source.captions)}
    assert captions == {"a.png": "a red picture", "sub/b.jpg": "green", "sub/broken.png": "",
                        "sub/deeper/c.webp": "blue"}
    stream = BatchStream(source, config.data, seed=0, batch_size=4)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        batch = stream(0)
    broken = source.files.index(root / "sub" / "broken.png")
    assert broken not in batch.indices and batch.images.shape == (4, 3, 16, 16)
    trainer = make_trainer(config)
    with pytest.warns(UserWarning, match="unreadable"):
        trainer.fit()
    assert trainer.step == 2 and all(math.isfinite(x) for x in trainer.history.losses)


def test_buckets_batch_one_shape_and_split_across_ranks(tmp_path):
    root = tmp_path / "images"
    shapes = {"wide": (60, 30), "tall": (30, 60), "square": (40, 40)}
    for name, size in shapes.items():
        for i in range(4):
            _image(root / f"{name}{i}.png", (60 * i, 100, 0), size)
    data = {"source": "folder", "path": str(root), "image_size": 32, "buckets": True, "bucket_step": 8,
            "random_crop": True, "flip": True}
    config = make_config(tmp_path, "vae", data=data, run={"steps": 2})
    source = FolderSource(config.data)
    stream = BatchStream(source, config.data, seed=0, batch_size=2)
    bucket = {"wide": (40, 24), "tall": (24, 40), "square": (32, 32)}  # (width, height) for 32 x 32 px
    shown = []
    for step in range(12):  # two epochs of 3 buckets x 2 batches
        batch = stream(step)
        kinds = {source.files[i].stem.rstrip("0123") for i in batch.indices}
        assert len(kinds) == 1, f"batch {step} mixes {kinds}"
        width, height = bucket[kinds.pop()]
        assert batch.images.shape == (2, 3, height, width)
        shown += batch.indices
    assert sorted(shown[:12]) == sorted(shown[12:]) == list(range(12))  # every image once per epoch
    fresh = BatchStream(FolderSource(config.data), config.data, seed=0, batch_size=2)
    assert torch.equal(fresh(9).images, stream(9).images)  # a resumed run sees the same batches
    whole = BatchStream(source, config.data, seed=0, batch_size=4)(1)
    halves = [BatchStream(source, config.data, seed=0, batch_size=2, rank=r, world=2)(1) for r in (0, 1)]
    assert halves[0].indices + halves[1].indices == whole.indices
    assert torch.equal(torch.cat([h.images for h in halves]), whole.images)
    trainer = make_trainer(config)
    trainer.fit()
    assert trainer.step == 2


# --- the discriminator -----------------------------------------------------------------------

def test_patchgan_has_tamings_shape():
    # taming-transformers NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3): 2,765,633 parameters,
    # state dict keys main.0 ... main.11 (the names ldm checkpoints store under loss.discriminator.*).
    disc = NLayerDiscriminator()
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633
    assert "main.11.weight" in disc.state_dict()
    assert disc(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 2, 2)


def test_hinge_loss_and_adaptive_weight_by_hand():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))  # relu(1-r), relu(1+f)
    w = torch.nn.Parameter(torch.ones(3))
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])
    weight = adaptive_weight((w * a).sum(), (w * b).sum(), w, scale=0.5)
    assert weight.item() == pytest.approx(0.5 * 5.0 / (1.0 + 1e-4))
    assert not weight.requires_grad


def test_discriminator_joins_after_disc_start(tmp_path):
    config = make_config(tmp_path, "vae", run={"steps": 3},
                         vae={"disc_weight": 0.5, "disc_start": 2, "disc_layers": 2, "disc_channels": 8})
    trainer = make_trainer(config)
    task, disc = trainer.task, trainer.auxiliary["disc"].module
    initial = {k: v.clone() for k, v in disc.state_dict().items()}
    for _ in range(2):
        logs = trainer.train_step()
        assert "disc_loss" not in logs
    assert_identical(disc.state_dict(), initial, "discriminator before disc_start")
    batch, seed = task.stream(2), 7
    before, _ = task.loss(batch, torch.Generator().manual_seed(seed), 1)
    losses, parts = task.loss(batch, torch.Generator().manual_seed(seed), 2)
    assert set(losses) == {MAIN, "disc"} and parts["gan_weight"] > 0
    with_gan = before.item() + parts["gan_weight"] * parts["g_loss"]
    assert losses[MAIN].item() == pytest.approx(with_gan, rel=1e-5)
    # each loss reaches only its own optimizer's parameters
    disc_params = list(disc.parameters())
    vae_params = [p for p in task.model.parameters() if p.requires_grad]
    expect_disc = torch.autograd.grad(losses["disc"], disc_params, retain_graph=True)
    expect_vae = torch.autograd.grad(losses[MAIN], vae_params, retain_graph=True)
    trainer._backward(losses, accum=1)
    for param, expected in zip(disc_params + vae_params, expect_disc + expect_vae):
        torch.testing.assert_close(param.grad, expected)
    trainer.optimizer.zero_grad(), trainer.auxiliary["disc"].optimizer.zero_grad()
    logs = trainer.train_step()
    assert "disc_loss" in logs and "g_loss" in logs
    assert any(not torch.equal(v, initial[k]) for k, v in disc.state_dict().items() if v.is_floating_point())


# --- input perturbation ----------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_input_perturbation_moves_the_input_not_the_target(prediction):
    """The network sees x0 + sigma (noise + extra); the target is still that of (x0, noise)."""
    seen = {}

    def model(x, t, **cond):
        seen["x"] = x
        return torch.tanh(x)

    denoiser = DiscreteDenoiser(model, DiscreteSchedule.stable_diffusion(), prediction)
    g = torch.Generator().manual_seed(0)
    x0, noise, extra = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    sigma = torch.tensor([0.1, 1.0, 14.0])
    loss = denoiser.loss(*perturb(x0, noise, extra, sigma, prediction), sigma, reduce=False)
    s = append_dims(sigma, 4)
    c_in = append_dims(get_scalings(prediction, sigma).c_in, 4)
    torch.testing.assert_close(seen["x"], c_in * (x0 + s * (noise + extra)))
    expected = (torch.tanh(seen["x"]) - get_target(prediction, x0, noise, sigma)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss, expected)


def test_input_perturbation_is_used_by_the_ldm_loss(tmp_path):
    task = make_task(make_config(tmp_path, "ldm", ldm={"input_perturbation": 0.5}), Distributed())
    with torch.no_grad():  # a fresh UNet's output conv is zero: it would ignore its input altogether
        task.unet.out[2].weight.normal_(0, 0.1)
    batch = task.stream(0)
    perturbed, _ = task.loss(batch, torch.Generator().manual_seed(3), 0)
    task.options = replace(task.options, input_perturbation=0.0)
    plain, _ = task.loss(batch, torch.Generator().manual_seed(3), 0)
    again, _ = task.loss(batch, torch.Generator().manual_seed(3), 0)
    assert plain.item() == again.item() != perturbed.item()
