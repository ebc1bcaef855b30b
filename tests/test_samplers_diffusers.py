"""k-diffusion-family samplers against diffusers' schedulers, for an eps and a v network.

diffusers' Euler, Euler ancestral, Heun, KDPM2 (DPM2), KDPM2 ancestral, LMS, DPM-Solver SDE and
DPM-Solver multistep schedulers are independent implementations of `sample_euler`, ..., `sample_dpmpp_2m`,
`sample_dpmpp_2m_sde` and `sample_dpmpp_3m_sde` on a discrete schedule. Each runs here in its own loop,
with its own timestep spacing (leading, trailing, linspace, Karras), and ours runs on the same sigmas:

- Same network calls: the network of tests/test_samplers_discrete.py, called on our side by `Replay`
  with the timestep diffusers passed at the same call (diffusers rounds some, interpolates others).
- float64: diffusers stores sigmas as float32 and casts samples to float32 "to avoid precision issues".
  While its scheduler module runs, that module's `torch` and `np` are views in which float32 means
  float64 (`float64_scheduler`), so the comparison is at float64 rounding instead of float32's 1e-7.
- Same noise: one seeded generator on both sides (diffusers' DPM-Solver SDE is handed our noise sampler
  in place of its torchsde Brownian tree).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
)
from test_samplers_discrete import (
    F64,
    NETS,
    SCHEDULE,
    SD_LEADING,
    TOL,
    initial_noise,
    make_scheduler,
    max_error,
)

from openldm.diffusion import dpm_solver, samplers
from openldm.diffusion.denoisers import get_scalings
from openldm.diffusion.samplers import append_dims, default_noise_sampler

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, one thread

TRAILING = {"timestep_spacing": "trailing"}
LINSPACE = {"timestep_spacing": "linspace"}
KARRAS = {**SD_LEADING, "use_karras_sigmas": True}


class _Float64View(types.ModuleType):
    """A module seen with float32 meaning float64."""

    def __init__(self, module: types.ModuleType) -> None:
        super().__init__(module.__name__)
        self._module = module

    def __getattr__(self, name: str):
        return getattr(self._module, "float64" if name == "float32" else name)


@contextmanager
def float64_scheduler(scheduler) -> Iterator[None]:
    """Run diffusers' scheduler module in float64 (module docstring); the default dtype is float64 too."""
    module = sys.modules[type(scheduler).__module__]
    saved, default = (module.torch, module.np), torch.get_default_dtype()
    module.torch, module.np = _Float64View(torch), _Float64View(np)
    torch.set_default_dtype(F64)
    try:
        yield
    finally:
        module.torch, module.np = saved
        torch.set_default_dtype(default)


class Recorder:
    """The network as diffusers calls it, keeping each call's timestep."""

    def __init__(self, net) -> None:
        self.net, self.timesteps = net, []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.timesteps.append(torch.as_tensor(t, dtype=F64))
        return self.net(x, t)


class Replay:
    """Our denoiser for the comparison: the k-th call runs the network at diffusers' k-th timestep.

    The scalings are ours (`get_scalings`); the timestep is what diffusers fed its network, which is
    checked to be the one of this sigma (up to the rounding some diffusers schedulers apply to it).
    """

    def __init__(self, prediction: str, timesteps: list[torch.Tensor]) -> None:
        self.net, self.prediction, self.timesteps, self.calls = NETS[prediction][0], prediction, timesteps, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = self.timesteps[self.calls]
        self.calls += 1
        assert abs(float(SCHEDULE.sigma_to_t(sigma[:1])) - float(t)) <= 0.51, "the calls do not line up"
        s = get_scalings(self.prediction, sigma)
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in (s.c_skip, s.c_out, s.c_in))
        return c_skip * x + c_out * self.net(x * c_in, t)


class RecordedNoise:
    """The k-th call returns the k-th draw of a seeded generator, and records its (sigma, sigma_next)."""

    def __init__(self, x: torch.Tensor, seed: int = 3) -> None:
        self.shape, self.generator, self.calls = x.shape, torch.Generator().manual_seed(seed), []

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        self.calls.append((float(sigma), float(sigma_next)))
        return torch.randn(self.shape, generator=self.generator, dtype=F64)


def _noise(kind: str | None, x: torch.Tensor) -> tuple[dict, dict, object]:
    """(diffusers' step kwargs, our sampler kwargs, a noise sampler to hand the scheduler, if any)."""
    if kind == "generator":
        generator = torch.Generator().manual_seed(5)
        ours = default_noise_sampler(x, torch.Generator().manual_seed(5))
        return {"generator": generator}, {"noise_sampler": ours}, None
    if kind == "recorded":
        return {}, {"noise_sampler": RecordedNoise(x)}, RecordedNoise(x)
    return {}, {}, None


# (id, diffusers scheduler, its config, our sampler, our options, noise)
VE_CASES = [
    ("euler-leading", EulerDiscreteScheduler, SD_LEADING, samplers.sample_euler, {}, None),
    ("euler-trailing", EulerDiscreteScheduler, TRAILING, samplers.sample_euler, {}, None),
    ("euler-linspace", EulerDiscreteScheduler, LINSPACE, samplers.sample_euler, {}, None),
    ("euler-karras", EulerDiscreteScheduler, KARRAS, samplers.sample_euler, {}, None),
    ("euler_a-leading", EulerAncestralDiscreteScheduler, SD_LEADING, samplers.sample_euler_ancestral, {},
     "generator"),
    ("euler_a-trailing", EulerAncestralDiscreteScheduler, TRAILING, samplers.sample_euler_ancestral, {},
     "generator"),
    ("heun-leading", HeunDiscreteScheduler, SD_LEADING, samplers.sample_heun, {}, None),
    ("heun-karras", HeunDiscreteScheduler, KARRAS, samplers.sample_heun, {}, None),
    ("dpm_2-leading", KDPM2DiscreteScheduler, SD_LEADING, samplers.sample_dpm_2, {}, None),
    ("dpm_2-karras", KDPM2DiscreteScheduler, KARRAS, samplers.sample_dpm_2, {}, None),
    ("dpm_2_a-leading", KDPM2AncestralDiscreteScheduler, SD_LEADING, samplers.sample_dpm_2_ancestral, {},
     "generator"),
    ("lms-leading", LMSDiscreteScheduler, SD_LEADING, samplers.sample_lms, {}, None),
    ("lms-karras", LMSDiscreteScheduler, KARRAS, samplers.sample_lms, {}, None),
    ("dpmpp_sde-leading", DPMSolverSDEScheduler, SD_LEADING, dpm_solver.sample_dpmpp_sde, {}, "recorded"),
    ("dpmpp_sde-karras", DPMSolverSDEScheduler, KARRAS, dpm_solver.sample_dpmpp_sde, {}, "recorded"),
]


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize(("cls", "config", "sample", "options", "noise"), [c[1:] for c in VE_CASES],
                         ids=[c[0] for c in VE_CASES])
def test_ve_scheduler_parity(prediction: str, cls, config: dict, sample, options: dict, noise) -> None:
    """Schedulers that step x in VE form (x0 + sigma eps), scaling the network input themselves."""
    scheduler = make_scheduler(cls, prediction, **config)
    recorder = Recorder(NETS[prediction][0])
    with float64_scheduler(scheduler):
        scheduler.set_timesteps(10)
        x_start = initial_noise() * scheduler.init_noise_sigma
        step_kwargs, our_kwargs, scheduler_noise = _noise(noise, x_start)
        if scheduler_noise is not None:
            scheduler.noise_sampler = scheduler_noise
        x = x_start
        for t in scheduler.timesteps:
            out = recorder(scheduler.scale_model_input(x, t), t)
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    sigmas = torch.unique_consecutive(scheduler.sigmas)
    assert sigmas.dtype == F64 and len(sigmas) == 11 and sigmas[-1] == 0
    replay = Replay(prediction, recorder.timesteps)
    ours = sample(replay, x_start, sigmas, **options, **our_kwargs)
    assert replay.calls == len(recorder.timesteps)
    err = max_error(ours, x)
    assert err <= TOL, f"{cls.__name__} {config} {prediction}: max abs error {err:.3g} vs diffusers"
    assert (ours - x_start).abs().max() > 0.5, "the sampler did not move x"
    if scheduler_noise is not None:
        torch.testing.assert_close(torch.tensor(our_kwargs["noise_sampler"].calls),
                                   torch.tensor(scheduler_noise.calls), rtol=1e-12, atol=0)


DPM = {"algorithm_type": "dpmsolver++", **SD_LEADING}
SDE = {"algorithm_type": "sde-dpmsolver++", **SD_LEADING}
# (id, steps, DPMSolverMultistepScheduler config, our sampler, our options, noise)
VP_CASES = [
    ("2m", 10, {**DPM, "solver_order": 2}, dpm_solver.sample_dpmpp_2m, {}, None),
    ("2m-karras", 10, {**DPM, "solver_order": 2, "use_karras_sigmas": True}, dpm_solver.sample_dpmpp_2m, {},
     None),
    ("2m-trailing", 20, {**DPM, **TRAILING, "solver_order": 2}, dpm_solver.sample_dpmpp_2m, {}, None),
    ("2m-heun", 10, {**DPM, "solver_order": 2, "solver_type": "heun"}, dpm_solver.sample_dpmpp_2m_sde,
     {"eta": 0.0, "solver_type": "heun"}, None),
    ("3m-heun", 20, {**DPM, "solver_order": 3, "solver_type": "heun"}, dpm_solver.sample_dpmpp_3m_sde,
     {"eta": 0.0}, None),
    ("2m-sde", 10, {**SDE, "solver_order": 2}, dpm_solver.sample_dpmpp_2m_sde, {}, "generator"),
    ("2m-sde-heun", 10, {**SDE, "solver_order": 2, "solver_type": "heun"}, dpm_solver.sample_dpmpp_2m_sde,
     {"solver_type": "heun"}, "generator"),
]


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize(("steps", "config", "sample", "options", "noise"), [c[1:] for c in VP_CASES],
                         ids=[c[0] for c in VP_CASES])
def test_dpm_solver_multistep_parity(prediction: str, steps: int, config: dict, sample, options: dict, noise):
    """DPMSolverMultistepScheduler steps x in VP form; ours runs from the same x_T in VE form.

    DPM-Solver++(3M) with the "heun" second-order warm-up step is k-diffusion's 3M SDE at eta = 0: the
    same third-order weights (both halve the Taylor coefficient of the second difference).
    """
    scheduler = make_scheduler(DPMSolverMultistepScheduler, prediction, **config)
    recorder = Recorder(NETS[prediction][0])
    x_vp = initial_noise()
    with float64_scheduler(scheduler):
        scheduler.set_timesteps(steps)
        step_kwargs, our_kwargs, _ = _noise(noise, x_vp)
        x = x_vp
        for t in scheduler.timesteps:
            x = scheduler.step(recorder(x, t), t, x, **step_kwargs).prev_sample
    sigmas = scheduler.sigmas
    assert sigmas.dtype == F64 and len(sigmas) == steps + 1 and sigmas[-1] == 0
    replay = Replay(prediction, recorder.timesteps)
    ours = sample(replay, x_vp * (1 + sigmas[0] ** 2).sqrt(), sigmas, **options, **our_kwargs)
    assert replay.calls == len(recorder.timesteps)
    err = max_error(ours, x)
    assert err <= TOL, f"DPM-Solver {config} {prediction}: max abs error {err:.3g} vs diffusers"
    assert (ours - x_vp).abs().max() > 0.5, "the sampler did not move x"
