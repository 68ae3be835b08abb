r"""Denoising diffusion probabilistic models (Ho, Jain & Abbeel, NeurIPS 2020).

Forward process, a fixed Markov chain with variances beta_1 < ... < beta_T (linear from 1e-4 to
0.02 over T = 1000 steps in the paper):

    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)
    alpha_t = 1 - beta_t,    alpha_bar_t = prod_{s <= t} alpha_s
    q(x_t | x_0)     = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)                    (eq. 4)
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,   eps ~ N(0, I)

Posterior of one reverse step, tractable given x_0 (eq. 6-7):

    q(x_{t-1} | x_t, x_0) = N(mu_tilde_t, beta_tilde_t I)
    mu_tilde_t   = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
                   + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
    beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t

The network eps_theta(x_t, t) predicts the noise; the simple objective (eq. 14) is

    L_simple = E_{t ~ U{1..T}, x_0, eps} || eps - eps_theta(sqrt(alpha_bar_t) x_0
                                                         + sqrt(1 - alpha_bar_t) eps, t) ||^2

and ancestral sampling (Algorithm 2) runs t = T, ..., 1 with z ~ N(0, I) (z = 0 at t = 1):

    x_0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_bar_t)   (optionally clipped)
    x_{t-1} = mu_tilde_t(x_0_hat, x_t) + sigma_t z,   sigma_t^2 = beta_tilde_t or beta_t

Without clipping the mean equals the paper's 1/sqrt(alpha_t) (x_t - beta_t/sqrt(1-alpha_bar_t)
eps_theta). In code the timestep is 0-based: index i holds the paper's t = i + 1, so
``alpha_bar[0] = alpha_1`` and ``alpha_bar_prev[0] = 1``.

Besides the linear betas, the cosine schedule of Nichol & Dhariwal (2021) sets
alpha_bar_t = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2), s = 0.008, with
beta_t = min(1 - alpha_bar_t / alpha_bar_{t-1}, 0.999).

In the unified view of Karras et al. (2022, Table 1) the discrete VP process is
x_t = s_t (x_0 + sigma_t eps) with s_t = sqrt(alpha_bar_t) and sigma_t = sqrt((1 - alpha_bar_t) /
alpha_bar_t); ``Schedule.sigmas`` holds that table and ``sigma_to_t`` / ``t_to_sigma`` extend it to
fractional steps by linear interpolation in log sigma, so that samplers in sigma
(``samplers.py``) can drive a network trained on step indices. Its config is
``configs.DDPMConfig``; training, sampling and evaluation live in ``loop.py`` with the other
diffusion models.
"""

from __future__ import annotations

import bisect
import math

import torch
from torch import nn

from mlatlas.core.progress import progress_bar

# --- the maths ---------------------------------------------------------------------------------

# A (B,) tensor of 0-based step indices, or one int shared by the whole batch.
Timestep = torch.Tensor | int


def linear_betas(T: int = 1000, beta_1: float = 1e-4, beta_T: float = 0.02) -> torch.Tensor:
    """beta_1..beta_T spaced linearly (float64, shape (T,))."""
    return torch.linspace(beta_1, beta_T, T, dtype=torch.float64)


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """beta_t from the cosine alpha_bar of Nichol & Dhariwal (float64, shape (T,))."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


class Schedule:
    """Every per-step coefficient of the forward process and its posterior, in float64."""

    def __init__(self, betas: torch.Tensor):
        betas = betas.double()
        self.T = len(betas)
        self.betas = betas
        self.alphas = 1 - betas
        self.alpha_bar = torch.cumprod(self.alphas, 0)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        self.sqrt_alpha_bar = self.alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1 - self.alpha_bar).sqrt()
        self.beta_tilde = (1 - self.alpha_bar_prev) / (1 - self.alpha_bar) * betas
        self.mu_coef_x0 = self.alpha_bar_prev.sqrt() * betas / (1 - self.alpha_bar)
        self.mu_coef_xt = self.alphas.sqrt() * (1 - self.alpha_bar_prev) / (1 - self.alpha_bar)
        self.sigmas = ((1 - self.alpha_bar) / self.alpha_bar).sqrt()
        self.log_sigmas = self.sigmas.log()
        self._log_sigma_list = self.log_sigmas.tolist()

    @classmethod
    def linear(cls, T: int = 1000, beta_1: float = 1e-4, beta_T: float = 0.02) -> Schedule:
        return cls(linear_betas(T, beta_1, beta_T))

    @classmethod
    def cosine(cls, T: int = 1000) -> Schedule:
        return cls(cosine_betas(T))

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma at fractional 0-based steps t in [0, T - 1], log-linear between the table's."""
        t = t.double().clamp(0, self.T - 1)
        low = t.floor().long().clamp(max=self.T - 2)
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]).exp()

    def sigma_to_t(self, sigma: float) -> float:
        """The inverse of ``t_to_sigma`` (sigma is increasing in t), clamped to [0, T - 1]. In
        plain floats: samplers ask once per step, and a dozen 0-d tensor operations would cost
        more than the step itself."""
        table = self._log_sigma_list
        log_sigma = min(max(math.log(sigma), table[0]), table[-1])
        high = min(max(bisect.bisect_left(table, log_sigma), 1), self.T - 1)
        lo, hi = table[high - 1], table[high]
        return (high - 1) + (log_sigma - lo) / (hi - lo)


def _at(coef: torch.Tensor, t: Timestep, x: torch.Tensor) -> torch.Tensor | float:
    """coef[t] shaped (B, 1, ..., 1) to broadcast against x, in x's dtype and device; a plain
    float when t is one int shared by the batch (the sampler's case: scalars cost less)."""
    if isinstance(t, int):
        return float(coef[t])
    # Index on the CPU table first: only B values then cross to the device and dtype.
    return coef[t.cpu()].to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def q_mean_var(x0: torch.Tensor, t: Timestep, s: Schedule) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
    """Mean sqrt(alpha_bar_t) x_0 and variance 1 - alpha_bar_t of q(x_t | x_0)."""
    return _at(s.sqrt_alpha_bar, t, x0) * x0, _at(1 - s.alpha_bar, t, x0)


def q_sample(x0: torch.Tensor, t: Timestep, eps: torch.Tensor, s: Schedule) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    return _at(s.sqrt_alpha_bar, t, x0) * x0 + _at(s.sqrt_one_minus_alpha_bar, t, x0) * eps


def q_posterior(x0: torch.Tensor, xt: torch.Tensor, t: Timestep,
                s: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean mu_tilde_t and variance beta_tilde_t of q(x_{t-1} | x_t, x_0)."""
    mean = _at(s.mu_coef_x0, t, x0) * x0 + _at(s.mu_coef_xt, t, xt) * xt
    return mean, _at(s.beta_tilde, t, x0)


def predict_x0(xt: torch.Tensor, t: Timestep, eps: torch.Tensor, s: Schedule) -> torch.Tensor:
    """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
    return (xt - _at(s.sqrt_one_minus_alpha_bar, t, xt) * eps) / _at(s.sqrt_alpha_bar, t, xt)


def simple_loss(model: nn.Module, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                s: Schedule) -> torch.Tensor:
    """L_simple: mean squared error between eps and eps_theta(x_t, t)."""
    return (eps - model(q_sample(x0, t, eps, s), t.float())).pow(2).mean()


def p_sample_step(model: nn.Module, xt: torch.Tensor, i: int, s: Schedule, z: torch.Tensor,
                  variance: str = "posterior", clip: bool = False) -> torch.Tensor:
    """One ancestral step from x_t to x_{t-1} at 0-based index ``i`` with noise ``z``."""
    x0_hat = predict_x0(xt, i, model(xt, torch.full((len(xt),), float(i), device=xt.device)), s)
    if clip:
        x0_hat = x0_hat.clamp(-1, 1)
    mean, beta_tilde = q_posterior(x0_hat, xt, i, s)
    if i == 0:
        return mean
    sigma2 = beta_tilde if variance == "posterior" else _at(s.betas, i, xt)
    return mean + sigma2**0.5 * z


@torch.no_grad()
def ancestral_sample(model: nn.Module, shape: tuple[int, ...], s: Schedule,
                     generator: torch.Generator | None = None, variance: str = "posterior",
                     clip: bool = False, device: torch.device | str = "cpu",
                     progress: bool | None = None) -> torch.Tensor:
    """Algorithm 2: x_T ~ N(0, I), then T ancestral steps. Noise is drawn on the CPU from
    ``generator`` so that a seed gives the same samples on any device."""
    x = torch.randn(shape, generator=generator).to(device)
    for i in progress_bar(range(s.T - 1, -1, -1), desc="sampling", leave=False,
                          progress=progress):
        z = torch.randn(shape, generator=generator).to(device) if i > 0 else None
        x = p_sample_step(model, x, i, s, z, variance, clip)
    return x
