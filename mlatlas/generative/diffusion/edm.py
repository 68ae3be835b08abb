r"""The unified view of diffusion models (Karras, Aittala, Aila & Laine, "Elucidating the Design
Space of Diffusion-Based Generative Models", NeurIPS 2022).

Every model perturbs data as

    x_t = s(t) (x_0 + sigma(t) eps),    eps ~ N(0, I)

and a model is a choice of s(t), sigma(t), the network's parameterisation, the training
distribution of sigma, a loss weight and a sampler (Table 1):

    VP  (DDPM, discrete)  s_t = sqrt(alpha_bar_t), sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)
    VE  (score matching)  s = 1, sigma from 0.02 to 100 (Song et al. 2021, NCSN++)
    EDM                   s = 1, sigma(t) = t
    flow matching         s(t) = 1 - t, sigma(t) = t / (1 - t), i.e. x_t = (1 - t) x_0 + t eps

Writing x = x_t / s(t) removes the scale: x = x_0 + sigma eps, and the probability-flow ODE
becomes dx/dsigma = (x - D(x; sigma)) / sigma with D the optimal denoiser E[x_0 | x]. The score is
grad log p(x; sigma) = (D(x; sigma) - x) / sigma^2. Every sampler in ``samplers.py`` works on that
scale-free x, so one sampler serves every model.

EDM's denoiser wraps a raw network F_theta with preconditioning (Table 1, "EDM" column):

    D_theta(x; sigma) = c_skip(sigma) x + c_out(sigma) F_theta(c_in(sigma) x; c_noise(sigma))
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)
    c_out  = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2)
    c_noise = ln(sigma) / 4

and trains with ln sigma ~ N(P_mean, P_std^2), P_mean = -1.2, P_std = 1.2, on the weighted loss

    E lambda(sigma) || D_theta(x_0 + sigma eps; sigma) - x_0 ||^2,
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2

which makes the effective target of F unit-variance at every sigma. VE in the same form has
c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2), lambda = 1 / sigma^2 and
ln sigma ~ U(ln sigma_min, ln sigma_max). Sampling steps follow (eq. 5)

    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    sigma_N = 0,    sigma_min = 0.002, sigma_max = 80, rho = 7.
"""

from __future__ import annotations

import math

import torch

from mlatlas.core import distributed

SIGMA_MIN, SIGMA_MAX, RHO, SIGMA_DATA = 0.002, 80.0, 7.0, 0.5
P_MEAN, P_STD = -1.2, 1.2


def karras_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO) -> torch.Tensor:
    """sigma_0 = sigma_max > ... > sigma_{n-1} = sigma_min, then sigma_n = 0 (float64, (n + 1,))."""
    if n < 1:
        raise ValueError(f"need at least one step, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_rho_min, inv_rho_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def geometric_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """VE's sampling steps (Song et al. 2021): sigma_max to sigma_min evenly spaced in log sigma,
    then 0 (float64, (n + 1,))."""
    if n < 1:
        raise ValueError(f"need at least one step, got {n}")
    sigmas = torch.logspace(math.log10(sigma_max), math.log10(sigma_min), n, dtype=torch.float64)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


Level = torch.Tensor | float


def _log(sigma: Level) -> Level:
    # A sampler's one float per step costs less in math than as a 0-d tensor.
    return sigma.log() if isinstance(sigma, torch.Tensor) else math.log(sigma)


def edm_preconditioning(sigma: Level, sigma_data: float = SIGMA_DATA
                        ) -> tuple[Level, Level, Level, Level]:
    """(c_skip, c_out, c_in, c_noise) of EDM at noise levels ``sigma`` (a tensor of any shape,
    or a float)."""
    total = sigma**2 + sigma_data**2
    return (sigma_data**2 / total, sigma * sigma_data / total**0.5, 1 / total**0.5,
            _log(sigma) / 4)


def ve_preconditioning(sigma: Level) -> tuple[Level, Level, Level, Level]:
    """(c_skip, c_out, c_in, c_noise) of VE (Karras et al. Table 1): F predicts -eps."""
    one = torch.ones_like(sigma) if isinstance(sigma, torch.Tensor) else 1.0
    return one, sigma, one, _log(sigma / 2)


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def log_normal_sigmas(n: int, generator: torch.Generator | None = None, p_mean: float = P_MEAN,
                      p_std: float = P_STD) -> torch.Tensor:
    """EDM's training noise levels: ln sigma ~ N(P_mean, P_std^2), shape (n,)."""
    return (p_mean + p_std * distributed.randn((n,), generator=generator)).exp()


def log_uniform_sigmas(n: int, sigma_min: float, sigma_max: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """VE's training noise levels: ln sigma ~ U(ln sigma_min, ln sigma_max), shape (n,)."""
    u = distributed.rand((n,), generator=generator)
    return (math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min))).exp()
