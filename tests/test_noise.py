"""Seeded per-sample noise and the virtual Brownian tree."""

from __future__ import annotations

import math

import pytest
import torch

from openldm.diffusion.noise import BatchNoise, BrownianTreeNoise, VirtualBrownianTree, initial_noise

SHAPE = (4, 8, 8)


def test_initial_noise_is_diffusers_latent_for_one_seed():
    expected = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(1234))
    assert torch.equal(initial_noise(1234, SHAPE), expected)
    # diffusers draws (1, C, H, W) from one generator; the same numbers in the same order
    batched = torch.randn((1, *SHAPE), generator=torch.Generator("cpu").manual_seed(1234))
    assert torch.equal(BatchNoise([1234], SHAPE)()[0], batched[0])
    assert not torch.equal(initial_noise(1235, SHAPE), expected)


def test_batch_noise_is_batch_invariant_over_several_draws():
    seeds = [7, 123, 2**40 + 5]
    batch = BatchNoise(seeds, SHAPE)
    alone = [BatchNoise([s], SHAPE) for s in seeds]
    for _ in range(3):  # the initial latent, then two ancestral draws
        drawn = batch(torch.tensor(1.0), torch.tensor(0.5))
        assert drawn.shape == (3, *SHAPE)
        for i, single in enumerate(alone):
            assert torch.equal(drawn[i], single()[0])
    assert not torch.equal(drawn[0], drawn[1])


def test_batch_noise_continues_the_generator_like_diffusers():
    """diffusers' ancestral schedulers draw step noise from the generator that made the latent."""
    g = torch.Generator("cpu").manual_seed(42)
    latent, step_noise = torch.randn((1, *SHAPE), generator=g), torch.randn((1, *SHAPE), generator=g)
    noise = BatchNoise([42], SHAPE, dtype=torch.float32)
    assert torch.equal(noise(), latent) and torch.equal(noise(), step_noise)


def _sampler(seeds, shape=SHAPE, dtype=torch.float64, **kw) -> BrownianTreeNoise:
    return BrownianTreeNoise(seeds, shape, sigma_min=0.03, sigma_max=14.6, dtype=dtype, **kw)


def test_brownian_noise_is_batch_invariant_and_deterministic():
    seeds = [3, 99, 5]
    batch = _sampler(seeds)
    steps = [(14.6, 9.1), (9.1, 3.3), (3.3, 2.9), (2.9, 0.03)]
    for sigma, sigma_next in steps:
        drawn = batch(torch.tensor(sigma), torch.tensor(sigma_next))
        assert drawn.shape == (3, *SHAPE)
        for i, s in enumerate(seeds):
            assert torch.equal(drawn[i], _sampler([s])(torch.tensor(sigma), torch.tensor(sigma_next))[0])
        assert torch.equal(drawn, _sampler(seeds)(torch.tensor(sigma), torch.tensor(sigma_next)))
    assert not torch.equal(drawn[0], drawn[1])  # different seeds differ


def test_brownian_increments_are_additive():
    noise = _sampler([11])
    s, t, u = 12.0, 4.25, 0.7

    def increment(a, b):
        return noise(a, b) * math.sqrt(abs(b - a))

    torch.testing.assert_close(increment(s, u), increment(s, t) + increment(t, u), rtol=0, atol=1e-12)
    torch.testing.assert_close(increment(u, s), -increment(s, u), rtol=0, atol=1e-12)


def test_brownian_increments_have_brownian_statistics():
    """Over 20k independent coordinates: unit variance, zero mean, and Brownian correlations."""
    noise = _sampler([2024], shape=(20000,))
    for sigma, sigma_next in [(14.6, 0.03), (5.0, 4.99), (1.234567, 0.9), (0.5, 0.0301)]:
        z = noise(sigma, sigma_next)[0]
        assert abs(z.mean().item()) < 0.03, (sigma, sigma_next, z.mean().item())
        assert abs(z.var().item() - 1) < 0.04, (sigma, sigma_next, z.var().item())
    # disjoint increments are independent; nested ones correlate as sqrt(|t - s| / |u - s|)
    a, b = noise(8.0, 3.0)[0], noise(3.0, 1.0)[0]
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.03
    whole, part = noise(8.0, 1.0)[0], noise(8.0, 3.0)[0]
    corr = torch.corrcoef(torch.stack([whole, part]))[0, 1].item()
    assert corr == pytest.approx(math.sqrt(5 / 7), abs=0.02)


def test_brownian_tree_bridge_statistics_at_a_deep_point():
    """W(t) at a point many bisections deep has variance t - t0 (the bridge sampling is right)."""
    tree = VirtualBrownianTree(seed=5, t0=0.0, t1=1.0, shape=(20000,), dtype=torch.float64)
    for t in (0.3, 0.123456789, 0.999):
        assert tree(t).var().item() == pytest.approx(t, rel=0.05)
    assert torch.equal(tree(0.0), torch.zeros(20000, dtype=torch.float64))


def test_brownian_transform_is_applied():
    log_noise = _sampler([8], transform=math.log)
    tree = VirtualBrownianTree(8, math.log(0.03), math.log(14.6), SHAPE, torch.float64)
    expect = (tree(math.log(2.0)) - tree(math.log(6.0))) / math.sqrt(math.log(6.0) - math.log(2.0))
    torch.testing.assert_close(log_noise(6.0, 2.0)[0], expect, rtol=0, atol=1e-12)


def test_brownian_for_sigmas_spans_the_schedule():
    sigmas = torch.tensor([14.6, 3.0, 0.5, 0.03, 0.0])
    noise = BrownianTreeNoise.for_sigmas([1, 2], SHAPE, sigmas, dtype=torch.float64)
    assert (noise.lo, noise.hi) == (pytest.approx(0.03), pytest.approx(14.6))
    assert noise(sigmas[0], sigmas[1]).shape == (2, *SHAPE)
