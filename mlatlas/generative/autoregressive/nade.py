r"""Neural autoregressive distribution estimator (Larochelle & Murray, AISTATS 2011).

A hidden layer shared across the conditionals, with tied input weights W (H x D):

    h_i = sigmoid(a_i),   a_i = c + W_{:, <i} x_{<i},
    p(x_i = 1 | x_{<i}) = sigmoid(b_i + V_i . h_i).

The pre-activations obey the recursion a_1 = c, a_{i+1} = a_i + W_{:, i} x_i, so all D of them
cost O(DH) (a cumulative sum over i), not the O(D^2 H) of D separate hidden layers; the tests
check the recursion against that naive computation. A class-conditional model adds a learned
E_y to c (``--conditional``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mlatlas.core.config import require_at_least
from mlatlas.generative.autoregressive.common import BernoulliAutoregressive, LabelBias
from mlatlas.generative.likelihood import DensityConfig, DensityData


def nade_preactivations(x: torch.Tensor, weight: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a_i = c + sum_{j<i} W_{:, j} x_j for every i by the recursion a_{i+1} = a_i + W_{:, i}
    x_i: x (B, D), W (H, D), c (B, H) or (H,) -> (B, D, H)."""
    steps = x.unsqueeze(-1) * weight.T                       # (B, D, H): W_{:, j} x_j
    a = torch.cumsum(steps, dim=1) - steps                    # exclusive: j < i
    return a + c.unsqueeze(-2) if c.dim() == 2 else a + c


class NADE(BernoulliAutoregressive):
    def __init__(self, sample_shape: tuple[int, ...], hidden: int, num_classes: int = 0):
        super().__init__(sample_shape, num_classes)
        d = self.dims
        self.W = nn.Parameter(torch.randn(hidden, d) * d ** -0.5)
        self.c = nn.Parameter(torch.zeros(hidden))
        self.V = nn.Parameter(torch.randn(d, hidden) * hidden ** -0.5)
        self.b = nn.Parameter(torch.zeros(d))
        self.label = LabelBias(num_classes, (hidden,))

    def logits(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.flatten(1)
        c = self.c + self.label(y, len(x)) if self.num_classes else self.c
        h = torch.sigmoid(nade_preactivations(flat, self.W, c))   # (B, D, H)
        return ((h * self.V).sum(-1) + self.b).view_as(x)


@dataclass
class Config(DensityConfig):
    METHOD: ClassVar[str] = "nade"

    hidden: int = 256
    """H, the width of the shared hidden layer."""

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "hidden")

    def build_model(self, data: DensityData) -> nn.Module:
        return NADE(data.dataset.sample_shape, self.hidden,
                    data.dataset.num_classes * self.conditional)
