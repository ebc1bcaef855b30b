"""k-diffusion-family samplers (`samplers.py`, `dpm_solver.py`): parity with k-diffusion, convergence order,
distributions, callbacks."""

from __future__ import annotations

import pytest
import torch
from gaussian import Gaussian, Mixture, karras_sigmas
from oracles import k_sampling

from openldm.diffusion import dpm_solver, samplers
from openldm.diffusion.samplers import Step

F64 = torch.float64
SIGMA_MIN, SIGMA_MAX = 0.02, 80.0


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, one thread


def sampler(name: str):
    """Our `sample_<name>`, from `samplers.py` or `dpm_solver.py`."""
    module = dpm_solver if hasattr(dpm_solver, f"sample_{name}") else samplers
    return getattr(module, f"sample_{name}")


class RecordedNoise:
    """A deterministic noise sampler: the k-th call returns the k-th draw of a seeded generator.

    Two fresh instances with the same seed give the same noise to two samplers that call them the
    same number of times; `calls` keeps the (sigma, sigma_next) of every call to compare where.
    """

    def __init__(self, x: torch.Tensor, seed: int = 1) -> None:
        self.shape, self.generator = x.shape, torch.Generator().manual_seed(seed)
        self.calls: list[tuple[float, float]] = []

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        self.calls.append((float(sigma), float(sigma_next)))
        return torch.randn(self.shape, generator=self.generator, dtype=F64)


class ChurnNoise:
    """The noise k-diffusion's churn draws with `torch.randn_like(x)` at every step, keyed by sigma."""

    def __init__(self, x: torch.Tensor, sigmas: torch.Tensor, seed: int) -> None:
        torch.manual_seed(seed)
        self.noise = {float(sigma): torch.randn_like(x) for sigma in sigmas[:-1]}

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return self.noise[float(sigma)]


def gaussian_problem() -> Gaussian:
    return Gaussian(torch.tensor([-1.0, 0.5, 2.0], dtype=F64), torch.tensor([0.5, 1.0, 2.0], dtype=F64))


def mixture_problem() -> Mixture:
    return Mixture(torch.tensor([[-1.5, 0.0, 1.0], [1.0, 1.0, -0.5], [0.0, -2.0, 0.5]], dtype=F64), 0.4)


SIGMAS_CASES = [
    ("euler", {}),
    ("euler", {"s_churn": 1.0}),
    ("euler", {"s_churn": 3.0, "s_tmin": 0.3, "s_tmax": 10.0, "s_noise": 1.007}),
    ("heun", {}),
    ("heun", {"s_churn": 1.0}),
    ("heun", {"s_churn": 3.0, "s_tmin": 0.3, "s_tmax": 10.0, "s_noise": 1.007}),
    ("dpm_2", {}),
    ("dpm_2", {"s_churn": 1.0}),
    ("dpm_2", {"s_churn": 3.0, "s_tmin": 0.3, "s_tmax": 10.0, "s_noise": 1.007}),
    ("lms", {}),
    ("lms", {"order": 2}),
    ("lms", {"order": 6}),
    ("euler_ancestral", {}),
    ("euler_ancestral", {"eta": 0.5, "s_noise": 0.9}),
    ("dpm_2_ancestral", {}),
    ("dpm_2_ancestral", {"eta": 0.5, "s_noise": 0.9}),
    ("dpmpp_2s_ancestral", {}),
    ("dpmpp_2s_ancestral", {"eta": 0.5, "s_noise": 0.9}),
    ("dpmpp_sde", {}),
    ("dpmpp_sde", {"eta": 0.5, "s_noise": 0.9, "r": 0.3}),
    ("dpmpp_2m", {}),
    ("dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde", {"solver_type": "heun"}),
    ("dpmpp_2m_sde", {"eta": 0.5, "s_noise": 0.9, "solver_type": "heun"}),
    ("dpmpp_2m_sde", {"eta": 0.0}),
    ("dpmpp_3m_sde", {}),
    ("dpmpp_3m_sde", {"eta": 0.5, "s_noise": 0.9}),
    ("dpmpp_3m_sde", {"eta": 0.0}),
]
CHURN = {"euler", "heun", "dpm_2"}
NO_NOISE = {"lms", "dpmpp_2m"}


def _ids(cases: list[tuple[str, dict]]) -> list[str]:
    return [name + "".join(f"-{k}={v}" for k, v in kwargs.items()) for name, kwargs in cases]


def _noise_pair(name: str, x: torch.Tensor, sigmas: torch.Tensor) -> tuple[dict, dict]:
    """Keyword arguments giving ours and k-diffusion's sampler the same noise."""
    if name in NO_NOISE:
        return {}, {}
    if name in CHURN:
        return {"noise_sampler": ChurnNoise(x, sigmas, seed=7)}, {}  # k-diffusion: torch.manual_seed(7)
    return {"noise_sampler": RecordedNoise(x)}, {"noise_sampler": RecordedNoise(x)}


@pytest.mark.parametrize("problem", [gaussian_problem, mixture_problem], ids=["gaussian", "mixture"])
@pytest.mark.parametrize(("name", "kwargs"), SIGMAS_CASES, ids=_ids(SIGMAS_CASES))
def test_parity_with_k_diffusion(name: str, kwargs: dict, problem) -> None:
    """Same denoiser, sigmas and noise as k-diffusion, in float64: the results agree to 1e-9 (seen: 4e-15)."""
    denoiser = problem().denoiser
    sigmas = karras_sigmas(10, SIGMA_MIN, SIGMA_MAX)
    x = torch.randn(5, 3, dtype=F64) * SIGMA_MAX
    ours_noise, k_noise = _noise_pair(name, x, sigmas)
    ours = sampler(name)(denoiser, x, sigmas, **kwargs, **ours_noise)
    torch.manual_seed(7)
    ref = getattr(k_sampling(), f"sample_{name}")(denoiser, x, sigmas, disable=True, **kwargs, **k_noise)
    err = (ours - ref).abs().max().item()
    assert err <= 1e-9, f"{name} {kwargs}: max abs error {err:.3g} vs k-diffusion"
    assert (ours - x).abs().max() > 1.0, "the sampler did not move x"
    if "noise_sampler" in k_noise:
        ours_calls, k_calls = ours_noise["noise_sampler"].calls, k_noise["noise_sampler"].calls
        assert len(ours_calls) == len(k_calls), f"{len(ours_calls)} noise draws vs {len(k_calls)}"
        torch.testing.assert_close(torch.tensor(ours_calls), torch.tensor(k_calls), rtol=1e-9, atol=0)


DPM_CASES = [
    ("dpm_fast", {"n": 10}),
    ("dpm_fast", {"n": 11}),
    ("dpm_fast", {"n": 12}),
    ("dpm_fast", {"n": 12, "eta": 0.5, "s_noise": 0.9}),
    ("dpm_adaptive", {}),
    ("dpm_adaptive", {"order": 2}),
    ("dpm_adaptive", {"rtol": 0.01, "atol": 1e-3, "h_init": 0.2,
                      "pcoeff": 0.2, "icoeff": 0.5, "dcoeff": 0.1}),
    ("dpm_adaptive", {"eta": 0.5, "s_noise": 0.9, "accept_safety": 0.9}),
]


def _k_dpm_solver(name: str, denoiser, x: torch.Tensor, noise: RecordedNoise, **kwargs) -> torch.Tensor:
    """k-diffusion's DPM-Solver with float64 log-sigma times.

    Its wrappers make the times with `torch.tensor(sigma)` and `torch.linspace` in the default dtype;
    float32 rounding there swamps the tiny error estimates of the first adaptive steps.
    """
    default = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        sample = getattr(k_sampling(), f"sample_{name}")
        return sample(denoiser, x, SIGMA_MIN, SIGMA_MAX, disable=True, noise_sampler=noise, **kwargs)
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize("problem", [gaussian_problem, mixture_problem], ids=["gaussian", "mixture"])
@pytest.mark.parametrize(("name", "kwargs"), DPM_CASES, ids=_ids(DPM_CASES))
def test_dpm_solver_parity_with_k_diffusion(name: str, kwargs: dict, problem) -> None:
    """DPM-Solver fast and adaptive against k-diffusion's, in float64 with the same noise."""
    denoiser = problem().denoiser
    x = torch.randn(5, 3, dtype=F64) * SIGMA_MAX
    ours_noise, k_noise = RecordedNoise(x), RecordedNoise(x)
    ours = sampler(name)(
        denoiser, x, SIGMA_MIN, SIGMA_MAX, **kwargs, noise_sampler=ours_noise
    )
    ref = _k_dpm_solver(name, denoiser, x, k_noise, **kwargs)
    err = (ours - ref).abs().max().item()
    assert err <= 1e-9, f"{name} {kwargs}: max abs error {err:.3g} vs k-diffusion"
    assert (ours - x).abs().max() > 1.0, "the sampler did not move x"
    if kwargs.get("eta"):
        assert len(ours_noise.calls) == len(k_noise.calls) > 0
        ours_calls, k_calls = torch.tensor(ours_noise.calls), torch.tensor(k_noise.calls)
        torch.testing.assert_close(ours_calls, k_calls, rtol=1e-9, atol=0)


def test_dpm_2_ancestral_adds_noise_when_sigma_down_is_zero() -> None:
    """With eta big enough that sigma_down = 0, DPM-2 ancestral is Euler ancestral: denoise, then noise.

    k-diffusion 0.1.1 skips the noise in that case (x jumps to the clean `denoised` at sigma_next > 0);
    we add it (one of the two deliberate differences listed in the samplers module docstring).
    """
    g = gaussian_problem()
    sigmas = karras_sigmas(6, 0.5, SIGMA_MAX, rho=1.0)  # every step ratio <= 0.5: sigma_up = sigma_next
    x = g.noise(4, SIGMA_MAX)
    dpm_2 = samplers.sample_dpm_2_ancestral(g.denoiser, x, sigmas, eta=2.0, noise_sampler=RecordedNoise(x))
    euler = samplers.sample_euler_ancestral(g.denoiser, x, sigmas, eta=2.0, noise_sampler=RecordedNoise(x))
    torch.testing.assert_close(dpm_2, euler, rtol=0, atol=1e-12)
    k_dpm_2 = k_sampling().sample_dpm_2_ancestral(
        g.denoiser, x, sigmas, eta=2.0, noise_sampler=RecordedNoise(x), disable=True
    )
    assert (k_dpm_2 - dpm_2).abs().max() > 0.1, "k-diffusion's no-noise behaviour is back"


# Convergence order on the Gaussian problem.
#
# The error is measured at sigma = 0 against the exact answer *for the sampler's own last step*. Most
# samplers end with a plain denoise x_0 = D(x_n, sigma_n), which is not the ODE solution at 0 even from
# the exact x_n, and whose error would not shrink with the step count for a fixed sigma_min. Their
# reference is therefore D(exact x_n, sigma_n) (`Gaussian.denoised_end`): D is affine with slope
# s^2 / (s^2 + sigma_n^2) ~ 1, so the measured error is the global ODE error at sigma_n. LMS integrates
# its last step to 0 as a genuine (high-order) step, so its reference is the exact ODE solution at 0.
# DPM-Solver fast/adaptive stop at sigma_min; their reference is the exact ODE solution there.
# Karras sigmas with rho = 7 shrink every step with the step count, so the slope of log(error)
# against log(steps) over 16..128 steps estimates the order.

CONVERGENCE_STEPS = (16, 32, 64, 128)
ORDERS = [
    ("euler", {}, 1),
    ("heun", {}, 2),
    ("dpm_2", {}, 2),
    ("lms", {}, 4),
    ("lms", {"order": 3}, 3),
    ("dpmpp_2m", {}, 2),
    ("dpmpp_2m_sde", {"eta": 0.0}, 2),
    ("dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, 2),
    # The third-order term of DPM-Solver++(3M) (as in k-diffusion and the DPM-Solver code) is half the
    # Taylor coefficient, so its local error is O(h^3): it converges at second order.
    ("dpmpp_3m_sde", {"eta": 0.0}, 2),
    ("euler_ancestral", {"eta": 0.0}, 1),
    ("dpm_2_ancestral", {"eta": 0.0}, 2),
    ("dpmpp_2s_ancestral", {"eta": 0.0}, 2),
    ("dpmpp_sde", {"eta": 0.0}, 2),
]


def _slope(steps: tuple[int, ...], errors: list[float]) -> float:
    """Least-squares slope of -log(error) against log(steps): the observed order."""
    xs, ys = torch.tensor(steps, dtype=F64).log(), -torch.tensor(errors, dtype=F64).log()
    xs = xs - xs.mean()
    return float((xs * (ys - ys.mean())).sum() / (xs**2).sum())


@pytest.mark.parametrize(("name", "kwargs", "order"), ORDERS, ids=_ids([(n, k) for n, k, _ in ORDERS]))
def test_convergence_order(name: str, kwargs: dict, order: int) -> None:
    g = gaussian_problem()
    x = g.prior(16, SIGMA_MAX, torch.Generator().manual_seed(0))
    errors = []
    for n in CONVERGENCE_STEPS:
        sigmas = karras_sigmas(n, SIGMA_MIN, SIGMA_MAX)
        out = sampler(name)(g.denoiser, x, sigmas, **kwargs)
        ref = g.ode(x, sigmas[0], 0.0) if name == "lms" else g.denoised_end(x, sigmas)
        errors.append((out - ref).abs().max().item())
    slope = _slope(CONVERGENCE_STEPS, errors)
    assert errors[-1] > 1e-11, "errors at rounding level: the slope would mean nothing"
    assert slope >= 0.8 * order, f"{name} {kwargs}: observed order {slope:.2f} < 0.8 * {order}; {errors}"


def test_dpm_fast_is_third_order() -> None:
    """n = 3m - 1 evaluations: m - 1 third-order steps and a second-order last one (a first-order last
    step, when 3 divides n or n = 3m + 1, would cap the global order at 2)."""
    g = gaussian_problem()
    x = g.prior(16, SIGMA_MAX, torch.Generator().manual_seed(0))
    ref = g.ode(x, SIGMA_MAX, SIGMA_MIN)
    nfes = (23, 47, 95, 191)  # 8, 16, 32, 64 steps
    errors = [(dpm_solver.sample_dpm_fast(g.denoiser, x, SIGMA_MIN, SIGMA_MAX, n) - ref).abs().max().item()
              for n in nfes]
    slope = _slope(nfes, errors)
    assert slope >= 0.8 * 3, f"dpm_fast: observed order {slope:.2f}; {errors}"


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_adaptive_error_follows_tolerance(order: int) -> None:
    """Each tenfold cut of rtol lowers the error and costs evaluations; rtol / 1000 gives error / 100."""
    g = gaussian_problem()
    x = g.prior(16, SIGMA_MAX, torch.Generator().manual_seed(0))
    ref = g.ode(x, SIGMA_MAX, SIGMA_MIN)
    errors, nfes = [], []
    for rtol in (1e-2, 1e-3, 1e-4, 1e-5):
        out, info = dpm_solver.dpm_solver_adaptive(
            g.denoiser, x, SIGMA_MIN, SIGMA_MAX, order=order, rtol=rtol, atol=1e-8
        )
        errors.append((out - ref).abs().max().item())
        nfes.append(info.nfe)
        assert info.nfe == order * (info.n_accept + info.n_reject)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert all(a < b for a, b in zip(nfes, nfes[1:])), nfes
    assert errors[-1] < errors[0] / 100, errors


# Stochastic samplers reproduce the data distribution.


class StepBrownian:
    """Brownian noise consistent within a step: calls that share `sigma` see one Brownian path below it.

    DPM++ SDE draws over (sigma, sigma_stage) and then over (sigma, sigma_next); the second increment
    contains the first, as with k-diffusion's Brownian tree, without torchsde's cost.
    """

    def __init__(self, x: torch.Tensor, generator: torch.Generator) -> None:
        self.shape, self.generator = x.shape, generator
        self.start, self.path = None, {}

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        a, b = float(sigma), float(sigma_next)
        if a != self.start:
            self.start, self.path = a, {a: torch.zeros(self.shape, dtype=F64)}
        if b not in self.path:
            lowest = min(self.path)
            assert b < lowest, "queries within a step must go down"
            z = torch.randn(self.shape, generator=self.generator, dtype=F64)
            self.path[b] = self.path[lowest] + (lowest - b) ** 0.5 * z
        return self.path[b] / (a - b) ** 0.5


# (name, kwargs, allowance for the discretization bias of the output std at 100 steps). Measured biases
# at 100 karras steps: about -5% for the first-order ones (halving with each doubling of the steps), and
# under 1% (within the statistical noise) for the second-order ones.
STOCHASTIC = [
    ("euler_ancestral", {}, 0.07),
    ("euler_ancestral", {"eta": 0.5, "s_noise": 1.0}, 0.07),
    ("euler", {"s_churn": 10.0}, 0.07),
    ("heun", {"s_churn": 10.0}, 0.015),
    ("dpm_2", {"s_churn": 10.0}, 0.015),
    ("dpm_2_ancestral", {}, 0.015),
    ("dpmpp_2s_ancestral", {}, 0.015),
    ("dpmpp_sde", {"brownian": True}, 0.015),
    ("dpmpp_sde", {}, 0.07),  # independent draws for its two nested intervals: a first-order bias
    ("dpmpp_2m_sde", {}, 0.015),
    ("dpmpp_2m_sde", {"solver_type": "heun"}, 0.015),
    ("dpmpp_3m_sde", {}, 0.015),
]


@pytest.mark.parametrize(("name", "kwargs", "bias"), STOCHASTIC, ids=_ids([(n, k) for n, k, _ in STOCHASTIC]))
def test_stochastic_sampler_matches_data_distribution(name: str, kwargs: dict, bias: float) -> None:
    """20000 samples from the exact noisy marginal at sigma_max, 100 steps to 0.

    The target is N(mu, s^4 / (s^2 + sigma_n^2)): the law of the final plain denoise from the exact
    marginal at sigma_n. The mean is exact for every sampler here (the maps are affine and fix mu), so
    it must be within 5 standard errors; the std within 5 standard errors (1/sqrt(2 * 20000) = 0.5%
    relative) plus the sampler's discretization allowance.
    """
    g, batch = gaussian_problem(), 20000
    generator = torch.Generator().manual_seed(1)
    x = g.prior(batch, SIGMA_MAX, generator)
    kwargs = dict(kwargs)
    brownian = kwargs.pop("brownian", False)
    noise = StepBrownian(x, generator) if brownian else samplers.default_noise_sampler(x, generator)
    sigmas = karras_sigmas(100, SIGMA_MIN, SIGMA_MAX)
    out = sampler(name)(g.denoiser, x, sigmas, noise_sampler=noise, **kwargs)
    std = g.denoised_std(float(sigmas[-2]))
    mean_z = ((out.mean(0) - g.mu) / (std / batch**0.5)).abs().max().item()
    std_err = (out.std(0) / std - 1).abs().max().item()
    assert mean_z <= 5, f"{name}: mean off by {mean_z:.1f} standard errors"
    assert std_err <= 5 / (2 * batch) ** 0.5 + bias, f"{name}: std off by {std_err:.2%}"


# Callbacks, shapes and argument checks.

SIGMAS_SAMPLERS = sorted({name for name, _ in SIGMAS_CASES})


@pytest.mark.parametrize("name", SIGMAS_SAMPLERS)
def test_callback_once_per_step(name: str) -> None:
    """One `Step` per step, in order, at sigmas[i], with x before the step and its denoised value."""
    g = gaussian_problem()
    sigmas = karras_sigmas(7, SIGMA_MIN, SIGMA_MAX)
    x = g.noise(3, SIGMA_MAX)
    steps: list[Step] = []
    sampler(name)(g.denoiser, x, sigmas, callback=steps.append)
    assert [s.i for s in steps] == list(range(7))
    assert [float(s.sigma) for s in steps] == sigmas[:-1].tolist()
    assert all(float(s.sigma_hat) == float(s.sigma) for s in steps)
    torch.testing.assert_close(steps[0].x, x, rtol=0, atol=0)
    for s in steps:
        torch.testing.assert_close(s.denoised, g.denoiser(s.x, s.sigma.expand(3)), rtol=1e-12, atol=1e-12)


def test_callback_reports_churned_sigma_hat() -> None:
    g = gaussian_problem()
    sigmas = karras_sigmas(5, SIGMA_MIN, SIGMA_MAX)
    steps: list[Step] = []
    x = g.noise(3, SIGMA_MAX)
    samplers.sample_euler(g.denoiser, x, sigmas, callback=steps.append, s_churn=1.0, s_tmax=1.0)
    gamma = min(1.0 / 5, 2**0.5 - 1)
    expected = [float(s) * (1 + gamma) if s <= 1.0 else float(s) for s in sigmas[:-1]]
    assert [float(s.sigma_hat) for s in steps] == pytest.approx(expected, rel=1e-12)
    assert [float(s.sigma) for s in steps] == sigmas[:-1].tolist()


def test_dpm_callbacks() -> None:
    """dpm_fast reports each of its steps; dpm_adaptive each accepted step, from sigma_max downward."""
    g = gaussian_problem()
    x = g.noise(3, SIGMA_MAX)
    fast: list[Step] = []
    dpm_solver.sample_dpm_fast(g.denoiser, x, SIGMA_MIN, SIGMA_MAX, 10, callback=fast.append)
    assert [s.i for s in fast] == [0, 1, 2, 3]  # 10 evaluations: orders 3, 3, 3, 1
    assert float(fast[0].sigma) == pytest.approx(SIGMA_MAX, rel=1e-12)
    log_sigmas = torch.tensor([float(s.sigma) for s in fast], dtype=F64).log()
    torch.testing.assert_close(log_sigmas.diff(), log_sigmas.diff()[:1].expand(3))  # uniform in log sigma
    adaptive: list[Step] = []
    _, info = dpm_solver.dpm_solver_adaptive(g.denoiser, x, SIGMA_MIN, SIGMA_MAX, callback=adaptive.append)
    assert [s.i for s in adaptive] == list(range(info.n_accept))
    assert info.n_reject > 0, "the default tolerances reject a few steps on this problem"
    sigmas = [float(s.sigma) for s in adaptive]
    assert sigmas[0] == pytest.approx(SIGMA_MAX, rel=1e-12)
    assert all(a > b > SIGMA_MIN for a, b in zip(sigmas, sigmas[1:]))


ALL_SAMPLERS = [(name, {}) for name in SIGMAS_SAMPLERS] + [("dpm_fast", {"n": 9}), ("dpm_adaptive", {})]


@pytest.mark.parametrize(("name", "kwargs"), ALL_SAMPLERS, ids=_ids(ALL_SAMPLERS))
def test_image_shaped_float32(name: str, kwargs: dict) -> None:
    """(batch, channels, height, width) in float32 gives the float64 result to float32 accuracy."""
    g64 = Gaussian(torch.linspace(-1, 1, 32, dtype=F64).reshape(2, 4, 4), 0.5)
    g32 = Gaussian(g64.mu.float(), 0.5)
    x = g64.noise(3, SIGMA_MAX)
    sample = sampler(name)
    outs = []
    for g, dtype in ((g64, F64), (g32, torch.float32)):
        noise = RecordedNoise(x)
        noise_sampler = lambda s, s_next, noise=noise, dtype=dtype: noise(s, s_next).to(dtype)  # noqa: E731
        if name in ("dpm_fast", "dpm_adaptive"):
            args = (SIGMA_MIN, SIGMA_MAX)
        else:
            args = (karras_sigmas(12, SIGMA_MIN, SIGMA_MAX).to(dtype),)
        if name not in NO_NOISE:
            kwargs = {**kwargs, "noise_sampler": noise_sampler}
        outs.append(sample(g.denoiser, x.to(dtype), *args, **kwargs))
    assert outs[1].shape == x.shape and outs[1].dtype == torch.float32
    err = (outs[1] - outs[0]).abs().max().item()
    assert err < 1e-3, f"{name}: float32 vs float64 max abs difference {err:.3g}"


def test_lms_coefficients_integrate_the_interval() -> None:
    """The Lagrange basis sums to 1, so the coefficients sum to sigma_i+1 - sigma_i; order 1 is Euler."""
    sigmas = karras_sigmas(10, SIGMA_MIN, SIGMA_MAX).tolist()
    for order in (1, 2, 4, 6):
        coeffs = samplers._lms_coefficients(sigmas, 7, order)
        assert sum(coeffs) == pytest.approx(sigmas[8] - sigmas[7], rel=1e-12)
    assert samplers._lms_coefficients(sigmas, 7, 1) == pytest.approx([sigmas[8] - sigmas[7]], rel=1e-14)


def test_argument_checks() -> None:
    g, x = gaussian_problem(), torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        dpm_solver.sample_dpm_fast(g.denoiser, x, 0.0, SIGMA_MAX, 10)
    with pytest.raises(ValueError, match="at least one"):
        dpm_solver.sample_dpm_fast(g.denoiser, x, SIGMA_MIN, SIGMA_MAX, 0)
    with pytest.raises(ValueError, match="order must be 2 or 3"):
        dpm_solver.sample_dpm_adaptive(g.denoiser, x, SIGMA_MIN, SIGMA_MAX, order=4)
    with pytest.raises(ValueError, match="solver_type"):
        sigmas = karras_sigmas(3, SIGMA_MIN, SIGMA_MAX)
        dpm_solver.sample_dpmpp_2m_sde(g.denoiser, x, sigmas, solver_type="rk4")


def test_default_noise_follows_the_global_seed() -> None:
    """Without a noise sampler, stochastic samplers draw from torch's global generator."""
    g = gaussian_problem()
    sigmas = karras_sigmas(6, SIGMA_MIN, SIGMA_MAX)
    x = g.noise(4, SIGMA_MAX)
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(dpm_solver.sample_dpmpp_2m_sde(g.denoiser, x, sigmas))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
