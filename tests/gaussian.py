"""A diffusion problem with a closed-form answer, for testing samplers.

Data x0 ~ N(mu, s^2 I) with a per-dimension mean `mu` and a scalar or per-dimension std `s`. At noise
level sigma the noisy marginal is N(mu, (s^2 + sigma^2) I), so
  - the exact denoiser is E[x0 | x] = mu + s^2 / (s^2 + sigma^2) (x - mu),
  - the probability-flow ODE maps x_a at sigma_a to
    x_b = mu + sqrt((s^2 + sigma_b^2) / (s^2 + sigma_a^2)) (x_a - mu), which is smooth down to sigma_b = 0.

A sampler whose last step to sigma = 0 is a plain denoise (Euler, Heun, DPM-2, DPM++ 2M, ...) returns
D(x_n, sigma_n): even from the exact x_n that is not the ODE solution at 0, and its variance is
s^4 / (s^2 + sigma_n^2), not s^2. `denoised_end` and `denoised_std` give the exact answers for that case.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """n sigmas from sigma_max to sigma_min spaced in sigma^(1/rho), then 0 (Karras et al. 2022, eq. 5)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@dataclass(frozen=True, eq=False)
class Gaussian:
    """Data N(mu, s^2 I); `mu` has the data shape (no batch dim), `s` is a float or has the data shape."""

    mu: torch.Tensor
    s: float | torch.Tensor = 1.0

    @classmethod
    def make(cls, dim: int = 4, s: float = 1.0, dtype: torch.dtype = torch.float64) -> Gaussian:
        """A fixed, non-trivial instance: means spread over [-1, 2] and a scalar std."""
        return cls(torch.linspace(-1.0, 2.0, dim, dtype=dtype), s)

    def _sigma(self, sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        """A per-sample sigma of shape (batch,) (or a scalar) broadcast against x."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim)) if sigma.ndim else sigma

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The exact E[x0 | x_sigma]; usable directly as a sampler's denoiser."""
        sigma = self._sigma(sigma, x)
        return self.mu + self.s**2 / (self.s**2 + sigma**2) * (x - self.mu)

    def ode(
        self, x: torch.Tensor, sigma_from: torch.Tensor | float, sigma_to: torch.Tensor | float
    ) -> torch.Tensor:
        """The exact probability-flow ODE solution from sigma_from to sigma_to (either may be 0)."""
        a, b = self._sigma(sigma_from, x), self._sigma(sigma_to, x)
        return self.mu + ((self.s**2 + b**2) / (self.s**2 + a**2)).sqrt() * (x - self.mu)

    def denoised_end(self, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """Exact ODE from sigmas[0] to sigmas[-2], then a plain denoise to 0, as most samplers end."""
        sigma_last = sigmas[-2]
        return self.denoiser(self.ode(x, sigmas[0], sigma_last), sigma_last.expand(x.shape[0]))

    def marginal_std(self, sigma: float) -> torch.Tensor:
        """Std of the noisy data at noise level sigma."""
        return torch.as_tensor(self.s**2 + sigma**2, dtype=self.mu.dtype).sqrt() * torch.ones_like(self.mu)

    def denoised_std(self, sigma: float) -> torch.Tensor:
        """Std of D(x_sigma, sigma) when x_sigma has the exact marginal: s^2 / sqrt(s^2 + sigma^2)."""
        return self.s**2 / self.marginal_std(sigma)

    def noise(self, batch: int, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """A sampler's usual start: pure noise times sigma (the data term is negligible for a big sigma)."""
        shape = (batch, *self.mu.shape)
        return sigma * torch.randn(shape, generator=generator, dtype=self.mu.dtype)

    def prior(self, batch: int, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """An exact sample of the noisy marginal N(mu, s^2 + sigma^2) at noise level sigma."""
        shape = (batch, *self.mu.shape)
        eps = torch.randn(shape, generator=generator, dtype=self.mu.dtype)
        return self.mu + self.marginal_std(sigma) * eps


@dataclass(frozen=True, eq=False)
class Mixture:
    """Data from an equal-weight mixture of N(m_k, s^2 I): its exact denoiser is nonlinear in x."""

    means: torch.Tensor  # (k, *data_shape)
    s: float = 0.5

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_sigma]: component posteriors times each component's Gaussian denoiser."""
        var = self.s**2 + sigma.reshape(-1, *(1,) * (x.ndim - 1)) ** 2  # (batch, 1, ...)
        diff = x[:, None] - self.means  # (batch, k, *data_shape)
        log_p = -(diff**2 / (2 * var[:, None])).flatten(2).sum(-1)  # (batch, k)
        weights = log_p.softmax(-1).reshape(*log_p.shape, *(1,) * (x.ndim - 1))
        component = self.means + self.s**2 / var[:, None] * diff
        return (weights * component).sum(1)
