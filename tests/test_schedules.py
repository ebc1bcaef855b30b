"""Discrete DDPM schedules: betas and zero-terminal-SNR rescaling against diffusers, sigma <-> timestep."""

from __future__ import annotations

import pytest
import torch
from diffusers.schedulers.scheduling_ddim import betas_for_alpha_bar
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

from openldm.diffusion.schedules import DiscreteSchedule, make_betas, rescale_zero_terminal_snr

F64 = torch.float64
SD = DiscreteSchedule.stable_diffusion()


def _max_rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    theirs = theirs.to(F64)
    return ((ours - theirs).abs() / theirs.abs()).max().item()


@pytest.mark.parametrize("timesteps", [1000, 37])
def test_betas_match_diffusers(timesteps):
    """diffusers builds its betas in float32: agreement to float32 rounding (seen: 6e-8 relative)."""
    linear = torch.linspace(0.0001, 0.02, timesteps, dtype=torch.float32)  # DDPMScheduler's "linear"
    err = _max_rel(make_betas("linear", timesteps, 0.0001, 0.02), linear)
    assert err < 1e-6, f"linear: max relative error {err:.3g}"
    scaled = torch.linspace(0.00085**0.5, 0.012**0.5, timesteps, dtype=torch.float32) ** 2
    err = _max_rel(make_betas("scaled_linear", timesteps), scaled)
    assert err < 1e-6, f"scaled_linear: max relative error {err:.3g}"
    err = _max_rel(make_betas("squaredcos_cap_v2", timesteps), betas_for_alpha_bar(timesteps))
    assert err < 1e-6, f"squaredcos_cap_v2: max relative error {err:.3g}"
    with pytest.raises(ValueError, match="scaled_linear"):
        make_betas("quadratic", timesteps)


def test_sd_schedule_end_points():
    """SD's published sigma range: sigma_min = 0.0292, sigma_max = 14.6146 (ComfyUI and A1111 print these)."""
    assert SD.sigma_min == pytest.approx(0.029167, rel=1e-4)
    assert SD.sigma_max == pytest.approx(14.614642, rel=1e-6)
    assert (SD.sigmas.diff() > 0).all()


@pytest.mark.parametrize("kind", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_zero_terminal_snr_matches_diffusers(kind):
    """Lin et al. 2023 Alg. 1, in float64 against diffusers' `rescale_zero_terminal_snr` (seen: 1e-15)."""
    betas = make_betas(kind, 1000, 0.0001, 0.02) if kind == "linear" else make_betas(kind)
    ours = rescale_zero_terminal_snr(torch.cumprod(1 - betas, 0))
    theirs = torch.cumprod(1 - diffusers_rescale(betas.clone()), 0)
    err = (ours - theirs).abs().max().item()
    assert err < 1e-12, f"{kind}: max abs error {err:.3g}"
    assert ours[-1] == 0 and ours[0] == pytest.approx(float(torch.cumprod(1 - betas, 0)[0]), rel=1e-12)


def test_zero_terminal_snr_schedule_keeps_a_finite_last_sigma():
    zsnr = DiscreteSchedule.stable_diffusion(zero_terminal_snr=True)
    assert torch.isfinite(zsnr.sigmas).all() and zsnr.sigma_max > 4000  # SNR 1 / sigma^2 < 1e-7
    torch.testing.assert_close(zsnr.sigmas[:-1], DiscreteSchedule(
        rescale_zero_terminal_snr(SD.alphas_cumprod)).sigmas[:-1], rtol=1e-12, atol=0)


def test_sigmas_and_alphas_cumprod_round_trip():
    back = DiscreteSchedule.from_sigmas(SD.sigmas)
    torch.testing.assert_close(back.alphas_cumprod, SD.alphas_cumprod, rtol=1e-13, atol=0)


def test_timestep_sigma_round_trip():
    """t_to_sigma hits the trained sigmas at integers and is log-linear between; sigma_to_t inverts it."""
    t = torch.tensor([0.0, 1.0, 3.25, 499.5, 998.9, 999.0], dtype=F64)
    sigma = SD.t_to_sigma(t)
    torch.testing.assert_close(sigma[[0, 1, 5]], SD.sigmas[[0, 1, 999]], rtol=1e-14, atol=0)
    expected_mid = (SD.sigmas[499] * SD.sigmas[500]).sqrt()
    assert sigma[3].item() == pytest.approx(expected_mid.item(), rel=1e-13)
    torch.testing.assert_close(SD.sigma_to_t(sigma), t, rtol=0, atol=1e-9)
    # out of range: clamped to the trained timesteps
    ends = SD.sigma_to_t(torch.tensor([1e-4, 100.0], dtype=F64))
    assert ends.tolist() == [0.0, 999.0]
