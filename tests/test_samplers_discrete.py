"""DDIM, PLMS, DDPM and LCM: parity with diffusers' schedulers, convergence order, output distributions.

Parity: a fixed smooth "network" of (x_vp, t) on SD's schedule runs in diffusers' own scheduler loop
(VP space, its own timestep spacing) and through ours as a VE denoiser (`DiscreteDenoiser`) on the
sigmas of exactly those timesteps, from the same initial noise with the same noise draws, in float64.
diffusers builds its betas in float32; its schedule tensors are replaced by our float64 ones so that
both sides compute with one schedule. The harness here is also used by tests/test_samplers_multistep.py.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler, PNDMScheduler
from gaussian import Gaussian, karras_sigmas

from openldm.diffusion import samplers_discrete
from openldm.diffusion.denoisers import DiscreteDenoiser
from openldm.diffusion.samplers import Step, append_dims, default_noise_sampler
from openldm.diffusion.schedules import DiscreteSchedule

F64 = torch.float64
SCHEDULE = DiscreteSchedule.stable_diffusion()
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
SD_LEADING = {"timestep_spacing": "leading", "steps_offset": 1}  # SD 1.x's DDIM/PNDM configuration
SHAPE = (2, 4, 3, 3)
TOL = 1e-9  # the target is 1e-6; seen: <= 4e-13, and 3e-10 for DDPM (see its test)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, one thread


# --- the parity harness -------------------------------------------------------------------------


def _t(t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
    """A timestep (scalar from diffusers, (batch,) float32 from `DiscreteDenoiser`) broadcast over x."""
    return torch.as_tensor(t).to(F64).reshape(-1, *(1,) * (x.ndim - 1)) / 1000


def eps_net(x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """A fixed smooth nonlinear eps "network" of (x_vp, t), mixing channels."""
    tt = _t(t, x)
    return torch.tanh(0.8 * x + tt) + 0.3 * torch.sin(3 * tt + x.roll(1, dims=1)) * x


def v_net(x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """A fixed smooth nonlinear v "network" of (x_vp, t)."""
    tt = _t(t, x)
    return 0.9 * torch.tanh(x.roll(1, dims=1) - tt) + 0.2 * torch.cos(2 * tt * x) * (1 - tt)


NETS = {"eps": (eps_net, "epsilon"), "v": (v_net, "v_prediction")}  # ours -> (network, diffusers' name)


def make_scheduler(cls: type, prediction: str, **config) -> object:
    """A diffusers scheduler on SD's schedule, its alphas_cumprod replaced by our float64 one."""
    scheduler = cls(**SD_BETAS, prediction_type=NETS[prediction][1], **config)
    alphas_cumprod = SCHEDULE.alphas_cumprod.clone()
    scheduler.alphas_cumprod = alphas_cumprod
    if hasattr(scheduler, "final_alpha_cumprod"):
        one = torch.tensor(1.0, dtype=F64)
        scheduler.final_alpha_cumprod = one if scheduler.config.set_alpha_to_one else alphas_cumprod[0]
    return scheduler


def sigmas_at(timesteps: torch.Tensor, last: float) -> torch.Tensor:
    """Our sigmas for diffusers' (distinct, descending) timesteps, then `last` (0 or sigma_min)."""
    return torch.cat([SCHEDULE.sigmas[timesteps.long()], torch.tensor([last], dtype=F64)])


def run_diffusers(scheduler, net, x_vp: torch.Tensor, **step_kwargs) -> torch.Tensor:
    """diffusers' sampling loop: the network at each timestep, then `scheduler.step`.

    The default dtype is float64 meanwhile: diffusers makes some scalars from integer timesteps (LCM's
    boundary scalings) in the default dtype, whose float32 rounding would show at 1e-6.
    """
    default = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        for t in scheduler.timesteps:
            x_vp = scheduler.step(net(x_vp, t), t, x_vp, **step_kwargs).prev_sample
    finally:
        torch.set_default_dtype(default)
    return x_vp


def run_ours(sample, prediction: str, x_vp: torch.Tensor, sigmas: torch.Tensor, wrap=None, **kwargs):
    """Our sampler on the VE denoiser of the same network, from the same x_T; the result back in VP form."""
    denoiser = DiscreteDenoiser(NETS[prediction][0], SCHEDULE, prediction)
    denoiser = denoiser if wrap is None else wrap(denoiser)
    x = x_vp * (1 + sigmas[0] ** 2).sqrt()
    return sample(denoiser, x, sigmas, **kwargs) / (1 + sigmas[-1] ** 2).sqrt()


def initial_noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=F64)


def max_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(ref).all(), "diffusers returned non-finite values"
    return (ours - ref).abs().max().item()


# --- parity -------------------------------------------------------------------------------------

DDIM_CASES = [  # (steps, scheduler config, eta)
    (10, {**SD_LEADING, "set_alpha_to_one": False}, 0.0),  # SD 1.x: ends at alphas_cumprod[0]
    (25, {**SD_LEADING, "set_alpha_to_one": False}, 0.0),
    (10, {**SD_LEADING, "set_alpha_to_one": True}, 0.0),
    (10, {"timestep_spacing": "trailing", "set_alpha_to_one": True}, 0.0),
    (10, {**SD_LEADING, "set_alpha_to_one": True}, 0.5),
    (25, {**SD_LEADING, "set_alpha_to_one": False}, 1.0),
    (10, {"timestep_spacing": "trailing", "set_alpha_to_one": True}, 1.0),
]


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize(("steps", "config", "eta"), DDIM_CASES)
def test_ddim_matches_diffusers(prediction: str, steps: int, config: dict, eta: float) -> None:
    """diffusers' DDIM steps to t - T // n: only leading, and trailing with n | T, are consistent spacings."""
    scheduler = make_scheduler(DDIMScheduler, prediction, clip_sample=False, **config)
    scheduler.set_timesteps(steps)
    x_vp = initial_noise()
    generator = torch.Generator().manual_seed(5)
    ref = run_diffusers(scheduler, NETS[prediction][0], x_vp, eta=eta, generator=generator)
    last = 0.0 if config["set_alpha_to_one"] else SCHEDULE.sigma_min
    sigmas = sigmas_at(scheduler.timesteps, last)
    noise = default_noise_sampler(x_vp, torch.Generator().manual_seed(5))
    ours = run_ours(samplers_discrete.sample_ddim, prediction, x_vp, sigmas, eta=eta, noise_sampler=noise)
    err = max_error(ours, ref)
    assert err <= TOL, f"DDIM {steps} steps {config} eta={eta}: max abs error {err:.3g} vs diffusers"
    assert (ours - x_vp).abs().max() > 0.5, "the sampler did not move x"


PLMS_CASES = [
    (10, {**SD_LEADING, "set_alpha_to_one": False}),  # SD 1.x's PNDM
    (25, {**SD_LEADING, "set_alpha_to_one": False}),
    (2, {**SD_LEADING, "set_alpha_to_one": True}),  # pseudo-Heun then AB2
    (7, {"timestep_spacing": "leading", "set_alpha_to_one": True}),
]


def _pndm(steps: int, config: dict) -> tuple[PNDMScheduler, torch.Tensor]:
    scheduler = make_scheduler(PNDMScheduler, "eps", skip_prk_steps=True, **config)
    scheduler.set_timesteps(steps)
    last = 0.0 if config["set_alpha_to_one"] else SCHEDULE.sigma_min
    return scheduler, sigmas_at(torch.from_numpy(scheduler._timesteps[::-1].copy()), last)


def eps_of_v_net(x_vp: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """v_net's eps = sqrt(a) v + sqrt(1 - a) x_vp, converted at its own (x, t)."""
    a = SCHEDULE.alphas_cumprod[torch.as_tensor(t).long()]
    return a.sqrt() * v_net(x_vp, t) + (1 - a).sqrt() * x_vp


@pytest.mark.parametrize(("steps", "config"), PLMS_CASES)
def test_plms_matches_diffusers(steps: int, config: dict) -> None:
    """PLMS = PNDMScheduler(skip_prk_steps=True), for an eps network and for a v network.

    For the v network diffusers is given the eps of the v network: our PLMS (like ldm's) extrapolates
    eps, whatever the model predicts (see the next test).
    """
    x_vp = initial_noise()
    for prediction, net in [("eps", eps_net), ("v", eps_of_v_net)]:
        scheduler, sigmas = _pndm(steps, config)
        ref = run_diffusers(scheduler, net, x_vp)
        ours = run_ours(samplers_discrete.sample_plms, prediction, x_vp, sigmas)
        err = max_error(ours, ref)
        assert err <= TOL, f"PLMS {prediction} {steps} steps {config}: max abs error {err:.3g} vs diffusers"
        assert (ours - x_vp).abs().max() > 0.5, "the sampler did not move x"


def test_diffusers_plms_of_a_v_model_is_first_order() -> None:
    """diffusers' PNDM with v_prediction combines raw v outputs (from different timesteps) and converts
    the mix to eps at the current one: that costs O(h) per unit time, so its gap to PLMS on eps (ours,
    and ldm's) halves with each doubling of the steps (seen: 0.41 at 10 steps, 0.096 at 50)."""
    x_vp = initial_noise()
    gaps = []
    for steps in (10, 40):
        config = {**SD_LEADING, "set_alpha_to_one": False}
        scheduler = make_scheduler(PNDMScheduler, "v", skip_prk_steps=True, **config)
        scheduler.set_timesteps(steps)
        native_v = run_diffusers(scheduler, v_net, x_vp)
        ours = run_ours(samplers_discrete.sample_plms, "v", x_vp, _pndm(steps, config)[1])
        gaps.append(max_error(ours, native_v))
    assert gaps[0] > 0.1 and 3 < gaps[0] / gaps[1] < 5.5, f"gaps {gaps}: diffusers' v-PLMS changed"


DDPM_CASES = [(10, SD_LEADING), (50, SD_LEADING), (10, {"timestep_spacing": "trailing"})]


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize(("steps", "config"), DDPM_CASES)
def test_ddpm_matches_diffusers(prediction: str, steps: int, config: dict) -> None:
    """Same noise draws; diffusers adds noise of std 1e-10 (its variance floor) at the last step, we none."""
    scheduler = make_scheduler(DDPMScheduler, prediction, clip_sample=False, **config)
    scheduler.set_timesteps(steps)
    x_vp = initial_noise()
    ref = run_diffusers(scheduler, NETS[prediction][0], x_vp, generator=torch.Generator().manual_seed(3))
    noise = default_noise_sampler(x_vp, torch.Generator().manual_seed(3))
    sigmas = sigmas_at(scheduler.timesteps, 0.0)
    ours = run_ours(samplers_discrete.sample_ddpm, prediction, x_vp, sigmas, noise_sampler=noise)
    err = max_error(ours, ref)
    assert err <= TOL, f"DDPM {prediction} {steps} steps {config}: max abs error {err:.3g} vs diffusers"


def lcm_boundary(denoiser: DiscreteDenoiser, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """LCM's consistency function c_skip(t) x_vp + c_out(t) x0, t the discrete timestep (Luo et al. 2023;
    as diffusers' `get_scalings_for_boundary_condition_discrete`)."""

    def consistency(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = SCHEDULE.sigma_to_t(sigma).round() * timestep_scaling
        c_skip = sigma_data**2 / (t**2 + sigma_data**2)
        c_out = t / (t**2 + sigma_data**2).sqrt()
        x_vp = x / append_dims((1 + sigma**2).sqrt(), x.ndim)
        return append_dims(c_out, x.ndim) * denoiser(x, sigma) + append_dims(c_skip, x.ndim) * x_vp

    return consistency


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_lcm_matches_diffusers(prediction: str, steps: int) -> None:
    """LCMScheduler's own timesteps (from 50 original steps); our denoiser carries LCM's boundary scalings."""
    scheduler = make_scheduler(LCMScheduler, prediction)
    scheduler.set_timesteps(steps)
    x_vp = initial_noise()
    ref = run_diffusers(scheduler, NETS[prediction][0], x_vp, generator=torch.Generator().manual_seed(4))
    noise = default_noise_sampler(x_vp, torch.Generator().manual_seed(4))
    sigmas = sigmas_at(scheduler.timesteps, 0.0)
    ours = run_ours(
        samplers_discrete.sample_lcm, prediction, x_vp, sigmas, wrap=lcm_boundary, noise_sampler=noise
    )
    err = max_error(ours, ref)
    assert err <= TOL, f"LCM {prediction} {steps} steps: max abs error {err:.3g} vs diffusers"
    assert (ours - x_vp).abs().max() > 0.5, "the sampler did not move x"


# --- convergence on the Gaussian problem ---------------------------------------------------------


def gaussian_problem() -> Gaussian:
    return Gaussian(torch.tensor([-1.0, 0.5, 2.0], dtype=F64), torch.tensor([0.5, 1.0, 2.0], dtype=F64))


def observed_order(sample, sigmas_for, reference, steps=(16, 32, 64, 128), **kwargs) -> tuple[float, list]:
    """Least-squares slope of -log(error) against log(steps), with the errors at each step count."""
    g = gaussian_problem()
    errors = []
    for n in steps:
        sigmas = sigmas_for(n)
        x = g.prior(16, float(sigmas[0]), torch.Generator().manual_seed(0))
        errors.append((sample(g.denoiser, x, sigmas, **kwargs) - reference(g, x, sigmas)).abs().max().item())
    assert errors[-1] > 1e-11, "errors at rounding level: the slope would mean nothing"
    xs, ys = torch.tensor(steps, dtype=F64).log(), -torch.tensor(errors, dtype=F64).log()
    xs = xs - xs.mean()
    return float((xs * (ys - ys.mean())).sum() / (xs**2).sum()), errors


def karras_to_zero(n: int) -> torch.Tensor:
    return karras_sigmas(n, 0.02, 80.0)


def karras_to_min(n: int) -> torch.Tensor:
    """Karras sigmas stopping at sigma_min = 0.02: every step, the last one too, shrinks with n."""
    return karras_sigmas(n, 0.02, 80.0)[:-1]


def uniform_to_zero(n: int) -> torch.Tensor:
    """Evenly spaced sigmas from 5 to 0, where equal-step Adams-Bashforth weights are exact."""
    return torch.linspace(5.0, 0.0, n + 1, dtype=F64)


def denoised_end(g: Gaussian, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    return g.denoised_end(x, sigmas)


def ode_end(g: Gaussian, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    return g.ode(x, sigmas[0], sigmas[-1])


def test_ddim_is_first_order() -> None:
    """Its last step to 0 is a plain denoise, so the reference is the exact x_n denoised (seen: 1.00)."""
    slope, errors = observed_order(samplers_discrete.sample_ddim, karras_to_zero, denoised_end)
    assert slope >= 0.8 * 1, f"DDIM: observed order {slope:.2f}; {errors}"


@pytest.mark.parametrize(("sigmas_for", "order"), [(uniform_to_zero, 3), (karras_to_min, 2)])
def test_plms_order(sigmas_for, order: int) -> None:
    """Equal-step Adams-Bashforth weights are exact on an evenly spaced grid, where the O(h^3) local
    errors of the pseudo-Heun and AB2 start steps cap PLMS at order 3 (seen: 2.94). On a non-uniform grid
    the weights miss the change of step size by O(h^3) per step: order 2 (seen: 2.15)."""
    slope, errors = observed_order(samplers_discrete.sample_plms, sigmas_for, ode_end)
    assert slope >= 0.8 * order, f"PLMS: observed order {slope:.2f} < 0.8 * {order}; {errors}"


# --- distributions -------------------------------------------------------------------------------


def _check_distribution(out: torch.Tensor, mu: torch.Tensor, std: torch.Tensor, bias: float) -> None:
    """Mean within 5 standard errors, std within 5 standard errors plus a discretization allowance."""
    batch = out.shape[0]
    mean_z = ((out.mean(0) - mu) / (std / batch**0.5)).abs().max().item()
    std_err = (out.std(0) / std - 1).abs().max().item()
    assert mean_z <= 5, f"mean off by {mean_z:.1f} standard errors"
    assert std_err <= 5 / (2 * batch) ** 0.5 + bias, f"std off by {std_err:.2%}"


def test_ddpm_samples_the_data() -> None:
    """250 leading-spaced timesteps from the exact marginal at sigma(t=997): the law of the final denoise
    at sigma(t=1), N(mu, s^4 / (s^2 + sigma_1^2)). With the exact (posterior-mean) denoiser DDPM's std
    is biased by -2.5%, -1.3%, -0.9% for s = 0.5, 1, 2 (computed by the exact variance recursion), so
    the allowance is 3% plus 5 standard errors; a wrong noise scale or a missing draw is far outside."""
    g, batch = gaussian_problem(), 20000
    generator = torch.Generator().manual_seed(1)
    sigmas = sigmas_at(torch.arange(249, -1, -1) * 4 + 1, 0.0)
    x = g.prior(batch, float(sigmas[0]), generator)
    noise = default_noise_sampler(x, generator)
    out = samplers_discrete.sample_ddpm(g.denoiser, x, sigmas, noise_sampler=noise)
    _check_distribution(out, g.mu, g.denoised_std(float(sigmas[-2])), bias=0.03)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lcm_with_the_exact_consistency_function_samples_the_data(steps: int) -> None:
    """The Gaussian problem's consistency function is its exact ODE map to 0: each step then gives an
    exact data sample and re-noising keeps the marginal exact, so the output is N(mu, s^2) for any step
    count, with no discretization bias."""
    g, batch = gaussian_problem(), 20000
    generator = torch.Generator().manual_seed(2)
    sigmas = karras_sigmas(steps, 0.5, 14.6)
    x = g.prior(batch, float(sigmas[0]), generator)

    def consistency(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return g.ode(x, sigma, 0.0)

    noise = default_noise_sampler(x, generator)
    out = samplers_discrete.sample_lcm(consistency, x, sigmas, noise_sampler=noise)
    _check_distribution(out, g.mu, g.s * torch.ones_like(g.mu), bias=0.0)


def _seeded(x: torch.Tensor, seed: int = 0):
    return default_noise_sampler(x, torch.Generator().manual_seed(seed))


def test_ddpm_is_ddim_with_eta_one() -> None:
    g = gaussian_problem()
    x = g.noise(4, 80.0)
    sigmas = karras_sigmas(8, 0.02, 80.0)
    ddpm = samplers_discrete.sample_ddpm(g.denoiser, x, sigmas, noise_sampler=_seeded(x))
    ddim = samplers_discrete.sample_ddim(g.denoiser, x, sigmas, eta=1.0, noise_sampler=_seeded(x))
    torch.testing.assert_close(ddpm, ddim, rtol=0, atol=0)


# --- callbacks -----------------------------------------------------------------------------------

SAMPLERS = ["ddim", "plms", "ddpm", "lcm"]


@pytest.mark.parametrize("name", SAMPLERS)
def test_callback_once_per_step(name: str) -> None:
    """One `Step` per step, in order, at sigmas[i], with the x it denoised and its denoised value."""
    g = gaussian_problem()
    sigmas = karras_sigmas(7, 0.02, 80.0)
    x = g.noise(3, 80.0)
    steps: list[Step] = []
    getattr(samplers_discrete, f"sample_{name}")(g.denoiser, x, sigmas, callback=steps.append)
    assert [s.i for s in steps] == list(range(7))
    assert [float(s.sigma) for s in steps] == sigmas[:-1].tolist()
    torch.testing.assert_close(steps[0].x, x, rtol=0, atol=0)
    for s in steps:
        torch.testing.assert_close(s.denoised, g.denoiser(s.x, s.sigma.expand(3)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", SAMPLERS)
def test_image_shaped_float32(name: str) -> None:
    """(batch, channels, height, width) in float32 gives the float64 result to float32 accuracy."""
    g64 = Gaussian(torch.linspace(-1, 1, 32, dtype=F64).reshape(2, 4, 4), 0.5)
    g32 = Gaussian(g64.mu.float(), 0.5)
    x = g64.noise(3, 80.0, torch.Generator().manual_seed(0))
    sigmas = karras_sigmas(10, 0.02, 80.0)
    sample = getattr(samplers_discrete, f"sample_{name}")
    noise = {} if name == "plms" else {"noise_sampler": lambda s, sn: torch.ones_like(x) / 2}
    noise32 = {} if name == "plms" else {"noise_sampler": lambda s, sn: torch.ones_like(x).float() / 2}
    out64 = sample(g64.denoiser, x, sigmas, **noise)
    out32 = sample(g32.denoiser, x.float(), sigmas.float(), **noise32)
    assert out32.dtype == torch.float32 and out32.shape == x.shape
    torch.testing.assert_close(out32.double(), out64, rtol=0, atol=1e-4)
