r"""Masked autoencoder for distribution estimation (Germain, Gregor, Murray & Larochelle, ICML
2015).

An MLP whose weight matrices are multiplied by binary masks so that output i sees only the
inputs before i in an ordering. Each input d gets the degree m^0(d) = its position in the order
(1..D), each hidden unit k of layer l a degree m^l(k) drawn uniformly from
{min_k' m^{l-1}(k'), ..., D - 1}, and

    M^l_{k k'} = [m^l(k) >= m^{l-1}(k')]      (hidden layers),
    M^V_{d k}  = [m^0(d) > m^L(k)]             (output layer),

so a path from input j to output i exists only if m^0(j) < m^0(i). The logits are

    h^l = relu((W^l o M^l) h^{l-1} + b^l),   l = (V o M^V) h^L + c.

Order- and connectivity-agnostic training (Section 4): K masks (orderings and hidden degrees
drawn from a seed); each training batch uses one of them, drawn at random. At test time the
model is the K-mask ensemble, the mixture

    p(x) = 1/K sum_k p_k(x),   log p(x) = logsumexp_k log p_k(x) - log K,

and sampling draws a mask uniformly per sample, then the pixels in that mask's order: exact
samples of the mixture. K = 1 with ``--natural-order`` is the plain MADE in raster order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mlatlas.core.config import require_at_least
from mlatlas.generative.autoregressive.common import (
    BernoulliAutoregressive,
    LabelBias,
    ancestral_sample,
    bernoulli_log_prob,
    check_binary,
)
from mlatlas.generative.likelihood import DensityConfig, DensityData


def made_degrees(dims: int, hidden: tuple[int, ...], generator: torch.Generator,
                 natural_order: bool = False) -> list[torch.Tensor]:
    """m^0 (a permutation of 1..D, or 1..D itself) and m^1..m^L, each hidden degree uniform on
    {min of the previous layer's degrees, ..., D - 1}."""
    order = torch.arange(1, dims + 1) if natural_order else \
        torch.randperm(dims, generator=generator) + 1
    degrees = [order]
    for width in hidden:
        low = int(degrees[-1].min()) if len(degrees) > 1 else 1
        high = max(low, dims - 1)
        degrees.append(torch.randint(low, high + 1, (width,), generator=generator))
    return degrees


def made_masks(degrees: list[torch.Tensor]) -> list[torch.Tensor]:
    """M^1..M^L (m^l(k) >= m^{l-1}(k')) and M^V (m^0(d) > m^L(k)), each (out, in)."""
    masks = [(d[:, None] >= prev[None, :]).float() for prev, d in
             zip(degrees[:-1], degrees[1:], strict=True)]
    masks.append((degrees[0][:, None] > degrees[-1][None, :]).float())
    return masks


class MADE(BernoulliAutoregressive):
    def __init__(self, sample_shape: tuple[int, ...], hidden: tuple[int, ...], num_masks: int,
                 mask_seed: int, natural_order: bool = False, num_classes: int = 0):
        super().__init__(sample_shape, num_classes)
        widths = (self.dims, *hidden, self.dims)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:],
                                                                     strict=True))
        # A direct input-to-output connection, masked like the output layer (Section 4).
        self.direct = nn.Linear(self.dims, self.dims, bias=False)
        nn.init.zeros_(self.direct.weight)
        self.label = LabelBias(num_classes, (hidden[0],))
        generator = torch.Generator().manual_seed(mask_seed)
        masks, positions = [], []
        for _ in range(num_masks):
            degrees = made_degrees(self.dims, hidden, generator, natural_order)
            masks.append(made_masks(degrees))
            positions.append(degrees[0])
        for layer in range(len(widths) - 1):
            self.register_buffer(f"mask{layer}", torch.stack([m[layer] for m in masks]))
        m0 = torch.stack(positions)                                    # (K, D): m^0
        self.register_buffer("direct_mask", (m0[:, :, None] > m0[:, None, :]).float())
        self.register_buffer("orders", torch.argsort(m0, dim=1))
        self.num_masks = num_masks

    def masked_logits(self, x: torch.Tensor, y: torch.Tensor | None, k: int) -> torch.Tensor:
        """The logits of mask k, (B, *sample_shape)."""
        h = x.flatten(1)
        inputs = h
        for i, layer in enumerate(self.layers):
            h = F.linear(h, layer.weight * getattr(self, f"mask{i}")[k], layer.bias)
            if i == 0 and self.num_classes:
                h = h + self.label(y, len(x))
            if i < len(self.layers) - 1:
                h = F.relu(h)
        h = h + F.linear(inputs, self.direct.weight * self.direct_mask[k])
        return h.view_as(x)

    def logits(self, x: torch.Tensor, y: torch.Tensor | None = None, k: int = 0) -> torch.Tensor:
        return self.masked_logits(x, y, k)

    def order(self, k: int = 0) -> torch.Tensor:
        return self.orders[k].cpu()

    def log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Training: log p_k(x) of one mask drawn at random (order-agnostic training). Eval:
        the K-mask ensemble logsumexp_k log p_k(x) - log K."""
        check_binary(x, self.sample_shape)
        if self.training:
            k = int(torch.randint(self.num_masks, ()))
            return bernoulli_log_prob(self.masked_logits(x, y, k), x)
        per_mask = torch.stack([bernoulli_log_prob(self.masked_logits(x, y, k), x)
                                for k in range(self.num_masks)])
        return torch.logsumexp(per_mask, 0) - math.log(self.num_masks)

    def sample(self, n: int, generator: torch.Generator, y: torch.Tensor | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        """Exact samples of the ensemble: a mask k uniform per sample, then its order."""
        device = self.device
        which = torch.randint(self.num_masks, (n,), generator=generator, device=device)
        x = torch.zeros(n, *self.sample_shape, device=device)
        for k in range(self.num_masks):
            rows = (which == k).nonzero().flatten()
            if not len(rows):
                continue
            y_k = y[rows] if y is not None else None
            x[rows] = ancestral_sample(lambda v, lab, k=k: self.masked_logits(v, lab, k),
                                       len(rows), self.sample_shape, self.order(k), generator,
                                       y_k, temperature, device=device)
        return x


@dataclass
class Config(DensityConfig):
    METHOD: ClassVar[str] = "made"

    hidden: int = 500
    """Width of each hidden layer."""
    layers: int = 1
    """Number of hidden layers."""
    num_masks: int = 1
    """K: orderings and connectivities trained over (1: a single mask) and ensembled at test."""
    natural_order: bool = False
    """Keep the inputs in raster order (else each mask draws a random ordering)."""
    mask_seed: int = 0
    """Seed of the masks' orderings and hidden degrees."""

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "hidden", "layers", "num_masks")

    def build_model(self, data: DensityData) -> nn.Module:
        return MADE(data.dataset.sample_shape, (self.hidden,) * self.layers, self.num_masks,
                    self.mask_seed, self.natural_order,
                    data.dataset.num_classes * self.conditional)
