import pytest
import torch

from openldm.diffusion import samplers as k
from openldm.diffusion.registry import SAMPLERS, SCHEDULE_DISPLAY, resolve
from openldm.diffusion.schedules import DiscreteSchedule
from openldm.diffusion.sigmas import SCHEDULERS, get_sigmas


@pytest.mark.parametrize(
    ("words", "schedule", "expected"),
    [
        ("dpmpp_2m", None, ("dpmpp_2m", "karras")),
        ("DPM++ 2M", "Exponential", ("dpmpp_2m", "exponential")),
        ("DPM++ 2M Karras", None, ("dpmpp_2m", "karras")),
        ("dpm++ 2m sde karras", None, ("dpmpp_2m_sde", "karras")),
        ("Euler a", None, ("euler_ancestral", "normal")),
        ("euler_ancestral", "sgm_uniform", ("euler_ancestral", "sgm_uniform")),
        ("k_euler", "SGM Uniform", ("euler", "sgm_uniform")),
        ("Euler", "Automatic", ("euler", "normal")),
        ("DPM++ 2M SDE Heun", None, ("dpmpp_2m_sde_heun", "exponential")),
        ("Heun", "Align Your Steps", ("heun", "ays")),
    ],
)
def test_resolve_user_words(words, schedule, expected):
    spec, name = resolve(words, schedule)
    assert (spec.name, name) == expected


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown sampler 'Eular'.*euler \(Euler\)"):
        resolve("Eular")
    with pytest.raises(ValueError, match="unknown schedule 'karas'.*karras"):
        resolve("euler", "karas")


def test_every_schedule_name_is_a_real_scheduler():
    assert set(SCHEDULE_DISPLAY) <= set(SCHEDULERS)
    for spec in SAMPLERS.values():
        assert spec.default_schedule in SCHEDULERS


def test_spec_runs_the_sampler_with_its_options():
    schedule = DiscreteSchedule.stable_diffusion()
    sigmas = get_sigmas("karras", 6, schedule)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * sigmas[0]

    def denoiser(x, sigma):
        return x / (1 + sigma[:, None] ** 2)

    ours = SAMPLERS["dpmpp_2m_sde_heun"](denoiser, x, sigmas, noise_sampler=lambda s, t: torch.ones_like(x))
    direct = k.sample_dpmpp_2m_sde(
        denoiser, x, sigmas, solver_type="heun", noise_sampler=lambda s, t: torch.ones_like(x)
    )
    assert torch.equal(ours, direct)
    fast = SAMPLERS["dpm_fast"](denoiser, x, sigmas)
    assert torch.equal(fast, k.sample_dpm_fast(denoiser, x, float(sigmas[-2]), float(sigmas[0]), 6))
