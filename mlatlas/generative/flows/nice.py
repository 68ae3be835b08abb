r"""NICE: Non-linear Independent Components Estimation (Dinh, Krueger & Bengio, ICLR 2015 workshop).

An invertible f maps data x in R^D to latents h = f(x) with a factorised prior, and the change of
variables gives the exact log-likelihood (section 2):

    log p_X(x) = sum_d log p_{H_d}(f_d(x)) + log|det df/dx|.

f is a stack of additive coupling layers (section 3.2), each splitting x into x_{I_1} and x_{I_2}
(the odd and even dimensions, alternating from layer to layer) and shifting one half by a
function of the other:

    y_{I_1} = x_{I_1},    y_{I_2} = x_{I_2} + m(x_{I_1})            (m a ReLU MLP)
    x_{I_2} = y_{I_2} - m(y_{I_1})                                   (the inverse)
    log|det dy/dx| = 0                                               (a unit triangular Jacobian)

then a diagonal scaling layer (section 3.3), h = exp(S) * y, log|det| = sum_d S_d, so that

    log p_X(x) = sum_d [log p_H(h_d) + S_d],

with p_H the standard logistic, log p_H(h) = -log(1 + e^h) - log(1 + e^-h) (the paper's choice
for MNIST), or the standard Gaussian (``--prior``). Sampling: h ~ p_H (times the temperature T),
x = f^-1(h). Images: the dequantised x~ in [0, 1]^D first goes through the logit transform
y = logit(alpha + (1 - 2 alpha) x~) (RealNVP's, section 4.1), whose log-determinant is counted,
and is flattened, so that log_prob is a density on [0, 1]^D.

Code: ``layers.AdditiveCoupling`` (the coupling), ``layers.Scaling`` (S), ``layers.Logit``,
``model.FlowModel`` (prior, log_prob, sample); training and evaluation are
``generative.likelihood``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import nn

from mlatlas.core.config import ConfigError
from mlatlas.generative.flows import layers
from mlatlas.generative.flows.model import FlowModel, check_image, check_points, not_conditional
from mlatlas.generative.likelihood import DensityConfig, DensityData


def nice_flow(dims: int, couplings: int, hidden: int, depth: int) -> layers.FlowSequence:
    """f on (B, D) vectors: ``couplings`` additive couplings on alternating odd/even dimensions,
    each m an MLP of ``depth`` hidden layers of ``hidden`` units, then the scaling layer."""
    return layers.FlowSequence(
        *[layers.AdditiveCoupling(layers.mlp(dims, dims, hidden, depth),
                                  mask=layers.alternating_mask(dims, k % 2))
          for k in range(couplings)],
        layers.Scaling(dims))


@dataclass
class Config(DensityConfig):
    """NICE: additive couplings and a diagonal scaling under a logistic or Gaussian prior."""

    METHOD: ClassVar[str] = "nice"
    BERNOULLI: ClassVar[bool] = False

    dataset: str = "8gaussians"
    """Training data: 2D points (8gaussians, two-moons, ...) or grey-level images (digits)."""
    couplings: int = 6
    """Additive coupling layers (the paper uses 4), alternating odd and even dimensions."""
    hidden: int = 128
    """Units of each hidden layer of the coupling function m."""
    depth: int = 3
    """Hidden layers of the coupling function m (ReLU MLP)."""
    prior: Literal["logistic", "gaussian"] = "logistic"
    """The factorised prior p_H: standard logistic (the paper's) or standard Gaussian."""
    alpha: float = 0.05
    """Images: the logit transform's alpha, y = logit(alpha + (1 - 2 alpha) x)."""

    def check(self) -> None:
        super().check()
        not_conditional(self)
        for flag, value in (("couplings", self.couplings), ("hidden", self.hidden),
                            ("depth", self.depth)):
            if value < 1:
                raise ConfigError(f"--{flag} must be at least 1, got {value}")
        if not 0 < self.alpha < 0.5:
            raise ConfigError(f"--alpha must lie in (0, 0.5), got {self.alpha}")

    def build_model(self, data: DensityData) -> nn.Module:
        shape = tuple(data.dataset.sample_shape)
        if data.kind == "points":
            dims = check_points(shape, self.METHOD)
            return FlowModel(nice_flow(dims, self.couplings, self.hidden, self.depth), shape,
                             self.prior)
        check_image(shape, 0, "--dataset")  # (C, H, W)
        dims = math.prod(shape)
        flow = layers.FlowSequence(layers.Logit(self.alpha), layers.Flatten(shape),
                                   nice_flow(dims, self.couplings, self.hidden, self.depth))
        return FlowModel(flow, shape, self.prior)
