"""Denoiser wrappers, classifier-free guidance and the training loss."""

from __future__ import annotations

import pytest
import torch

from openldm.diffusion.denoisers import (
    CFGDenoiser,
    DiscreteDenoiser,
    ScheduledDenoiser,
    bind,
    get_scalings,
    get_target,
    min_snr_weights,
    step_index,
)
from openldm.diffusion.noise import BatchNoise, BrownianTreeNoise
from openldm.diffusion.registry import SAMPLERS
from openldm.diffusion.samplers import ancestral_step
from openldm.diffusion.schedules import DiscreteSchedule
from openldm.diffusion.sigmas import get_sigmas
from openldm.prompts import prompt_schedule
from tests.gaussian import Gaussian
from tests.oracles import k_external

SCHEDULE = DiscreteSchedule.stable_diffusion()
TIMESTEPS = torch.tensor([0, 250, 640, 999])


def _vp(t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(alphas_cumprod[t]) and sqrt(1 - alphas_cumprod[t]), the DDPM coefficients, broadcastable."""
    a = SCHEDULE.alphas_cumprod[t].reshape(-1, *[1] * (ndim - 1))
    return a.sqrt(), (1 - a).sqrt()


class Oracle:
    """A perfect network: it knows x0 and the noise and outputs the exact target of its prediction type."""

    def __init__(self, prediction: str, x0: torch.Tensor, noise: torch.Tensor):
        self.prediction, self.x0, self.noise = prediction, x0, noise
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append((x_in, t))
        sqrt_a, sqrt_1ma = _vp(t.round().long(), x_in.ndim)
        if self.prediction == "eps":
            return self.noise
        if self.prediction == "v":  # diffusers' get_velocity
            return sqrt_a * self.noise - sqrt_1ma * self.x0
        return self.x0


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_perfect_model_gives_exact_x0_and_sees_ddpm_input(prediction):
    x0, noise = torch.randn(4, 3, 5, 5, dtype=torch.float64), torch.randn(4, 3, 5, 5, dtype=torch.float64)
    sigma = SCHEDULE.sigmas[TIMESTEPS]
    x = x0 + sigma.reshape(-1, 1, 1, 1) * noise
    model = Oracle(prediction, x0, noise)
    denoised = DiscreteDenoiser(model, SCHEDULE, prediction)(x, sigma)
    err = (denoised - x0).abs().max().item()
    assert err < 1e-10, f"{prediction}: max abs error {err}"
    x_in, t = model.seen[0]
    assert t.dtype == torch.float32 and torch.equal(t, TIMESTEPS.float()), t
    sqrt_a, sqrt_1ma = _vp(TIMESTEPS, 4)
    assert torch.allclose(x_in, sqrt_a * x0 + sqrt_1ma * noise, atol=1e-12)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_loss_is_zero_for_the_perfect_model(prediction):
    x0, noise = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, 2, 3, 3, dtype=torch.float64)
    sigma = SCHEDULE.sigmas[TIMESTEPS]
    denoiser = DiscreteDenoiser(Oracle(prediction, x0, noise), SCHEDULE, prediction)
    per_sample = denoiser.loss(x0, noise, sigma, reduce=False)
    assert per_sample.shape == (4,) and per_sample.max().item() < 1e-12
    # a wrong network is penalized: its loss is the mean square of its error
    wrong = DiscreteDenoiser(lambda x_in, t: torch.zeros_like(x_in), SCHEDULE, prediction)
    target = get_target(prediction, x0, noise, sigma)
    expect = target.pow(2).flatten(1).mean(1).float()
    assert torch.allclose(wrong.loss(x0, noise, sigma, reduce=False), expect, rtol=1e-6)
    weights = torch.tensor([0.5, 1.0, 2.0, 0.0])
    weighted = wrong.loss(x0, noise, sigma, weighting=weights)
    assert torch.allclose(weighted, (expect * weights).mean(), rtol=1e-6)


def test_min_snr_weights_match_hand_computation():
    sigma = torch.tensor([0.1, 0.5, 1.0, 3.0])  # SNR = 100, 4, 1, 1/9
    snr = torch.tensor([100.0, 4.0, 1.0, 1 / 9])
    gamma = 5.0
    clipped = torch.tensor([5.0, 4.0, 1.0, 1 / 9])  # min(SNR, gamma)
    torch.testing.assert_close(min_snr_weights(sigma, gamma, "eps"), clipped / snr)
    torch.testing.assert_close(min_snr_weights(sigma, gamma, "v"), clipped / (snr + 1))
    torch.testing.assert_close(min_snr_weights(sigma, gamma, "x0"), clipped)
    # the eps weight for sigma=0.1 is 5/100, not 1: the clipping must act
    assert min_snr_weights(sigma, gamma, "eps")[0].item() == pytest.approx(0.05)


def test_v_scalings_reconstruct_x0_from_velocity():
    sigma = torch.tensor([0.03, 1.0, 14.6], dtype=torch.float64)
    s = get_scalings("v", sigma)
    alpha, sigma_vp = 1 / (1 + sigma**2).sqrt(), sigma / (1 + sigma**2).sqrt()
    x0, eps = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    x = x0 + sigma * eps
    v = alpha * eps - sigma_vp * x0
    torch.testing.assert_close(s.c_skip * x + s.c_out * v, x0)


def test_eps_denoiser_matches_k_diffusion():
    """Same timestep and output as k-diffusion's DiscreteEpsDDPMDenoiser, at fractional sigmas."""
    w = torch.linspace(-1, 1, 3 * 4 * 4).reshape(3, 4, 4)

    def model(x_in, t):
        return torch.tanh(x_in * w + t.reshape(-1, 1, 1, 1) / 100)

    ours = DiscreteDenoiser(model, SCHEDULE, "eps")
    theirs = k_external().DiscreteEpsDDPMDenoiser(model, SCHEDULE.alphas_cumprod.float(), quantize=False)
    x = torch.randn(5, 3, 4, 4) * 3
    sigma = torch.tensor([0.05, 0.7, 2.3456, 9.0, 14.0])
    err = (ours(x, sigma) - theirs(x, sigma)).abs().max().item()
    assert err < 1e-5, f"max abs error {err}"
    torch.testing.assert_close(ours.timestep(sigma), theirs.sigma_to_t(sigma).float(), atol=2e-3, rtol=0)


def test_quantize_rounds_the_timestep():
    sigma = SCHEDULE.t_to_sigma(torch.tensor([10.3, 500.7]))
    seen = []
    DiscreteDenoiser(lambda x, t: seen.append(t) or x, SCHEDULE, quantize=True)(torch.zeros(2, 1), sigma)
    assert seen[0].tolist() == [10.0, 501.0]


# --- classifier-free guidance ---------------------------------------------------------------


class Toy:
    """A batch-independent network with SDXL-style {"context", "y"} conditioning; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x_in, t, context, y):
        self.calls += 1
        ctx = context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return torch.sin(x_in * (1 + ctx)) + y[:, :1].reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1) / 1000


def _cond(batch: int, offset: float, tokens: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(int(offset * 10))
    context = torch.randn(batch, tokens, 8, generator=g) + offset
    return {"context": context, "y": torch.randn(batch, 6, generator=g)}


def _setup(prediction="eps"):
    toy = Toy()
    inner = DiscreteDenoiser(toy, SCHEDULE, prediction)
    x = torch.randn(2, 4, 6, 6) * 5
    sigma = torch.tensor([5.0, 0.8])
    return toy, inner, x, sigma


def test_cfg_scale_one_is_the_conditional_denoiser_and_skips_uncond():
    toy, inner, x, sigma = _setup()
    cond = _cond(2, 1.0)
    out = CFGDenoiser(inner, cond, None, scale=1.0)(x, sigma)
    assert toy.calls == 1
    assert torch.equal(out, bind(inner, **cond)(x, sigma))


def test_cfg_batched_equals_two_calls_and_plain_formula():
    toy, inner, x, sigma = _setup()
    cond, uncond = _cond(2, 1.0), _cond(2, -1.0)
    guided = CFGDenoiser(inner, cond, uncond, scale=6.0, rescale=0.0)(x, sigma)
    assert toy.calls == 1  # one batched forward
    d_cond, d_uncond = inner(x, sigma, **cond), inner(x, sigma, **uncond)
    expect = d_uncond + 6.0 * (d_cond - d_uncond)
    err = (guided - expect).abs().max().item()
    assert err < 1e-5, f"max abs error {err}"
    assert (guided - d_cond).abs().max() > 0.1  # guidance changed something
    # context lengths that differ cannot share a batch: two forwards, same answer
    long_uncond = dict(uncond, context=torch.cat([uncond["context"], uncond["context"]], dim=1))
    toy.calls = 0
    split = CFGDenoiser(inner, cond, long_uncond, scale=6.0)(x, sigma)
    assert toy.calls == 2
    d_long = inner(x, sigma, **long_uncond)
    torch.testing.assert_close(split, d_long + 6.0 * (d_cond - d_long))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_cfg_rescale_matches_diffusers_formula_on_model_output(prediction):
    """Lin et al. 2023 rescale as diffusers' `rescale_noise_cfg` does it, on the raw network output."""
    toy, inner, x, sigma = _setup(prediction)
    cond, uncond = _cond(2, 1.0), _cond(2, -1.0)
    scale, phi = 7.5, 0.7
    guided = CFGDenoiser(inner, cond, uncond, scale=scale, rescale=phi)(x, sigma)
    # by hand: guidance and rescale on the network output, then the scheduler's x0 formula
    s = get_scalings(prediction, sigma)
    x_in = x * s.c_in.reshape(-1, 1, 1, 1)
    t = SCHEDULE.sigma_to_t(sigma).float()
    out_c, out_u = toy(x_in, t, **cond), toy(x_in, t, **uncond)
    out_cfg = out_u + scale * (out_c - out_u)
    std_c = out_c.std(dim=(1, 2, 3), keepdim=True)
    std_cfg = out_cfg.std(dim=(1, 2, 3), keepdim=True)
    out = phi * out_cfg * (std_c / std_cfg) + (1 - phi) * out_cfg
    expect = s.c_skip.reshape(-1, 1, 1, 1) * x + s.c_out.reshape(-1, 1, 1, 1) * out
    err = (guided - expect).abs().max().item()
    assert err < 1e-4, f"{prediction}: max abs error {err}"
    plain = CFGDenoiser(inner, cond, uncond, scale=scale)(x, sigma)
    assert (plain - guided).abs().max() > 1e-2  # the rescale did act


def test_cfg_rescale_needs_scalings():
    with pytest.raises(TypeError):
        CFGDenoiser(lambda x, sigma, **c: x, {}, {}, scale=5.0, rescale=0.5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_cfg_rescale_euler_ancestral_reproduces_diffusers(prediction):
    """Denoiser + CFG + rescale + leading sigmas + seeded noise give diffusers' Euler-ancestral latents.

    Note diffusers' initial latent for "leading" spacing is noise * sqrt(sigma_max^2 + 1), not sigma_max.
    """
    euler_a = pytest.importorskip("diffusers.schedulers.scheduling_euler_ancestral_discrete")
    w = torch.linspace(-1, 1, 4 * 6 * 6).reshape(4, 6, 6)

    def model(x_in, t, context):
        return torch.tanh(x_in * w * context.reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1) / 500)

    scheduler = euler_a.EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
        steps_offset=1, prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction],
    )
    scheduler.set_timesteps(10)
    c, u, scale, phi = torch.tensor([1.3]), torch.tensor([0.4]), 7.0, 0.7
    g = torch.Generator().manual_seed(42)
    latent = torch.randn((1, 4, 6, 6), generator=g) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(torch.cat([latent] * 2), t)
        out_u, out_c = model(x_in, t.expand(2), torch.cat([u, c])).chunk(2)
        out = out_u + scale * (out_c - out_u)
        std_ratio = out_c.std(dim=(1, 2, 3), keepdim=True) / out.std(dim=(1, 2, 3), keepdim=True)
        out = phi * out * std_ratio + (1 - phi) * out
        latent = scheduler.step(out, t, latent, generator=g).prev_sample

    schedule = DiscreteSchedule(scheduler.alphas_cumprod.double())
    inner = DiscreteDenoiser(model, schedule, prediction)
    cfg = CFGDenoiser(inner, {"context": c}, {"context": u}, scale=scale, rescale=phi)
    sigmas = get_sigmas("leading", 10, schedule)
    noise = BatchNoise([42], (4, 6, 6))
    x = noise() * (sigmas[0] ** 2 + 1) ** 0.5
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = cfg(x, sigma.expand(1))
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next)
        x = x + (x - denoised) / sigma * (sigma_down - sigma) + noise() * sigma_up
    err = (x - latent).abs().max().item()
    assert err < 1e-5 * latent.abs().max().item(), f"{prediction}: max abs error {err}"


# --- prompt schedules: which denoiser a model call uses is a function of its sigma -----------------

@pytest.mark.parametrize("name", list(SAMPLERS))
def test_a_prompt_edit_switches_at_the_same_noise_level_for_every_sampler(name):
    """`[a:b:0.5]` over 10 steps: a for steps 0-5, b from step 6 (A1111's count), wherever the sampler
    evaluates. Heun's corrector at sigma_6, DPM2's midpoints, adaptive and restarting samplers included:
    a counter of callbacks gets Heun's corrector (and every adaptive step) wrong."""
    spec = SAMPLERS[name]
    sigmas = spec.sigmas(spec.default_schedule, 10, SCHEDULE).double()
    ends = [end for end, _ in prompt_schedule("[a:b:0.5]", 10)]
    assert ends == [5, 10]
    g, calls = Gaussian.make(), []

    def recording(text):
        def denoiser(x, sigma):
            calls.append((float(sigma.max()), text))
            return g.denoiser(x, sigma)
        return denoiser

    denoiser = ScheduledDenoiser(ends, [recording("a"), recording("b")], sigmas)
    x = torch.randn(1, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    noise = BatchNoise((3,), (4,), dtype=torch.float64)
    if spec.noise == "brownian":
        noise = BrownianTreeNoise.for_sigmas((3,), (4,), sigmas)
    spec(denoiser, x, sigmas, noise_sampler=noise)
    switch = float(sigmas[6])  # step 6 starts here
    wrong = [(round(s, 4), text) for s, text in calls if text != ("b" if s <= switch * (1 + 1e-4) else "a")]
    assert not wrong, f"{name}: calls at these sigmas used the other prompt (switch at {switch:.4f}): {wrong}"
    assert {text for _, text in calls} == {"a", "b"}


def test_step_index_counts_the_steps_a_sigma_is_past():
    sigmas = [10.0, 5.0, 2.0, 1.0, 0.0]
    found = [step_index(sigmas, s) for s in (11.0, 10.0, 7.0, 5.0, 5.0 * (1 + 1e-6), 1.5, 1.0, 0.5, 0.0)]
    assert found == [0, 0, 0, 1, 1, 2, 3, 3, 3]
