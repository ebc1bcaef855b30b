"""Sigma schedules: shape properties for every scheduler, parity with k-diffusion and diffusers."""

from __future__ import annotations

import math

import pytest
import torch

from openldm.diffusion import sigmas as S
from openldm.diffusion.schedules import DiscreteSchedule, make_betas
from tests.oracles import k_external, k_sampling

SD = DiscreteSchedule.stable_diffusion()
SD_ZSNR = DiscreteSchedule.stable_diffusion(zero_terminal_snr=True)
# diffusers keeps alphas_cumprod in float32; parity with it is checked on the same float32 numbers.
SD_F32 = DiscreteSchedule(torch.cumprod(1 - make_betas("scaled_linear").float(), 0).double())


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = 1e-6) -> None:
    theirs = torch.as_tensor(theirs, dtype=torch.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    rel = ((ours.double() - theirs).abs() / theirs.abs().clamp(min=1e-12)).max().item()
    assert rel <= rtol, f"max relative error {rel:.3g}\nours   {ours.tolist()}\ntheirs {theirs.tolist()}"


@pytest.mark.parametrize("schedule", [SD, SD_ZSNR], ids=["sd", "zsnr"])
@pytest.mark.parametrize("n", [1, 2, 7, 10, 33, 100])
@pytest.mark.parametrize("name", sorted(S.SCHEDULERS))
def test_every_schedule_is_n_plus_one_strictly_decreasing_to_zero(name, n, schedule):
    sigmas = S.get_sigmas(name, n, schedule)
    assert sigmas.shape == (n + 1,) and sigmas.dtype == torch.float32
    assert sigmas[-1].item() == 0.0
    assert torch.isfinite(sigmas).all()
    if name == "linspace" and n == 1:  # diffusers' linspace(0, T-1, 1) is [0]: one step from sigma_min
        assert sigmas[0].item() == pytest.approx(schedule.sigma_min, rel=1e-6)
        return
    assert (sigmas[1:] < sigmas[:-1]).all(), sigmas.tolist()
    assert sigmas[0].item() <= schedule.sigma_max * (1 + 1e-4)  # the AYS tables round 14.6146 up


@pytest.mark.parametrize("n", [1, 5, 10, 32])
def test_karras_exponential_polyexponential_match_k_diffusion(n):
    k = k_sampling()
    lo, hi = SD.sigma_min, SD.sigma_max
    _assert_close(S.karras(n, SD), k.get_sigmas_karras(n, lo, hi, rho=7.0))
    custom = S.karras(n, SD, sigma_min=0.1, sigma_max=10.0, rho=3.0)
    _assert_close(custom, k.get_sigmas_karras(n, 0.1, 10.0, rho=3.0))
    _assert_close(S.exponential(n, SD), k.get_sigmas_exponential(n, lo, hi))
    for rho in (1.0, 2.5):
        _assert_close(S.polyexponential(n, SD, rho=rho), k.get_sigmas_polyexponential(n, lo, hi, rho=rho))


@pytest.mark.parametrize("n", [1, 4, 10, 25])
def test_normal_and_sgm_uniform_match_k_diffusion_discrete_schedule(n):
    kd = k_external().DiscreteSchedule(SD.sigmas, quantize=False)
    _assert_close(S.get_sigmas("normal", n, SD), kd.get_sigmas(n))
    # sgm_uniform: n+1 evenly spaced timesteps from sigma_max's to sigma_min's, the last dropped
    t_max, t_min = kd.sigma_to_t(kd.sigma_max), kd.sigma_to_t(kd.sigma_min)
    t = torch.linspace(float(t_max), float(t_min), n + 1)[:-1]
    _assert_close(S.get_sigmas("sgm_uniform", n, SD), torch.cat([kd.t_to_sigma(t), torch.zeros(1)]))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 7, 10, 30, 50])
def test_timestep_spacings_match_diffusers_euler(spacing, n):
    euler_module = pytest.importorskip("diffusers.schedulers.scheduling_euler_discrete")
    scheduler = euler_module.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing=spacing,
        steps_offset=1,
    )
    scheduler.set_timesteps(n)
    _assert_close(S.get_sigmas(spacing, n, SD_F32), scheduler.sigmas)
    # and with the float64 schedule the difference is only diffusers' float32 alphas_cumprod
    _assert_close(S.get_sigmas(spacing, n, SD), scheduler.sigmas, rtol=2e-5)


def test_integer_timestep_schedules_by_hand():
    at = SD.sigmas.float()
    _assert_close(S.simple(3, SD)[:-1], at[[999, 666, 333]])  # 999 - floor(i * 1000 / 3)
    _assert_close(S.ddim_uniform(10, SD)[:-1], at[list(range(901, 0, -100))])
    _assert_close(S.leading(4, SD, steps_offset=0)[:-1], at[[750, 500, 250, 0]])
    _assert_close(S.trailing(3, SD)[:-1], at[[999, 666, 332]])  # round(1000 - i 333.3) - 1


def test_kl_optimal_is_even_in_arctan_sigma():
    sigmas = S.kl_optimal(6, SD)[:-1].double()
    angles = sigmas.atan()
    steps = angles[:-1] - angles[1:]
    assert torch.allclose(steps, steps.mean().expand(5), rtol=1e-5), steps
    assert sigmas[0].item() == pytest.approx(SD.sigma_max, rel=1e-6)
    assert sigmas[-1].item() == pytest.approx(SD.sigma_min, rel=1e-6)


def test_beta_schedule_uses_beta_quantiles():
    scipy_stats = pytest.importorskip("scipy.stats")
    n = 12
    q = 1 - torch.arange(n, dtype=torch.float64) / n
    expected_t = torch.tensor(scipy_stats.beta.ppf(q.numpy(), 0.6, 0.6)) * 999
    _assert_close(S.beta(n, SD)[:-1], SD.t_to_sigma(expected_t), rtol=1e-6)
    ours_t = SD.sigma_to_t(S.beta(n, SD)[:-1].double())  # the timesteps are the quantiles themselves
    torch.testing.assert_close(ours_t, expected_t, atol=1e-3, rtol=0)


def test_beta_ppf_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    q = torch.linspace(0, 1, 201, dtype=torch.float64)
    for a, b in [(0.6, 0.6), (2.0, 5.0), (0.3, 1.7)]:
        err = (S.beta_ppf(q, a, b) - torch.tensor(scipy_stats.beta.ppf(q.numpy(), a, b))).abs().max().item()
        assert err < 1e-10, f"Beta({a}, {b}) quantile error {err}"


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_ays_reproduces_published_table(model):
    table = torch.tensor(S.AYS_TABLES[model])
    sigmas = S.ays(10, SD, model=model)
    assert torch.equal(sigmas[:-1], table[:-1].float()) and sigmas[-1] == 0
    # 20 steps: log-linear resampling puts every other point on the table
    twenty = S.get_sigmas("ays", 20, SD, model=model)
    _assert_close(twenty[0:20:2], table[:-1].float())
    mid = twenty[1:20:2].double()
    _assert_close(mid, (table[:-1].double() * table[1:].double()).sqrt())  # geometric means


def test_unknown_names_raise():
    with pytest.raises(KeyError, match="karras"):
        S.get_sigmas("karas", 10, SD)
    with pytest.raises(ValueError):
        S.ays(10, SD, model="sd3")
    with pytest.raises(ValueError):
        S.leading(1001, SD)


def test_img2img_tail_follows_diffusers_strength_rule():
    sigmas = S.karras(20, SD)
    assert torch.equal(S.img2img_sigmas(sigmas, 1.0), sigmas)
    none = S.img2img_sigmas(sigmas, 0.0)
    assert none.tolist() == [0.0]  # no steps: a sampler returns its input
    half = S.img2img_sigmas(sigmas, 0.5)
    assert torch.equal(half, sigmas[10:]) and len(half) - 1 == 10
    assert len(S.img2img_sigmas(S.karras(10, SD), 0.75)) - 1 == math.floor(10 * 0.75)
    assert len(S.img2img_sigmas(sigmas, 0.04)) - 1 == 0  # int(0.8) = 0
    with pytest.raises(ValueError):
        S.img2img_sigmas(sigmas, 1.5)


def test_noise_latent_is_ve_form_with_per_sample_sigma():
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    sigma = torch.tensor([0.0, 1.5, 10.0])
    out = S.noise_latent(x0, noise, sigma)
    assert torch.equal(out[0], x0[0])
    torch.testing.assert_close(out[2], x0[2] + 10.0 * noise[2])
    torch.testing.assert_close(S.noise_latent(x0, noise, 2.0), x0 + 2.0 * noise)


def _comfyui_linear_quadratic(steps, sigma_max, threshold_noise=0.025, linear_steps=None):
    """ComfyUI's `linear_quadratic_schedule` (comfy/samplers.py), transcribed as the oracle."""
    if steps == 1:
        sigma_schedule = [1.0, 0.0]
    else:
        if linear_steps is None:
            linear_steps = steps // 2
        linear_sigma_schedule = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        threshold_noise_step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        quadratic_coef = threshold_noise_step_diff / (linear_steps * quadratic_steps**2)
        linear_coef = threshold_noise / linear_steps - 2 * threshold_noise_step_diff / (quadratic_steps**2)
        const = quadratic_coef * (linear_steps**2)
        quadratic_sigma_schedule = [
            quadratic_coef * (i**2) + linear_coef * i + const for i in range(linear_steps, steps)
        ]
        sigma_schedule = linear_sigma_schedule + quadratic_sigma_schedule + [1.0]
        sigma_schedule = [1.0 - x for x in sigma_schedule]
    return torch.tensor(sigma_schedule, dtype=torch.float64) * sigma_max


@pytest.mark.parametrize("n", [1, 2, 3, 10, 25])
def test_linear_quadratic_matches_comfyui(n):
    expected = _comfyui_linear_quadratic(n, SD.sigma_max)
    torch.testing.assert_close(S.linear_quadratic(n, SD).double(), expected, rtol=1e-6, atol=1e-6)
    custom = S.linear_quadratic(n, SD, threshold_noise=0.1, linear_steps=max(n // 3, 1))
    expected = _comfyui_linear_quadratic(n, SD.sigma_max, 0.1, max(n // 3, 1))
    torch.testing.assert_close(custom.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("family", "table"), [("sd1", "sd15"), ("sd2", "sd15"), ("sdxl", "sdxl"),
                                               ("sdxl_refiner", "sdxl")])
def test_ays_takes_the_model_familys_table(family, table):
    options = S.schedule_options("ays", family)
    assert torch.equal(S.get_sigmas("ays", 10, SD, **options)[:-1], torch.tensor(S.AYS_TABLES[table][:-1]))
    assert S.schedule_options("karras", family) == {}
