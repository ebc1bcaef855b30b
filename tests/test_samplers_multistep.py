"""UniPC, DEIS, iPNDM and Restart: parity with diffusers, convergence order, distribution, callbacks.

The parity harness (networks, float64 schedulers, loops) is the one of tests/test_samplers_discrete.py.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DEISMultistepScheduler, IPNDMScheduler, UniPCMultistepScheduler
from gaussian import Gaussian, karras_sigmas
from test_samplers_discrete import (
    F64,
    NETS,
    SCHEDULE,
    SD_LEADING,
    TOL,
    _check_distribution,
    denoised_end,
    gaussian_problem,
    initial_noise,
    karras_to_min,
    karras_to_zero,
    make_scheduler,
    max_error,
    observed_order,
    ode_end,
    run_diffusers,
    run_ours,
    sigmas_at,
    uniform_to_zero,
)

from openldm.diffusion import samplers_multistep
from openldm.diffusion.samplers import Step, default_noise_sampler, sample_heun
from openldm.diffusion.samplers_multistep import RestartInterval, restart_plan

# diffusers' DEIS and UniPC call NumPy on tensors in ways NumPy 2 deprecates: thousands of warnings.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]  # conftest.py: tiny tensors, one thread

# --- parity with diffusers -----------------------------------------------------------------------


def _multistep(cls: type, prediction: str, steps: int, **config) -> tuple[object, torch.Tensor]:
    """A diffusers multistep scheduler set to `steps`, its float32 sigmas replaced by our float64 ones."""
    scheduler = make_scheduler(cls, prediction, **config)
    scheduler.set_timesteps(steps)
    last = 0.0 if scheduler.sigmas[-1] == 0 else SCHEDULE.sigma_min
    sigmas = sigmas_at(scheduler.timesteps, last)
    torch.testing.assert_close(scheduler.sigmas.double(), sigmas, rtol=1e-6, atol=0)
    scheduler.sigmas = sigmas
    return scheduler, sigmas


UNIPC_CASES = [  # (steps, solver_order, solver_type, other config)
    (10, 2, "bh2", {}),
    (10, 2, "bh1", {"final_sigmas_type": "sigma_min"}),  # bh1 ending at sigma = 0 gives NaN in diffusers
    (20, 3, "bh2", {}),
    (20, 3, "bh1", {"final_sigmas_type": "sigma_min"}),
    (8, 3, "bh2", SD_LEADING),
    (25, 2, "bh2", {"timestep_spacing": "trailing"}),
    (12, 1, "bh2", {}),
    (12, 3, "bh2", {"disable_corrector": [0, 3]}),
]


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize(("steps", "order", "variant", "config"), UNIPC_CASES)
def test_unipc_matches_diffusers(prediction: str, steps: int, order: int, variant: str, config: dict) -> None:
    scheduler, sigmas = _multistep(
        UniPCMultistepScheduler, prediction, steps, solver_order=order, solver_type=variant, **config
    )
    x_vp = initial_noise()
    ref = run_diffusers(scheduler, NETS[prediction][0], x_vp)
    disable = config.get("disable_corrector", ())
    ours = run_ours(
        samplers_multistep.sample_unipc, prediction, x_vp, sigmas, order=order, variant=variant,
        disable_corrector=disable,
    )
    err = max_error(ours, ref)
    assert err <= TOL, f"UniPC-{order} {variant} {steps} steps {config}: max abs error {err:.3g} vs diffusers"
    assert (ours - x_vp).abs().max() > 0.5, "the sampler did not move x"


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize(("steps", "order"), [(10, 2), (10, 3), (20, 2), (20, 3), (6, 1)])
def test_deis_matches_diffusers(prediction: str, steps: int, order: int) -> None:
    """diffusers' DEIS ends at sigma_min (alphas_cumprod[0]); below 15 steps it lowers the last orders."""
    scheduler, sigmas = _multistep(DEISMultistepScheduler, prediction, steps, solver_order=order)
    assert sigmas[-1] > 0
    x_vp = initial_noise()
    ref = run_diffusers(scheduler, NETS[prediction][0], x_vp)
    ours = run_ours(samplers_multistep.sample_deis, prediction, x_vp, sigmas, order=order)
    err = max_error(ours, ref)
    assert err <= TOL, f"DEIS-{order} {steps} steps: max abs error {err:.3g} vs diffusers"


def _diffusers_ipndm(prediction: str, timesteps: torch.Tensor, x_vp: torch.Tensor) -> torch.Tensor:
    """diffusers' IPNDMScheduler on our sigmas: it takes the VP sigmas as `trained_betas` (n + 1 of them,
    ending in 0) and a v output, which we form from our network at its integer timestep."""
    sigmas = sigmas_at(timesteps, 0.0)
    sigmas_vp = sigmas / (1 + sigmas**2).sqrt()
    scheduler = IPNDMScheduler(trained_betas=sigmas_vp.tolist())
    scheduler.set_timesteps(len(timesteps))
    scheduler.betas, scheduler.alphas = sigmas_vp, (1 - sigmas_vp**2).sqrt()  # float64
    net = NETS[prediction][0]
    for i, t in enumerate(scheduler.timesteps):
        out = net(x_vp, timesteps[i])
        if prediction == "eps":  # v = (eps - sigma_vp x_vp) / alpha
            out = (out - sigmas_vp[i] * x_vp) / scheduler.alphas[i]
        x_vp = scheduler.step(out, t, x_vp).prev_sample
    return x_vp


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [3, 10, 20])
def test_ipndm_matches_diffusers(prediction: str, steps: int) -> None:
    timesteps = torch.arange(steps - 1, -1, -1) * (1000 // steps) + 1  # leading, offset 1
    x_vp = initial_noise()
    ref = _diffusers_ipndm(prediction, timesteps, x_vp)
    ours = run_ours(samplers_multistep.sample_ipndm, prediction, x_vp, sigmas_at(timesteps, 0.0))
    err = max_error(ours, ref)
    assert err <= TOL, f"iPNDM {prediction} {steps} steps: max abs error {err:.3g} vs diffusers"
    assert (ours - x_vp).abs().max() > 0.5, "the sampler did not move x"


# --- convergence order on the Gaussian problem ----------------------------------------------------

UNIPC_ORDERS = [  # (kwargs, expected order): the corrector adds one to the predictor's order
    ({"order": 1}, 2),
    ({"order": 2, "variant": "bh1"}, 3),
    ({"order": 2, "variant": "bh2"}, 3),
    ({"order": 3, "variant": "bh1"}, 4),
    ({"order": 3, "variant": "bh2"}, 4),
    ({"order": 2, "disable_corrector": range(200)}, 2),
]


@pytest.mark.parametrize(("kwargs", "order"), UNIPC_ORDERS)
def test_unipc_order(kwargs: dict, order: int) -> None:
    """Karras sigmas to 0; the last step is a plain denoise, so the reference is the exact x_n denoised.
    Seen: 2.01, 3.28, 3.12, 4.30, 4.27, 2.14."""
    slope, errors = observed_order(samplers_multistep.sample_unipc, karras_to_zero, denoised_end, **kwargs)
    assert slope >= 0.8 * order, f"UniPC {kwargs}: observed order {slope:.2f} < 0.8 * {order}; {errors}"


@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_order(order: int) -> None:
    """Karras sigmas stopping at sigma_min, against the exact ODE there (seen: 1.00, 2.04, 2.93)."""
    slope, errors = observed_order(
        samplers_multistep.sample_deis, karras_to_min, ode_end, steps=(32, 64, 128, 256), order=order
    )
    assert slope >= 0.8 * order, f"DEIS-{order}: observed order {slope:.2f} < 0.8 * {order}; {errors}"


def test_deis_steps_to_zero_by_denoising() -> None:
    """Whatever the order, the step to sigma = 0 is the plain denoise of x at the last sigma."""
    g = gaussian_problem()
    x = g.prior(8, 80.0, torch.Generator().manual_seed(0))
    sigmas = karras_to_zero(20)  # 20 and 19 steps: no lowered orders at the end
    out = samplers_multistep.sample_deis(g.denoiser, x, sigmas, order=3)
    x_last = samplers_multistep.sample_deis(g.denoiser, x, sigmas[:-1], order=3)
    torch.testing.assert_close(out, g.denoiser(x_last, sigmas[-2].expand(8)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("sigmas_for", [karras_to_min, uniform_to_zero])
@pytest.mark.parametrize("order", [2, 4])
def test_ipndm_order(order: int, sigmas_for) -> None:
    """Its Euler first step and equal-step weights on a non-uniform grid both cap iPNDM at order 2
    (seen: 2.06 and 2.15 on Karras sigmas; 1.92 and 2.95 evenly spaced, where the tiny Euler-step error
    at sigma = 5 does not dominate yet)."""
    slope, errors = observed_order(samplers_multistep.sample_ipndm, sigmas_for, ode_end, order=order)
    assert slope >= 0.8 * 2, f"iPNDM-{order}: observed order {slope:.2f} < 1.6; {errors}"


# --- Restart ------------------------------------------------------------------------------------


class DrawnNoise:
    """The k-th call returns the k-th draw of a seeded generator, and records its (sigma, sigma_next)."""

    def __init__(self, x: torch.Tensor, seed: int = 3) -> None:
        self.shape, self.generator, self.calls = x.shape, torch.Generator().manual_seed(seed), []

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        self.calls.append((float(sigma), float(sigma_next)))
        return torch.randn(self.shape, generator=self.generator, dtype=F64)


def test_restart_without_restarts_is_heun() -> None:
    g = gaussian_problem()
    x = g.noise(4, 80.0)
    sigmas = karras_sigmas(12, 0.02, 80.0)
    ours = samplers_multistep.sample_restart(g.denoiser, x, sigmas, restarts=())
    torch.testing.assert_close(ours, sample_heun(g.denoiser, x, sigmas), rtol=0, atol=0)


def _exact_restart(g: Gaussian, x: torch.Tensor, sigmas: torch.Tensor, restart, noise: DrawnNoise):
    """The exact ODE down to the snapped sigma_min, exact restarts, the exact ODE to sigma_n, denoise."""
    (j,) = restart_plan(sigmas, [restart])
    lo, hi = sigmas[j], torch.tensor(restart.sigma_max, dtype=F64)
    x = g.ode(x, sigmas[0], lo)
    for _ in range(restart.repeats):
        x = g.ode(x + noise(hi, lo) * (hi**2 - lo**2).sqrt(), hi, lo)
    return g.denoiser(g.ode(x, lo, sigmas[-2]), sigmas[-2].expand(x.shape[0]))


def test_restart_is_second_order_along_its_noise_path() -> None:
    """With the same noise draws, the sampler converges to the exact Restart process (ODE, noise, ODE)
    at Heun's order 2 (seen: 2.1), restart steps growing with the main steps."""
    g = gaussian_problem()
    x = g.prior(16, 80.0, torch.Generator().manual_seed(0))
    steps, errors = (16, 32, 64, 128), []
    for n in steps:
        sigmas, restart = karras_to_zero(n), RestartInterval(0.5, 3.0, steps=n // 4, repeats=2)
        out = samplers_multistep.sample_restart(
            g.denoiser, x, sigmas, restarts=[restart], noise_sampler=DrawnNoise(x)
        )
        errors.append((out - _exact_restart(g, x, sigmas, restart, DrawnNoise(x))).abs().max().item())
    xs, ys = torch.tensor(steps, dtype=F64).log(), -torch.tensor(errors, dtype=F64).log()
    slope = float(((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum())
    assert slope >= 0.8 * 2, f"Restart: observed order {slope:.2f}; {errors}"


def test_restart_samples_the_data() -> None:
    """20000 samples, 30 steps with the default restarts: the restarts keep the marginal exact (up to
    Heun's error), so the output has the law of the final denoise. Std bias seen with 200000 samples:
    +0.4% to +1.0%, as for plain Heun at 30 steps (+0.6% to +1.4%); allowance 2% plus 5 standard errors."""
    g, batch = gaussian_problem(), 20000
    generator = torch.Generator().manual_seed(1)
    sigmas = karras_sigmas(30, 0.02, 80.0)
    x = g.prior(batch, 80.0, generator)
    noise = default_noise_sampler(x, generator)
    out = samplers_multistep.sample_restart(g.denoiser, x, sigmas, noise_sampler=noise)
    _check_distribution(out, g.mu, g.denoised_std(float(sigmas[-2])), bias=0.02)


def test_restart_draws_and_reports() -> None:
    """One noise draw per repeat over (sigma_max, snapped sigma_min); one callback per Heun step."""
    g = gaussian_problem()
    sigmas = karras_sigmas(10, 0.02, 80.0)
    x = g.noise(3, 80.0)
    restarts = [RestartInterval(0.1, 2.0, steps=3, repeats=2), RestartInterval(1.0, 5.0, steps=2, repeats=1)]
    noise, steps = DrawnNoise(x), []
    samplers_multistep.sample_restart(
        g.denoiser, x, sigmas, restarts=restarts, noise_sampler=noise, callback=steps.append
    )
    plan = restart_plan(sigmas, restarts)
    snapped = {r.sigma_min: float(sigmas[j]) for j, rs in plan.items() for r in rs}
    expected = [(5.0, snapped[1.0]), (2.0, snapped[0.1]), (2.0, snapped[0.1])]
    torch.testing.assert_close(torch.tensor(noise.calls), torch.tensor(expected), rtol=1e-12, atol=0)
    assert [s.i for s in steps] == list(range(10 + 3 * 2 + 2))
    for s in steps:
        torch.testing.assert_close(s.denoised, g.denoiser(s.x, s.sigma.expand(3)), rtol=1e-12, atol=1e-12)


def test_restart_rejects_an_empty_interval() -> None:
    sigmas = karras_sigmas(10, 0.02, 80.0)
    with pytest.raises(ValueError, match="empty"):
        restart_plan(sigmas, [RestartInterval(sigma_min=5.0, sigma_max=4.0)])


# --- callbacks and dtypes -------------------------------------------------------------------------

SAMPLERS = ["unipc", "deis", "ipndm"]


@pytest.mark.parametrize("name", SAMPLERS)
def test_callback_once_per_step(name: str) -> None:
    """One `Step` per step, in order, at sigmas[i], with the x it denoised and its denoised value."""
    g = gaussian_problem()
    sigmas = karras_sigmas(7, 0.02, 80.0)
    x = g.noise(3, 80.0)
    steps: list[Step] = []
    getattr(samplers_multistep, f"sample_{name}")(g.denoiser, x, sigmas, callback=steps.append)
    assert [s.i for s in steps] == list(range(7))
    assert [float(s.sigma) for s in steps] == sigmas[:-1].tolist()
    torch.testing.assert_close(steps[0].x, x, rtol=0, atol=0)
    for s in steps:
        torch.testing.assert_close(s.denoised, g.denoiser(s.x, s.sigma.expand(3)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", [*SAMPLERS, "restart"])
def test_image_shaped_float32(name: str) -> None:
    """(batch, channels, height, width) in float32 gives the float64 result to float32 accuracy."""
    g64 = Gaussian(torch.linspace(-1, 1, 32, dtype=F64).reshape(2, 4, 4), 0.5)
    g32 = Gaussian(g64.mu.float(), 0.5)
    x = g64.noise(3, 80.0, torch.Generator().manual_seed(0))
    sigmas = karras_sigmas(10, 0.02, 80.0)
    sample = getattr(samplers_multistep, f"sample_{name}")
    kwargs = {"noise_sampler": lambda s, sn: torch.full_like(x, 0.5)} if name == "restart" else {}
    out64 = sample(g64.denoiser, x, sigmas, **kwargs)
    if name == "restart":
        kwargs = {"noise_sampler": lambda s, sn: torch.full_like(x, 0.5).float()}
    out32 = sample(g32.denoiser, x.float(), sigmas.float(), **kwargs)
    assert out32.dtype == torch.float32 and out32.shape == x.shape
    torch.testing.assert_close(out32.double(), out64, rtol=0, atol=1e-4)


BAD_OPTIONS = [("unipc", {"order": 4}), ("unipc", {"variant": "bh3"}), ("deis", {"order": 4}),
               ("ipndm", {"order": 5})]


@pytest.mark.parametrize(("name", "kwargs"), BAD_OPTIONS)
def test_rejects_unknown_orders(name: str, kwargs: dict) -> None:
    g = gaussian_problem()
    sample = getattr(samplers_multistep, f"sample_{name}")
    with pytest.raises(ValueError, match="order"):
        sample(g.denoiser, g.noise(1, 80.0), karras_sigmas(4, 0.1, 80.0), **kwargs)
