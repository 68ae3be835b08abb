r"""Formulations: how each model of the unified view trains and becomes a denoiser.

A formulation (``edm.py`` gives the table) says how training draws the noise level and forms the
loss, and how a network becomes a denoiser D(x; sigma) on the scale-free variable
x = x_0 + sigma eps that the samplers of ``samplers.py`` integrate:

    VP   discrete t in {1..T}, betas linear (or cosine), an eps, x0 or v prediction
         (DDPM, Ho et al. 2020, with eps and the ancestral sampler); the network sees
         x_t = x / sqrt(1 + sigma^2) and the fractional step t(sigma) of its table
         (``ddpm.Schedule.sigma_to_t``), and its output becomes x_0 by ``parameterization``
    VE   s = 1, sigma in [0.02, 100]: ln sigma ~ U, lambda = 1 / sigma^2, D = x + sigma F
         (Song et al. 2021 in Karras et al.'s Table 1)
    EDM  s = 1, ln sigma ~ N(-1.2, 1.2^2), the preconditioned D and its weight lambda(sigma)

Flow matching's formulation (``mlatlas.generative.flow_matching.flow_matching.FlowMatching``)
has the same interface. The network, the formulation and the sampler stay apart: a sampler sees
only D(x; sigma) (or a flow's velocity), and the training loop (``loop.py``) only ``loss``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from mlatlas.core import distributed
from mlatlas.core.config import ConfigError
from mlatlas.generative.diffusion import edm, samplers
from mlatlas.generative.diffusion.ddpm import Schedule
from mlatlas.generative.diffusion.parameterization import from_x0_eps, to_x0_eps
from mlatlas.generative.diffusion.samplers import SAMPLERS, Callback, Denoiser

# A network call with labels bound or guided: net(x, t) -> output shaped like x.
Network = Any


class Formulation:
    """How one kind of model trains and samples. Subclasses set ``time_scale`` (stretching the
    network's time input to the range its sinusoidal embedding suits), ``clip_x0`` (whether
    sampling clips D to [-1, 1] on images) and the methods below."""

    time_scale: float = 1.0
    clip_x0: bool = False
    samplers: tuple[str, ...] = ("ddim", "euler", "heun")

    def loss(self, net: nn.Module, x0: torch.Tensor, y: torch.Tensor | None,
             generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def denoiser(self, net: Network, clip: bool = False) -> Denoiser:
        raise NotImplementedError

    def sigmas(self, steps: int, sampler: str) -> torch.Tensor:
        raise NotImplementedError

    def prior_std(self, sigma_max: float) -> float:
        """Standard deviation of the sampler's start x at sigma_max."""
        return sigma_max

    def sigma_range(self) -> tuple[float, float]:
        """(sigma_min, sigma_max) the model was trained to denoise, for likelihoods."""
        return edm.SIGMA_MIN, edm.SIGMA_MAX

    def display(self, x: torch.Tensor, level: float) -> torch.Tensor:
        """x at noise level ``level`` rescaled to the data's range, for trajectory figures."""
        return x / math.sqrt(1 + level**2)

    def sampler_options(self, sampler: str) -> dict[str, Any]:
        """Options of ``sampler`` that the model fixes (DDPM's reverse variance)."""
        return {}

    def sample(self, net: Network, shape: tuple[int, ...], sampler: str, steps: int,
               generator: torch.Generator, device: torch.device, *, clip: bool = False,
               progress: bool | None = None, callback: Callback = None,
               guide: Callable[[Denoiser], Denoiser] | None = None,
               **options: Any) -> torch.Tensor:
        """Draw x at sigmas[0] and run ``sampler``; returns x_0 samples in model space.
        ``guide`` wraps the denoiser (classifier guidance)."""
        if sampler not in self.samplers:
            raise ConfigError(f"sampler {sampler!r} does not apply here; choose from "
                              f"{', '.join(self.samplers)}")
        sigmas = self.sigmas(steps, sampler)
        x = torch.randn(shape, generator=generator).to(device) * self.prior_std(float(sigmas[0]))
        denoiser = self.denoiser(net, clip)
        if guide is not None:
            denoiser = guide(denoiser)
        return SAMPLERS[sampler](denoiser, x, sigmas, generator=generator, progress=progress,
                                 callback=callback, **{**self.sampler_options(sampler), **options})


def batch_view(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B,) coefficient shaped (B, 1, ..., 1) in x's dtype and device."""
    return coef.to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class VP(Formulation):
    """Discrete variance preserving diffusion (DDPM) with an eps, x0 or v prediction;
    ``variance`` is the reverse-step variance of DDPM's ancestral sampler."""

    samplers = ("ddpm", "ddim", "euler", "heun")

    def __init__(self, schedule: Schedule, prediction: Literal["eps", "x0", "v"] = "eps",
                 variance: Literal["posterior", "beta"] = "posterior", clip_x0: bool = False):
        self.schedule, self.prediction = schedule, prediction
        self.variance, self.clip_x0 = variance, clip_x0

    def loss(self, net, x0, y, generator):
        s = self.schedule
        t = distributed.randint(0, s.T, (len(x0),), generator=generator).to(x0.device)
        eps = distributed.randn(x0.shape, generator=generator).to(x0.device)
        alpha = batch_view(s.sqrt_alpha_bar[t.cpu()], x0)
        sigma = batch_view(s.sqrt_one_minus_alpha_bar[t.cpu()], x0)
        x_t = alpha * x0 + sigma * eps  # q_sample, with the coefficients the target needs too
        target = from_x0_eps(x0, eps, self.prediction, alpha, sigma)
        return (net(x_t, t.float(), y) - target).pow(2).mean()

    def denoiser(self, net, clip=False):
        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            scale = 1 / math.sqrt(1 + sigma**2)
            t = self.schedule.sigma_to_t(sigma)
            x_t = x * scale
            out = net(x_t, torch.full((len(x),), t, device=x.device, dtype=x.dtype))
            if self.prediction == "eps":  # x_0 = x - sigma eps in x's scale: one op, not three
                x0 = torch.add(x, out, alpha=-sigma)
            else:
                x0 = to_x0_eps(out, self.prediction, x_t, scale, sigma * scale)[0]
            return x0.clamp(-1, 1) if clip else x0

        return denoise

    def sigmas(self, steps, sampler):
        """Karras et al.'s spacing within the table's range for Euler and Heun; otherwise steps
        evenly spaced in t from T - 1 to 0 (every step when steps = T), as DDPM and DDIM use."""
        s = self.schedule
        if sampler in ("euler", "heun"):
            return edm.karras_sigmas(steps, float(s.sigmas[0]), float(s.sigmas[-1]))
        t = torch.linspace(s.T - 1, 0, steps, dtype=torch.float64)
        return torch.cat([s.t_to_sigma(t), torch.zeros(1, dtype=torch.float64)])

    def prior_std(self, sigma_max):
        # x_T ~ N(0, I) in the network's variable is x = x_T sqrt(1 + sigma^2) here.
        return math.sqrt(1 + sigma_max**2)

    def sigma_range(self):
        return float(self.schedule.sigmas[0]), float(self.schedule.sigmas[-1])

    def sampler_options(self, sampler):
        return {"variance": self.variance} if sampler == "ddpm" else {}


class Preconditioned(Formulation):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) trained with weight lambda(sigma):
    EDM (``kind='edm'``) or VE (``kind='ve'``)."""

    def __init__(self, kind: Literal["edm", "ve"], sigma_min: float, sigma_max: float,
                 sigma_data: float = edm.SIGMA_DATA, rho: float = edm.RHO,
                 p_mean: float = edm.P_MEAN, p_std: float = edm.P_STD, clip_x0: bool = False):
        self.kind, self.sigma_min, self.sigma_max = kind, sigma_min, sigma_max
        self.sigma_data, self.rho, self.p_mean, self.p_std = sigma_data, rho, p_mean, p_std
        self.clip_x0 = clip_x0
        # c_noise = ln(sigma)/4 (EDM) or ln(sigma/2) (VE) spans a few units; the embedding was
        # made for step indices in the hundreds.
        self.time_scale = 250.0 if kind == "edm" else 100.0

    def coefficients(self, sigma: torch.Tensor):
        if self.kind == "edm":
            return edm.edm_preconditioning(sigma, self.sigma_data)
        return edm.ve_preconditioning(sigma)

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.kind == "edm":
            return edm.edm_loss_weight(sigma, self.sigma_data)
        return 1 / sigma**2

    def loss(self, net, x0, y, generator):
        n = len(x0)
        sigma = (edm.log_normal_sigmas(n, generator, self.p_mean, self.p_std) if self.kind == "edm"
                 else edm.log_uniform_sigmas(n, self.sigma_min, self.sigma_max, generator))
        eps = distributed.randn(x0.shape, generator=generator).to(x0.device)
        c_skip, c_out, c_in, c_noise = (batch_view(c, x0) for c in self.coefficients(sigma))
        x = x0 + batch_view(sigma, x0) * eps
        denoised = c_skip * x + c_out * net(c_in * x, c_noise.flatten(), y)
        return (batch_view(self.weight(sigma), x0) * (denoised - x0).pow(2)).mean()

    def denoiser(self, net, clip=False):
        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
            out = net(c_in * x, torch.full((len(x),), c_noise, device=x.device, dtype=x.dtype))
            x0 = torch.add(c_out * out, x, alpha=c_skip)
            return x0.clamp(-1, 1) if clip else x0

        return denoise

    def sigma_range(self):
        return self.sigma_min, self.sigma_max

    def sigmas(self, steps, sampler):
        if sampler == "ddim" and self.kind == "ve":
            return edm.geometric_sigmas(steps, self.sigma_min, self.sigma_max)
        return edm.karras_sigmas(steps, self.sigma_min, self.sigma_max, self.rho)


def log_likelihood(formulation: Formulation, net: Network, x0: torch.Tensor,
                   trace: Literal["exact", "hutchinson"] = "exact",
                   generator: torch.Generator | None = None, rtol: float = samplers.RTOL,
                   atol: float = samplers.ATOL) -> samplers.Likelihood:
    """log p(x0) in nats per example under the model's probability-flow ODE over the trained
    noise range, integrated to the tolerances rtol and atol (``samplers.log_likelihood``), with
    the function evaluations it took."""
    sigma_min, sigma_max = formulation.sigma_range()
    return samplers.log_likelihood(formulation.denoiser(net), x0, sigma_min, sigma_max,
                                   formulation.prior_std(sigma_max), trace=trace,
                                   generator=generator, rtol=rtol, atol=atol)
