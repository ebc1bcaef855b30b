"""Offload: the schedule of moves (recorded on the CPU), unchanged images, the one-line refusal off CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_checkpoint

from openldm.engines.offload import enable_offload, pipeline_modules, unet_blocks
from openldm.pipelines.loading import load
from openldm.pipelines.params import SettingsError
from openldm.pipelines.render import load_renderer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("offload"), "tiny-sd1")


def _images(pipe) -> np.ndarray:
    return np.stack([np.asarray(i) for i in pipe.txt2img("a red square", steps=2, seed=3)])


def _recorder(pipe):
    names = {id(m): n for n, m in pipeline_modules(pipe).items()}
    names |= {id(b): f"unet.{i}" for i, b in enumerate(unet_blocks(pipe.unet))}
    moves: list[tuple[str, str]] = []

    def move(module, device):
        moves.append((names[id(module)], device))
        module.to("cpu")  # the stand-in for the GPU: the images must not change

    return moves, move


def test_model_offload_keeps_only_the_running_component_on_the_device(checkpoint, one_thread):
    pipe = load(checkpoint)
    want = _images(pipe)
    moves, move = _recorder(pipe)
    hooks = enable_offload(pipeline_modules(pipe), "model", "cpu:0", move)  # cpu:0 stands in for the GPU
    pipe.prompt_cache.clear()  # else the repeated prompts skip the text encoder
    got = _images(pipe)
    hooks.remove()
    assert np.array_equal(got, want)
    # text encoder in, then out as the UNet comes in (once for all steps), then the VAE replaces the UNet
    assert moves == [("text_encoder_0", "cpu:0"), ("text_encoder_0", "cpu"), ("unet", "cpu:0"),
                     ("unet", "cpu"), ("vae", "cpu:0")], moves


def test_sequential_offload_streams_every_unet_block_each_step(checkpoint, one_thread):
    pipe = load(checkpoint)
    moves, move = _recorder(pipe)
    hooks = enable_offload(pipeline_modules(pipe), "sequential", "cpu:0", move)
    _images(pipe)
    hooks.remove()
    blocks = len(unet_blocks(pipe.unet))
    visits = [m for m in moves if m[0].startswith("unet.")]
    assert len(visits) == 2 * blocks * 2, f"{len(visits)} moves for {blocks} blocks over 2 steps"  # in, out
    assert visits[:2] == [("unet.0", "cpu:0"), ("unet.0", "cpu")]
    assert moves[-1] == ("vae", "cpu")  # nothing stays on the device


def test_offload_off_cuda_is_one_line(checkpoint):
    with pytest.raises(SettingsError, match=r"^--offload model needs CUDA \(the model is on cpu"):
        load_renderer(checkpoint, device="cpu", offload="model")


def test_unknown_offload_mode_is_one_line():
    with pytest.raises(ValueError, match="unknown offload mode 'disk'; one of model, sequential"):
        enable_offload({"unet": torch.nn.Linear(1, 1)}, "disk", "cuda")


def test_offload_with_a_cpu_engine_is_one_line(checkpoint, monkeypatch):
    monkeypatch.setattr("openldm.pipelines.render.device_and_dtype", lambda device, dtype: ("cuda", None))
    with pytest.raises(SettingsError, match="^--offload runs the model on CUDA; --engine openvino runs it"):
        load_renderer(checkpoint, device="cuda", offload="model", engine="openvino")
