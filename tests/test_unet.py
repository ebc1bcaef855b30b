"""The UNet against diffusers' `UNet2DConditionModel`, loaded through diffusers' own single-file converter.

Our state dict, given the `model.diffusion_model.` prefix, is exactly what an original checkpoint
holds; if diffusers' converter turns it into a strict load of its model and both compute the same,
our names, shapes and arithmetic are the originals'.
"""

from __future__ import annotations

import logging
import time

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from openldm.checkpoints.layout import UNET_PREFIX
from openldm.config import (
    SD15,
    SDXL_BASE,
    SIZE_EMBED_DIM,
    TINY_SD1,
    TINY_SD1_INPAINT,
    TINY_SD2,
    TINY_SDXL,
    UNetConfig,
)
from openldm.models.unet import UNetModel
from openldm.nn.embeddings import timestep_embedding

TINY = [TINY_SD1, TINY_SD2, TINY_SDXL, TINY_SD1_INPAINT]


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    logging.getLogger("diffusers").setLevel(logging.ERROR)


def diffusers_config(cfg: UNetConfig) -> dict:
    """Our UNetConfig as `UNet2DConditionModel` arguments."""
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    attention = [depth > 0 for depth in cfg.transformer_depth]
    # diffusers takes the middle block's depth from the last level's entry.
    assert cfg.transformer_depth[-1] in (0, cfg.transformer_depth_middle)
    config = {
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "block_out_channels": channels, "layers_per_block": cfg.num_res_blocks,
        "transformer_layers_per_block": [*cfg.transformer_depth[:-1], cfg.transformer_depth_middle],
        "attention_head_dim": [cfg.heads_at(c) for c in channels],  # a head *count* in diffusers
        "cross_attention_dim": cfg.context_dim, "use_linear_projection": cfg.use_linear_in_transformer,
    }
    if cfg.adm_in_channels is not None:
        config |= {
            "addition_embed_type": "text_time", "addition_time_embed_dim": SIZE_EMBED_DIM,
            "projection_class_embeddings_input_dim": cfg.adm_in_channels,
        }
    return config


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (zero-initialised output layers too), scaled to keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if p.ndim > 1:
            p.copy_(noise / p[0].numel() ** 0.5)
        else:
            p.copy_(noise * 0.1 + (1.0 if name.endswith("weight") else 0.0))  # norm scales near 1


def build_pair(cfg: UNetConfig, seed: int = 0) -> tuple[UNetModel, UNet2DConditionModel]:
    """Our UNet with random weights, and diffusers' built from the same weights via its converter."""
    ours = UNetModel(cfg)
    randomize(ours, seed)
    config = diffusers_config(cfg)
    original = {UNET_PREFIX + k: v for k, v in ours.state_dict().items()}
    theirs = UNet2DConditionModel(**config)
    theirs.load_state_dict(convert_ldm_unet_checkpoint(original, config), strict=True)
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    assert n_ours == n_theirs, f"{n_ours} parameters here, {n_theirs} in diffusers"
    return ours.eval(), theirs.eval()


def inputs(cfg: UNetConfig, batch: int, size: int, timesteps: list[float], seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {
        "x": torch.randn(batch, cfg.in_channels, size, size, generator=g),
        "timesteps": torch.tensor(timesteps),
        "context": torch.randn(batch, 7, cfg.context_dim, generator=g),
    }
    if cfg.adm_in_channels is not None:
        pooled = cfg.adm_in_channels - 6 * SIZE_EMBED_DIM
        out["text_embeds"] = torch.randn(batch, pooled, generator=g)
        # (original h, w, crop top, left, target h, w) per sample, distinct so an order mix-up shows
        sizes = torch.tensor([[1024.0, 768, 16, 0, 1024, 1024], [512.0, 896, 0, 48, 832, 1216]])
        out["time_ids"] = sizes[torch.arange(batch) % 2]
    return out


def sdxl_vector(text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """sgm's `y`: pooled text, then each size number embedded alone (ConcatTimestepEmbedderND)."""
    return torch.cat([text_embeds, timestep_embedding(time_ids, SIZE_EMBED_DIM).flatten(1)], dim=1)


@torch.no_grad()
def max_error(ours: UNetModel, theirs: UNet2DConditionModel, a: dict) -> tuple[float, float]:
    """(max abs difference, max abs output) over one forward of each."""
    y, added = None, None
    if "time_ids" in a:
        y = sdxl_vector(a["text_embeds"], a["time_ids"])
        added = {"text_embeds": a["text_embeds"], "time_ids": a["time_ids"]}
    mine = ours(a["x"], a["timesteps"], a["context"], y)
    ref = theirs(a["x"], a["timesteps"], a["context"], added_cond_kwargs=added).sample
    return (mine - ref).abs().max().item(), ref.abs().max().item()


@pytest.mark.parametrize("preset", TINY, ids=lambda p: p.name)
def test_matches_diffusers(preset):
    cfg = preset.unet
    ours, theirs = build_pair(cfg)
    err, scale = max_error(ours, theirs, inputs(cfg, batch=2, size=16, timesteps=[3.0, 741.5]))
    assert scale > 0.1, f"output too small ({scale}) for the comparison to mean anything"
    assert err <= 1e-5, f"{preset.name}: max abs error {err:.3g} (outputs up to {scale:.3g})"


@pytest.mark.parametrize("preset", TINY, ids=lambda p: p.name)
@torch.no_grad()
def test_spatial_transformer_matches_diffusers_on_faint_features(preset):
    """Features with a variance near the norm's epsilon, where 1e-6 and 1e-5 give different answers."""
    cfg = preset.unet
    ours, theirs = build_pair(cfg)
    g = torch.Generator().manual_seed(2)
    x = 1e-3 * torch.randn(2, cfg.model_channels * cfg.channel_mult[-1], 4, 4, generator=g)
    context = torch.randn(2, 7, cfg.context_dim, generator=g)
    mine = ours.middle_block[1](x, context) - x
    ref = theirs.mid_block.attentions[0](x, encoder_hidden_states=context, return_dict=False)[0] - x
    err = ((mine - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-5, f"{preset.name}: max relative error {err:.3g}"


def test_full_size_names_and_sizes_are_the_originals():
    """Built on meta: the released UNets hold 686 and 1680 tensors, 859,520,964 and 2,567,463,684 numbers."""
    with torch.device("meta"):
        sd1, sdxl = (UNetModel(p.unet).state_dict() for p in (SD15, SDXL_BASE))
    assert (len(sd1), sum(v.numel() for v in sd1.values())) == (686, 859_520_964)
    assert (len(sdxl), sum(v.numel() for v in sdxl.values())) == (1680, 2_567_463_684)
    assert sd1["input_blocks.1.1.proj_in.weight"].shape == (320, 320, 1, 1)  # SD1: 1x1 conv
    assert sdxl["input_blocks.4.1.proj_in.weight"].shape == (640, 640)  # SDXL: linear
    assert not any(k.startswith("input_blocks.1.1.") for k in sdxl)  # no attention at level 0
    assert sdxl["label_emb.0.0.weight"].shape == (1280, 2816) and not any("label_emb" in k for k in sd1)
    resampling = {"input_blocks.9.0.op.bias", "output_blocks.2.1.conv.bias", "output_blocks.5.2.conv.bias"}
    assert resampling < set(sd1)  # `.1.conv` after a level without attention, `.2.conv` after one with
    assert "input_blocks.4.0.skip_connection.weight" in sd1  # 320 -> 640 channels
    assert "input_blocks.5.0.skip_connection.weight" not in sd1  # same width: no weights


def test_sdxl_vector_is_sgm_concat_embedding():
    """sgm embeds every number of every size pair alone and concatenates them in order."""
    time_ids = torch.tensor([[1024.0, 768.0, 16.0, 0.0, 1024.0, 1024.0]])
    y = sdxl_vector(torch.zeros(1, 3), time_ids)
    crop_left = y[0, 3 + 3 * SIZE_EMBED_DIM: 3 + 4 * SIZE_EMBED_DIM]
    assert torch.equal(crop_left[: SIZE_EMBED_DIM // 2], torch.ones(SIZE_EMBED_DIM // 2))  # cos(0) first
    assert torch.equal(crop_left[SIZE_EMBED_DIM // 2:], torch.zeros(SIZE_EMBED_DIM // 2))
    width = y[0, 3 + SIZE_EMBED_DIM: 3 + 2 * SIZE_EMBED_DIM]
    assert width[0].item() == pytest.approx(torch.cos(torch.tensor(768.0)).item(), abs=1e-6)


def test_builds_on_meta_and_loads_strictly():
    cfg = TINY_SDXL.unet
    source = UNetModel(cfg)
    randomize(source, seed=3)
    with torch.device("meta"):
        model = UNetModel(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.load_state_dict(source.state_dict(), strict=True, assign=True)
    assert not any(p.is_meta for p in model.parameters())
    a = inputs(cfg, batch=1, size=8, timesteps=[500.0])
    y = sdxl_vector(a["text_embeds"], a["time_ids"])
    with torch.no_grad():
        loaded, built = (m(a["x"], a["timesteps"], a["context"], y) for m in (model, source))
    assert torch.equal(loaded, built)


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = TINY_SDXL.unet
    model = UNetModel(cfg)
    randomize(model, seed=4)
    a = inputs(cfg, batch=2, size=8, timesteps=[10.0, 900.0])
    y = sdxl_vector(a["text_embeds"], a["time_ids"])
    grads = []
    for enabled in (False, True):
        model.set_gradient_checkpointing(enabled)
        model.zero_grad()
        model(a["x"], a["timesteps"], a["context"], y).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(g.abs().sum() > 0 for g in grads[0].values()), "some parameter got no gradient"
    err = max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0])
    assert err <= 1e-6, f"gradients differ with checkpointing: max abs error {err:.3g}"


def test_math_attention_backend_matches_sdpa():
    cfg = TINY_SD2.unet
    model = UNetModel(cfg)
    randomize(model, seed=5)
    a = inputs(cfg, batch=2, size=8, timesteps=[1.0, 999.0])
    with torch.no_grad():
        sdpa = model(a["x"], a["timesteps"], a["context"])
        model.set_attention_backend("math")
        math = model(a["x"], a["timesteps"], a["context"])
    err = (sdpa - math).abs().max().item()
    assert err <= 1e-5, f"math vs sdpa attention: max abs error {err:.3g}"


@pytest.mark.parametrize("size", [(9, 8), (8, 7)])
def test_rejects_latents_that_do_not_halve_evenly(size):
    model = UNetModel(TINY_SD1.unet)
    with pytest.raises(ValueError, match="not a multiple of 2"):
        model(torch.zeros(1, 4, *size), torch.zeros(1), torch.zeros(1, 7, 32))


def test_vector_conditioning_is_required_exactly_when_configured():
    sd1, sdxl = UNetModel(TINY_SD1.unet), UNetModel(TINY_SDXL.unet)
    with pytest.raises(ValueError, match="takes no"):
        sd1(torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, 7, 32), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="needs"):
        sdxl(torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, 7, 64))


@pytest.mark.slow
@pytest.mark.parametrize("preset", [SD15, SDXL_BASE], ids=lambda p: p.name)
def test_full_size_matches_diffusers(preset, monkeypatch):
    """On a GPU when there is one, in true float32 (TF32 off); SDXL needs about 25 GB either way."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # on a CPU-only torch, cuda.matmul has no settable allow_tf32
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cfg = preset.unet
    start = time.perf_counter()
    ours, theirs = (m.to(device) for m in build_pair(cfg))
    built = time.perf_counter() - start
    errors = []
    for t in (999.0, 500.0, 20.0):
        a = {k: v.to(device) for k, v in inputs(cfg, batch=1, size=64, timesteps=[t]).items()}
        errors.append(max_error(ours, theirs, a))
    err, scale = max(e for e, _ in errors), max(s for _, s in errors)
    print(f"{preset.name} on {device}: max abs error {err:.3g}, outputs up to {scale:.3g}, "
          f"built in {built:.0f}s, {time.perf_counter() - start:.0f}s in all")
    assert err <= 1e-4 * max(scale, 1.0), f"{preset.name}: max abs error {err:.3g} (outputs to {scale:.3g})"
