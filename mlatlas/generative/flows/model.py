r"""A normalizing flow as a likelihood model of ``generative/likelihood.py``: an invertible f with
its log-determinant (``layers``) and a factorised prior p_Z on z = f(x) in R^D,

    log p_X(x) = log p_Z(f(x)) + log|det df/dx|,      x = f^-1(z),  z ~ p_Z  (T z for T != 1)

Priors: the standard Gaussian, log p_Z(z) = -1/2 sum_d (z_d^2 + log 2 pi), and NICE's standard
logistic, log p_Z(z) = -sum_d [softplus(z_d) + softplus(-z_d)]. Temperature T scales the prior
sample: z ~ N(0, T^2 I) (the logistic: T times a logistic draw).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from mlatlas.core.config import ConfigError

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) of (B, D) latents, (B,)."""
    return -0.5 * (z.pow(2) + LOG_2PI).sum(1)


def logistic_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log of the standard logistic density prod_d e^-z_d / (1 + e^-z_d)^2, (B,)."""
    return -(F.softplus(z) + F.softplus(-z)).sum(1)


def prior_sample(prior: str, shape: tuple[int, ...], generator: torch.Generator,
                 dtype: torch.dtype) -> torch.Tensor:
    """Standard Gaussian or logistic draws (the logistic by the inverse CDF, log u - log(1 - u))."""
    device = generator.device
    if prior == "gaussian":
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype).clamp(1e-7, 1 - 1e-7)
    return torch.log(u) - torch.log1p(-u)


class FlowModel(nn.Module):
    """``flow`` (x -> flat z, log|det|) and a standard ``prior`` ('gaussian' or 'logistic') over
    z in R^D, D = prod(sample_shape): the model interface of ``generative.likelihood``."""

    def __init__(self, flow: nn.Module, sample_shape: tuple[int, ...], prior: str = "gaussian"):
        super().__init__()
        if prior not in ("gaussian", "logistic"):
            raise ValueError(f"prior must be gaussian or logistic, got {prior!r}")
        self.flow, self.prior = flow, prior
        self.sample_shape = tuple(sample_shape)
        self.dims = math.prod(sample_shape)

    def base_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(z) if self.prior == "gaussian" else logistic_log_prob(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, log|det df/dx|) for x of shape (B, *sample_shape); z is (B, D)."""
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"the flow models inputs of shape {self.sample_shape}, got "
                             f"{tuple(x.shape[1:])}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("a flow was given non-finite inputs (NaN or infinity)")
        return self.flow(x)

    def log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x) = log p_Z(f(x)) + log|det df/dx| in nats, (B,)."""
        z, logdet = self(x)
        return self.base_log_prob(z) + logdet

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, y: torch.Tensor | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        """x = f^-1(T z), z drawn from the prior: (n, *sample_shape)."""
        dtype = next(self.parameters()).dtype
        z = temperature * prior_sample(self.prior, (n, self.dims), generator, dtype)
        return self.flow.inverse(z.to(next(self.parameters()).device))

    @torch.no_grad()
    def data_init(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Glow's data-dependent initialisation: every ActNorm set, in order, so that this batch
        leaves it with zero mean and unit variance per channel."""
        if hasattr(self.flow, "data_init"):
            self.flow.data_init(x)


# --- shared by the configs -----------------------------------------------------------------------

def check_points(shape: tuple[int, ...], method: str) -> int:
    """D of points (N, D) a coupling flow can split (D >= 2); ConfigError otherwise."""
    if len(shape) != 1 or shape[0] < 2:
        raise ConfigError(f"{method} models points of at least 2 dimensions or images, got "
                          f"samples of shape {shape}")
    return shape[0]


def check_image(shape: tuple[int, ...], squeezes: int, flag: str) -> tuple[int, int, int]:
    """(C, H, W) of images whose sides divide by 2^squeezes; ConfigError naming ``flag``."""
    if len(shape) != 3:
        raise ConfigError(f"images must be (C, H, W), got samples of shape {shape}")
    c, h, w = shape
    if h % 2**squeezes or w % 2**squeezes:
        raise ConfigError(f"{flag} needs image sides divisible by 2^{squeezes} = "
                          f"{2**squeezes}; the images are {h}x{w}")
    return c, h, w


def not_conditional(cfg) -> None:
    if cfg.conditional:
        raise ConfigError(f"--conditional is not supported by {cfg.METHOD} (an unconditional "
                          "flow)")
