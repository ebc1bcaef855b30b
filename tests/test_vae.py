"""The VAE against diffusers' `AutoencoderKL`, loaded through diffusers' own single-file converter.

Our state dict, given the `first_stage_model.` prefix, is exactly what an original checkpoint holds;
if diffusers' converter turns it into a strict load of its model and both compute the same, our
names, shapes and arithmetic are the originals'.
"""

from __future__ import annotations

import logging
import time

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.models.downsampling import Downsample2D

from openldm.checkpoints.layout import VAE_PREFIX
from openldm.config import TINY_SD1, VAEConfig
from openldm.models.vae import AttnBlock, AutoencoderKL, DiagonalGaussian, ResnetBlock, _starts, tiled

TINY = TINY_SD1.vae
MEDIUM = VAEConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=2)


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    logging.getLogger("diffusers").setLevel(logging.ERROR)


def diffusers_config(cfg: VAEConfig) -> dict:
    """Our VAEConfig as `diffusers.AutoencoderKL` arguments."""
    levels = len(cfg.ch_mult)
    return {
        "in_channels": cfg.in_channels, "out_channels": cfg.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "layers_per_block": cfg.num_res_blocks,
        "latent_channels": cfg.z_channels,
    }


def random_vae(cfg: VAEConfig, seed: int = 0) -> AutoencoderKL:
    """Built on the meta device, then every tensor random (norms and biases too), loaded strictly."""
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, like in model.state_dict().items():
        noise = torch.randn(like.shape, generator=g)
        if like.ndim > 1:
            state[name] = noise / like[0].numel() ** 0.5
        else:
            state[name] = noise * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def diffusers_twin(ours: AutoencoderKL) -> DiffusersAutoencoderKL:
    """diffusers' AutoencoderKL holding our weights, via the original layout and its converter."""
    original = {VAE_PREFIX + k: v for k, v in ours.state_dict().items()}
    config = diffusers_config(ours.cfg)
    converted = convert_ldm_vae_checkpoint(original, config)
    assert len(converted) == len(original), "the converter dropped keys it does not know"
    theirs = DiffusersAutoencoderKL(**config)
    theirs.load_state_dict(converted, strict=True)
    return theirs.eval()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def smooth(shape: tuple[int, ...], coarse: int = 4, seed: int = 0) -> torch.Tensor:
    """Low-frequency noise: bicubic upsampling of a coarse random grid."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(*shape[:2], coarse, coarse, generator=g)
    return F.interpolate(grid, size=shape[-2:], mode="bicubic", align_corners=False)


def check_parity(cfg: VAEConfig, size: tuple[int, int], batch: int = 2) -> dict[str, float]:
    ours = random_vae(cfg, seed=1)
    theirs = diffusers_twin(ours)
    x = torch.rand(batch, cfg.in_channels, *size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        posterior = ours.encode(x)
        dist = theirs.encode(x).latent_dist
        z = dist.mean
        pairs = {
            "mean": (posterior.mean, dist.mean), "logvar": (posterior.logvar, dist.logvar),
            "std": (posterior.std, dist.std), "decode": (ours.decode(z), theirs.decode(z).sample),
        }
    f = cfg.downsample_factor
    assert posterior.mean.shape == (batch, cfg.embed_dim, size[0] // f, size[1] // f)
    errors = {name: max_err(a, b) for name, (a, b) in pairs.items()}
    # float32 rounding grows with the values' size: the medium decode, whose output reaches |3.44|,
    # differs by 1.05e-5 (3.0e-6 of its largest value); the other quantities by 2.6e-6 or less.
    tolerances = {name: 1e-5 * max(1.0, b.abs().max().item()) for name, (_, b) in pairs.items()}
    assert all(errors[n] <= tolerances[n] for n in errors), f"max abs errors vs diffusers: {errors}"
    return errors


@pytest.mark.parametrize(("cfg", "size"), [(TINY, (48, 32)), (MEDIUM, (64, 64))], ids=["tiny", "medium"])
def test_parity_with_diffusers(cfg: VAEConfig, size: tuple[int, int]):
    check_parity(cfg, size)


@pytest.mark.slow
def test_full_size_parity_with_diffusers():
    start = time.perf_counter()
    errors = check_parity(VAEConfig(), (64, 64), batch=1)
    print(f"full-size VAE parity: {errors}, {time.perf_counter() - start:.1f}s")


def test_meta_build_and_original_key_names():
    with torch.device("meta"):
        model = AutoencoderKL(TINY)
    assert all(p.is_meta for p in model.parameters())
    loaded = random_vae(TINY)
    assert not any(p.is_meta for p in loaded.parameters())
    shapes = {k: tuple(v.shape) for k, v in loaded.state_dict().items()}
    # ch=32, ch_mult=(1, 2), one ResnetBlock per encoder level, two per decoder level.
    assert shapes["encoder.down.0.downsample.conv.weight"] == (32, 32, 3, 3)
    assert shapes["encoder.down.1.block.0.nin_shortcut.weight"] == (64, 32, 1, 1)
    assert shapes["encoder.conv_out.weight"] == (8, 64, 3, 3)
    assert shapes["decoder.up.0.block.0.nin_shortcut.weight"] == (32, 64, 1, 1)  # up.0: full resolution
    assert shapes["decoder.up.1.upsample.conv.weight"] == (64, 64, 3, 3)
    assert shapes["decoder.mid.attn_1.q.weight"] == (64, 64, 1, 1)
    assert shapes["quant_conv.weight"] == (8, 8, 1, 1) and shapes["post_quant_conv.weight"] == (4, 4, 1, 1)
    absent = {"encoder.down.1.downsample.conv.weight", "decoder.up.0.upsample.conv.weight",
              "encoder.down.0.block.1.conv1.weight", "decoder.up.0.block.2.conv1.weight"}
    assert not absent & shapes.keys()
    assert "decoder.up.1.block.1.conv2.weight" in shapes


def test_downsample_pads_right_and_bottom_only():
    """floor(n / 2) outputs like diffusers' `Downsample2D(padding=0)`; the first window starts at pixel 0."""
    vae = random_vae(TINY)
    down = vae.encoder.down[0].downsample
    theirs = Downsample2D(32, use_conv=True, out_channels=32, padding=0)
    theirs.conv.load_state_dict(down.conv.state_dict())
    for size, expected in [((7, 9), (3, 4)), ((8, 10), (4, 5))]:
        x = torch.randn(1, 32, *size, generator=torch.Generator().manual_seed(size[0]))
        with torch.no_grad():
            y, reference = down(x), theirs(x)
            first = (down.conv.weight * x[:, None, :, :3, :3]).sum(dim=(2, 3, 4)) + down.conv.bias
        assert y.shape[-2:] == expected and reference.shape == y.shape, (size, y.shape, reference.shape)
        assert max_err(y, reference) < 1e-5, max_err(y, reference)
        assert torch.allclose(y[:, :, 0, 0], first, atol=1e-5), max_err(y[:, :, 0, 0], first)


def test_diagonal_gaussian():
    moments = torch.randn(2, 8, 4, 4) * 3
    moments[:, 4:, 0, 0] = 100.0  # beyond the clamp
    dist = DiagonalGaussian(moments)
    assert dist.logvar.max() == 20.0 and torch.equal(dist.mode(), moments[:, :4])
    assert torch.allclose(dist.std, torch.exp(0.5 * dist.logvar))
    draw = [dist.sample(torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draw[0], draw[1])
    assert not torch.equal(draw[0], dist.sample(torch.Generator().manual_seed(8)))
    # The closed-form KL against N(0, I) is zero exactly there, and positive elsewhere.
    assert torch.equal(DiagonalGaussian(torch.zeros(2, 8, 4, 4)).kl(), torch.zeros(2))
    kl = dist.kl()
    assert kl.shape == (2,) and (kl > 0).all()
    # A Monte-Carlo estimate agrees: E_q[log q(z) - log p(z)].
    small = DiagonalGaussian(torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(3)))
    z = small.mean + small.std * torch.randn(100_000, 1, 2, 2, generator=torch.Generator().manual_seed(4))
    log_ratio = -0.5 * ((z - small.mean) / small.std) ** 2 - small.logvar / 2 + 0.5 * z**2
    estimate = log_ratio.sum(dim=(1, 2, 3)).mean()
    assert abs(estimate - small.kl().item()) < 0.05 * small.kl().item() + 0.02, (estimate, small.kl())


@pytest.mark.parametrize(("size", "tile", "overlap", "unit_in", "unit_out"), [
    ((37, 50), 16, 6, 1, 2),  # decoder-like, sizes no multiple of the stride
    ((74, 100), 16, 6, 2, 1),  # encoder-like
], ids=["up", "down"])
def test_tiled_blends_like_the_untiled_run(size, tile, overlap, unit_in, unit_out):
    """With a pointwise `fn` tiling is exact. With a 3x3 conv only the outermost cell of each tile is
    wrong, and the ramps hide it: measured mean error 1.9-2.3% of the mean |output| (a flat average
    gives 5.8-8.1%, reversed ramps 10-14%)."""
    x = torch.randn(1, 4, *size, generator=torch.Generator().manual_seed(0))
    resize = (lambda t: F.interpolate(t, scale_factor=unit_out, mode="nearest")) if unit_out > 1 else (
        lambda t: F.avg_pool2d(t, unit_in))
    assert max_err(tiled(resize, x, tile=tile, overlap=overlap, unit_in=unit_in, unit_out=unit_out),
                   resize(x)) < 1e-6
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)
    with torch.no_grad():
        whole = resize(conv(x))
        tiles = tiled(lambda t: resize(conv(t)), x, tile=tile, overlap=overlap,
                      unit_in=unit_in, unit_out=unit_out)
    mean_err, scale = (tiles - whole).abs().mean().item(), whole.abs().mean().item()
    assert tiles.shape == whole.shape and mean_err < 0.04 * scale, (mean_err, scale)


def _scaled(cells: slice, unit: int) -> slice:
    return slice(cells.start * unit, cells.stop * unit)


def lone_tile_errors(fn, x: torch.Tensor, whole: torch.Tensor, tile: int, unit_in: int, unit_out: int):
    """Mean abs error of each tile run on its own against the same window of the whole run."""
    errors = []
    for top in _starts(x.shape[-2] // unit_in, tile, 0):
        for left in _starts(x.shape[-1] // unit_in, tile, 0):
            rows, cols = slice(top, top + tile), slice(left, left + tile)
            piece = fn(x[..., _scaled(rows, unit_in), _scaled(cols, unit_in)])
            window = whole[..., _scaled(rows, unit_out), _scaled(cols, unit_out)]
            errors.append((piece - window).abs().mean().item())
    return errors


# Random weights make the tiled VAE far from the untiled one whatever the blending: every GroupNorm
# sees only its tile's statistics. A lone 16x16 tile of a smooth latent differs from the whole decode
# by 75-110% of the mean |image| (iid noise, whose statistics vary less between tiles: 30-48%). So the
# VAE tests take iid inputs and ask that blending overlapping tiles beat every lone tile (measured:
# decode 0.097 vs lone >= 0.164; encode 0.076 vs lone >= 0.118); the blend itself is checked above.


def test_tiled_decode_is_close_to_untiled():
    vae = random_vae(TINY)
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = vae.decode(z)
        tiles = vae.decode(z, tile=16, overlap=8)
        single = vae.decode(z, tile=32)
        lone = lone_tile_errors(vae.decode, z, whole, 16, 1, 2)
    assert torch.equal(single, whole), "a tile covering the whole latent must be the untiled decode"
    mean_err, scale = (tiles - whole).abs().mean().item(), whole.abs().mean().item()
    assert tiles.shape == whole.shape and mean_err < min(lone), (
        f"tiled vs whole: mean abs {mean_err:.4f}, lone tiles {lone}, mean |image| {scale:.4f}")


def test_tiled_decode_runs_tile_by_tile():
    vae = random_vae(TINY)
    seen = []
    vae.decoder.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        image = vae.decode(smooth((2, 4, 24, 40)), tile=16, overlap=4)
    assert image.shape == (2, 3, 48, 80) and torch.isfinite(image).all()
    assert len(seen) == 2 * 3 and all(s == (16, 16) for s in seen), seen  # rows at 0, 8; cols at 0, 12, 24


def test_tiled_encode_is_close_to_untiled():
    vae = random_vae(TINY)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        whole, tiles = vae.encode(x).mean, vae.encode(x, tile=16).mean
        lone = lone_tile_errors(lambda t: vae.encode(t).mean, x, whole, 16, 2, 1)
    mean_err = (tiles - whole).abs().mean().item()
    assert tiles.shape == whole.shape and mean_err < min(lone), (mean_err, lone, whole.abs().mean().item())
    with pytest.raises(ValueError, match="multiple of 2"):
        vae.encode(x[..., :63], tile=16)


def test_sliced_runs_one_sample_at_a_time():
    vae = random_vae(TINY)
    seen = []
    vae.decoder.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).mean
        batched, sliced = vae.decode(z), vae.decode(z, sliced=True)
        moments_err = max_err(vae.encode(x, sliced=True).mean, z)
    assert seen == [3, 1, 1, 1]
    assert max_err(batched, sliced) < 1e-5 and moments_err < 1e-5, (max_err(batched, sliced), moments_err)


def test_attention_backends_agree():
    vae = random_vae(TINY)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        sdpa = vae.decode(z)
        vae.set_attention_backend("math")
        math = vae.decode(z)
    assert max_err(sdpa, math) < 1e-5, max_err(sdpa, math)


def test_gradient_checkpointing_gives_the_same_gradients():
    vae = random_vae(TINY).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    calls = []
    vae.encoder.mid.block_1.conv1.register_forward_hook(lambda *_: calls.append(1))

    def grads(enabled: bool) -> tuple[dict[str, torch.Tensor], int]:
        vae.zero_grad()
        calls.clear()
        vae.set_gradient_checkpointing(enabled)
        recon, posterior = vae(x, generator=torch.Generator().manual_seed(0))
        ((recon - x) ** 2).mean().add(1e-3 * posterior.kl().mean()).backward()
        return {n: p.grad.clone() for n, p in vae.named_parameters()}, len(calls)

    plain, plain_calls = grads(False)
    checked, checked_calls = grads(True)
    assert (plain_calls, checked_calls) == (1, 2), "checkpointing should recompute the block in backward"
    switched = [m.gradient_checkpointing for m in vae.modules() if isinstance(m, (ResnetBlock, AttnBlock))]
    # Each mid stage has ResnetBlock, AttnBlock, ResnetBlock; the levels hold 2 x 1 (encoder) and
    # 2 x 2 (decoder) ResnetBlocks.
    assert len(switched) == 2 * 3 + 2 + 4 and all(switched)
    blocks = [k for k in vae.state_dict() if k.endswith(("norm1.weight", ".q.weight"))]  # one per block
    assert len(blocks) == len(switched), blocks
    err = max(max_err(plain[n], checked[n]) for n in plain)
    assert err < 1e-6, f"max abs gradient difference with checkpointing: {err}"
