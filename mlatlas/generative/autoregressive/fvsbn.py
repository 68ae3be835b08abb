r"""Fully visible sigmoid belief network (Frey 1998; Gan et al. 2015): each pixel a logistic
regression on the pixels before it in raster order.

    p(x_i = 1 | x_{<i}) = sigmoid(b_i + sum_{j<i} W_ij x_j + c_{y,i}),

so the logits are l = (W o M) x + b with M the strictly lower-triangular mask (M_ij = 1 iff
j < i), and c_y a per-class bias when ``--conditional``. D(D+1)/2 parameters; the likelihood is
the chain rule of ``autoregressive/common.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mlatlas.generative.autoregressive.common import BernoulliAutoregressive, LabelBias
from mlatlas.generative.likelihood import DensityConfig, DensityData


class FVSBN(BernoulliAutoregressive):
    """l = (W o M) x + b (+ c_y), M strictly lower-triangular."""

    def __init__(self, sample_shape: tuple[int, ...], num_classes: int = 0):
        super().__init__(sample_shape, num_classes)
        d = self.dims
        self.weight = nn.Parameter(torch.zeros(d, d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.register_buffer("mask", torch.ones(d, d).tril(-1), persistent=False)
        self.label = LabelBias(num_classes, (d,))

    def logits(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.flatten(1)
        logits = flat @ (self.weight * self.mask).T + self.bias + self.label(y, len(x))
        return logits.view_as(x)


@dataclass
class Config(DensityConfig):
    METHOD: ClassVar[str] = "fvsbn"

    lr: float = 3e-3
    """Adam learning rate."""

    def build_model(self, data: DensityData) -> nn.Module:
        return FVSBN(data.dataset.sample_shape, data.dataset.num_classes * self.conditional)
