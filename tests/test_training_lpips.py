"""LPIPS: torchvision's and LPIPS's names, a hand computation on a tiny random twin, loading the user's
files, and its place in the VAE loss.

The reference below is written with functional ops from the paper's formula and torchvision's VGG16
layout (conv indices), not from `openldm.training.lpips`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from openldm.checkpoints.io import CheckpointError
from openldm.training.config import ConfigError
from openldm.training.lpips import LPIPS, load_lpips
from tests.training_helpers import (
    make_config,
    make_trainer,
    one_thread_and_one_clip_tokenizer,  # noqa: F401 (an autouse fixture)
)

WIDTHS = (4, 6, 8, 8, 8)  # a test-sized twin of VGG16's (64, 128, 256, 512, 512)
# torchvision `vgg16().features`: the conv indices of each stage; a 2x2 max-pool opens stages 2-5.
STAGES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


def _random_weights(widths=WIDTHS, seed: int = 0) -> tuple[dict, dict]:
    """(VGG16 features in torchvision's names, LPIPS heads in LPIPS's names), random, heads >= 0."""
    g = torch.Generator().manual_seed(seed)
    vgg, channels = {}, 3
    for width, stage in zip(widths, STAGES):
        for index in stage:
            weight = torch.randn(width, channels, 3, 3, generator=g)
            vgg[f"features.{index}.weight"] = weight / (9 * channels) ** 0.5
            vgg[f"features.{index}.bias"] = 0.1 * torch.randn(width, generator=g)
            channels = width
    heads = {f"lin{k}.model.1.weight": torch.rand(1, w, 1, 1, generator=g) for k, w in enumerate(widths)}
    return vgg, heads


def _reference(vgg: dict, heads: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    def stage_outputs(image):
        h, outputs = (image - SHIFT) / SCALE, []
        for number, stage in enumerate(STAGES):
            h = F.max_pool2d(h, 2) if number else h
            for index in stage:
                weight, bias = vgg[f"features.{index}.weight"], vgg[f"features.{index}.bias"]
                h = F.relu(F.conv2d(h, weight, bias, padding=1))
            outputs.append(h)
        return outputs

    total = torch.zeros(x.shape[0])
    for k, (a, b) in enumerate(zip(stage_outputs(x), stage_outputs(y))):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        w = heads[f"lin{k}.model.1.weight"].flatten()
        total += torch.einsum("c,bchw->bhw", w, (a - b) ** 2).mean((1, 2))
    return total


@pytest.fixture
def files(tmp_path):
    """The two files a user has: torchvision's VGG16 (with its classifier) and LPIPS's heads (.pth)."""
    vgg, heads = _random_weights()
    save_file({**vgg, "classifier.0.weight": torch.zeros(2, 2)}, tmp_path / "vgg16.safetensors")
    torch.save(heads, tmp_path / "lpips_vgg.pth")
    return [str(tmp_path / "vgg16.safetensors"), str(tmp_path / "lpips_vgg.pth")], vgg, heads


def _images(seed: int, batch: int = 3, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_names_and_shapes_are_torchvisions_vgg16_and_lpips_v01():
    with torch.device("meta"):
        state = LPIPS().state_dict()
    vgg, heads = _random_weights((64, 128, 256, 512, 512))
    shapes = {k: tuple(v.shape) for k, v in {**vgg, **heads}.items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes


def test_equals_a_hand_computation(files):
    paths, vgg, heads = files
    lpips = load_lpips(paths)
    x, y = _images(1), _images(2)
    with torch.no_grad():
        ours, expected = lpips(x, y), _reference(vgg, heads, x, y)
    error = (ours - expected).abs().max().item()
    assert error < 1e-5 * expected.abs().max().item(), f"max abs error {error:.3g} of {expected.tolist()}"
    assert lpips.training is False and not any(p.requires_grad for p in lpips.parameters())


def test_is_zero_on_equal_images_symmetric_and_positive_otherwise(files):
    lpips = load_lpips(files[0])
    x, y = _images(1), _images(2)
    with torch.no_grad():
        assert torch.equal(lpips(x, x), torch.zeros(3))
        forward, backward = lpips(x, y), lpips(y, x)
    assert torch.allclose(forward, backward, rtol=1e-6, atol=0), (forward - backward).abs().max().item()
    assert (forward > 0).all(), forward


def test_one_whole_model_file_in_lpips_own_layout_loads_the_same(files, tmp_path):
    """The `lpips` package's and taming's modules save `net.sliceK.N.*` plus their scaling constants."""
    paths, vgg, heads = files
    renamed = {k.replace("features.", f"net.slice{n + 1}.", 1): v for k, v in vgg.items()
               for n, stage in enumerate(STAGES) if int(k.split(".")[1]) in stage}
    whole = {**renamed, **heads, "scaling_layer.shift": SHIFT, "scaling_layer.scale": SCALE}
    save_file(whole, tmp_path / "lpips_whole.safetensors")
    x, y = _images(3), _images(4)
    with torch.no_grad():
        assert torch.equal(load_lpips(tmp_path / "lpips_whole.safetensors")(x, y), load_lpips(paths)(x, y))


@pytest.mark.parametrize("change, named", [
    (lambda vgg, heads: vgg.pop("features.28.bias"), "features.28.bias"),
    (lambda vgg, heads: heads.pop("lin3.model.1.weight"), "lin0.model.1.weight .. lin4"),
    (lambda vgg, heads: vgg.update({"features.30.weight": torch.zeros(1)}), "features.30.weight"),
    (lambda vgg, heads: vgg.update({"features.0.weight": torch.zeros(4, 1, 3, 3)}), "wrong shape"),
])
def test_missing_unexpected_or_misshapen_weights_are_named(tmp_path, change, named):
    vgg, heads = _random_weights()
    change(vgg, heads)
    save_file({**vgg, **heads}, tmp_path / "lpips.safetensors")
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        load_lpips(tmp_path / "lpips.safetensors")


def test_a_perceptual_weight_without_weight_files_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="vae.perceptual_weight needs vae.lpips_weights"):
        make_config(tmp_path, "vae", vae={"perceptual_weight": 1.0})
    with pytest.raises(ConfigError, match="must not be negative"):
        make_config(tmp_path, "vae", vae={"perceptual_weight": -1.0, "lpips_weights": "x.safetensors"})
    with pytest.raises(CheckpointError, match="no such file"):
        make_trainer(make_config(tmp_path, "vae", vae={"perceptual_weight": 1.0,
                                                       "lpips_weights": str(tmp_path / "missing.pth")}))


def test_vae_loss_adds_the_weighted_distance_and_trains(files, tmp_path):
    paths, _, _ = files
    weight = 0.25
    config = make_config(tmp_path, "vae", run={"steps": 2},
                         vae={"perceptual_weight": weight, "lpips_weights": paths, "sample_posterior": False})
    with_lpips = make_trainer(config)
    without = make_trainer(make_config(tmp_path / "plain", "vae", vae={"sample_posterior": False}))
    batch = with_lpips.task.stream(0)
    (loss, parts), (plain, _) = (t.task.loss(batch, torch.Generator(), 0) for t in (with_lpips, without))
    reconstruction, _ = with_lpips.task.model(batch.images, sample=False)
    distance = with_lpips.task.lpips(reconstruction, batch.images).mean().item()
    pixels = batch.images[0].numel()
    assert parts["lpips"] == pytest.approx(distance, rel=1e-6) and distance > 0
    assert loss.item() - plain.item() == pytest.approx(weight * pixels * distance, rel=1e-4)
    with_lpips.fit()
    losses = torch.tensor(with_lpips.history.losses)
    assert len(losses) == 2 and torch.isfinite(losses).all()
