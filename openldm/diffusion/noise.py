"""Seeded, batch-invariant noise: sample i of a batch gets exactly the noise it would get alone.

Every sample owns its randomness (one generator, or one Brownian tree, per seed), so changing the
batch size or a neighbour's seed never changes an image. Generators live on the CPU by default, so a
seed gives the same image on any device.

diffusers, given one `torch.Generator` for a batch, draws a single (B, C, H, W) tensor from it: image
i then depends on B and on its position. With batch size 1, or given one generator per image, its
draws equal ours: `BatchNoise([seed], shape)()` is diffusers' initial latent for that seed, and later
calls continue the same generator as its ancestral schedulers do.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from openldm.diffusion.samplers import append_dims

Shape = Sequence[int]
_MASK64 = (1 << 64) - 1


def initial_noise(
    seed: int, shape: Shape, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """One image's starting noise in the diffusers convention: randn on a CPU generator seeded `seed`."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=dtype).to(device)


class BatchNoise:
    """Per-sample Gaussian noise: one CPU generator per seed; every call draws the next (B, *shape).

    The first call gives the initial latents (unit variance; scale by sigmas[0]); passed to a sampler
    as its `noise_sampler(sigma, sigma_next)`, later calls give the ancestral noise.
    """

    def __init__(
        self, seeds: Sequence[int], shape: Shape, device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32, generator_device: torch.device | str = "cpu",
    ) -> None:
        self.generators = [torch.Generator(generator_device).manual_seed(s) for s in seeds]
        self.shape, self.device, self.dtype = tuple(shape), device, dtype
        self.generator_device = generator_device

    def __call__(self, sigma: object = None, sigma_next: object = None) -> torch.Tensor:
        """The next draw for every sample, stacked: (B, *shape). The sigmas are ignored."""
        draws = [
            torch.randn(self.shape, generator=g, dtype=self.dtype, device=self.generator_device)
            for g in self.generators
        ]
        return torch.stack(draws).to(self.device)


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 finalizer per value; Steele et al. 2014)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h >> 1


class VirtualBrownianTree:
    """W(t) on [t0, t1] for one seed, W(t0) = 0, without storing the path (a "virtual Brownian tree").

    W(t1) ~ N(0, t1 - t0); the value at the midpoint of an interval [a, b] whose ends are known is the
    Brownian bridge sample (W(a) + W(b)) / 2 + sqrt((b - a) / 4) z, with z drawn from a generator
    seeded by (seed, depth, index) (Li et al. 2020, "Scalable Gradients for Stochastic Differential
    Equations"). A query bisects down to an interval shorter than `tol` and interpolates linearly
    inside it, so W is one fixed function of t: increments of any queries are consistent and additive.
    """

    def __init__(
        self, seed: int, t0: float, t1: float, shape: Shape, dtype: torch.dtype = torch.float32,
        tol: float = 1e-6, cache_size: int = 128,
    ) -> None:
        if not t0 < t1:
            raise ValueError(f"need t0 < t1, got [{t0}, {t1}]")
        self.seed, self.t0, self.t1 = seed, float(t0), float(t1)
        self.shape, self.dtype = tuple(shape), dtype
        self.depth = min(max(math.ceil(math.log2((self.t1 - self.t0) / tol)), 0), 48)
        self.w1 = self._normal(0, 0) * math.sqrt(self.t1 - self.t0)
        self._cache: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()
        self.cache_size = cache_size

    def _normal(self, depth: int, index: int) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(_mix(self.seed, depth, index))
        return torch.randn(self.shape, generator=generator, dtype=self.dtype)

    def _midpoint(self, depth: int, index: int, a: float, b: float, wa, wb) -> torch.Tensor:
        """W at the midpoint of node (depth, index) = [a, b], cached (samplers query nearby t in turn)."""
        key = (depth, index)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        w = (wa + wb) / 2 + math.sqrt((b - a) / 4) * self._normal(depth, index)
        self._cache[key] = w
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return w

    def __call__(self, t: float) -> torch.Tensor:
        """W(t) for t in [t0, t1] (clamped), shape `shape`."""
        t = min(max(float(t), self.t0), self.t1)
        a, b, index = self.t0, self.t1, 0
        wa, wb = torch.zeros_like(self.w1), self.w1
        for depth in range(1, self.depth + 1):
            if t in (a, b):
                break
            m = (a + b) / 2
            wm = self._midpoint(depth, index, a, b, wa, wb)
            if t < m:
                b, wb, index = m, wm, 2 * index
            else:
                a, wa, index = m, wm, 2 * index + 1
        if t == a:
            return wa
        return wb if t == b else wa + (t - a) / (b - a) * (wb - wa)


class BrownianTreeNoise:
    """Noise for SDE samplers from one virtual Brownian tree per seed: `(sigma, sigma_next) -> (B, *shape)`.

    Returns (W(u') - W(u)) / sqrt(|u' - u|) with u = transform(sigma), u' = transform(sigma_next):
    unit Gaussian per step, but correlated across step sizes the way a true Brownian path is, so a
    finer schedule converges to the same SDE solution. k-diffusion's `BrownianTreeNoiseSampler`
    uses W in sigma itself (identity transform), which is our default. Queries are clamped to
    [transform(sigma_min), transform(sigma_max)].
    """

    def __init__(
        self, seeds: Sequence[int], shape: Shape, sigma_min: float, sigma_max: float,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
        transform: Callable[[float], float] = lambda sigma: sigma, tol: float = 1e-6,
    ) -> None:
        self.transform, self.device, self.dtype = transform, device, dtype
        lo, hi = sorted((float(transform(float(sigma_min))), float(transform(float(sigma_max)))))
        self.lo, self.hi = lo, hi
        tree_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.trees = [VirtualBrownianTree(s, lo, hi, shape, tree_dtype, tol) for s in seeds]

    @classmethod
    def for_sigmas(
        cls, seeds: Sequence[int], shape: Shape, sigmas: torch.Tensor, **kwargs: object
    ) -> BrownianTreeNoise:
        """A sampler spanning a schedule: [smallest nonzero sigma, largest sigma], as k-diffusion sets it."""
        positive = sigmas[sigmas > 0]
        return cls(seeds, shape, float(positive.min()), float(positive.max()), **kwargs)

    def __call__(self, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float) -> torch.Tensor:
        """Normalized Brownian increment from sigma to sigma_next for every sample."""
        u = min(max(float(self.transform(float(sigma))), self.lo), self.hi)
        u_next = min(max(float(self.transform(float(sigma_next))), self.lo), self.hi)
        if u == u_next:
            raise ValueError(f"empty Brownian increment: sigma {float(sigma)} -> {float(sigma_next)}")
        scale = 1 / math.sqrt(abs(u_next - u))
        w = torch.stack([(tree(u_next) - tree(u)) * scale for tree in self.trees])
        return w.to(device=self.device, dtype=self.dtype)


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation per sample, from a (t=0) to b (t=1): variation seeds keep unit variance."""
    a_flat, b_flat = a.flatten(1).double(), b.flatten(1).double()
    cos = (a_flat * b_flat).sum(1) / (a_flat.norm(dim=1) * b_flat.norm(dim=1))
    omega = torch.acos(cos.clamp(-1, 1))
    so = torch.sin(omega)
    linear = so.abs() < 1e-6
    wa = torch.where(linear, torch.full_like(so, 1 - t), torch.sin((1 - t) * omega) / so)
    wb = torch.where(linear, torch.full_like(so, t), torch.sin(t * omega) / so)
    out = append_dims(wa, a.ndim) * a.double() + append_dims(wb, a.ndim) * b.double()
    return out.to(a.dtype)


def starting_noise(
    noise: BatchNoise, subseeds: Sequence[int] | None, subseed_strength: float, shape: Sequence[int]
) -> torch.Tensor:
    """The first draw of each seed's generator, optionally bent towards its variation seed."""
    x = noise()
    if subseeds is not None and subseed_strength > 0:
        variation = BatchNoise(subseeds, shape, device=x.device, dtype=x.dtype)()
        x = slerp(subseed_strength, x, variation)
    return x
