r"""What every autoregressive model of binary images shares: the chain rule over an ordering of
the D pixels, a Bernoulli per conditional, and exact ancestral sampling.

    log p(x) = sum_{d=1}^{D} log p(x_{o(d)} | x_{o(<d)}),
    p(x_i = 1 | x_{<i}) = sigmoid(l_i),   log p(x_i | x_{<i}) = x_i l_i - softplus(l_i)

for the logits l = f_theta(x) of a network whose output i depends on no input at or after i in
the order o (the autoregressive property the tests check by gradients). One forward pass scores
all D conditionals at once; sampling draws the pixels one at a time, o(1) first, each from its
conditional given the pixels drawn so far (D forward passes, all n samples in one batch).
Temperature T divides the logits: p_T(x_i = 1 | .) = sigmoid(l_i / T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_i [x_i l_i - softplus(l_i)] over every dimension but the first: (B, ...) -> (B,)."""
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def check_binary(x: torch.Tensor, shape: tuple[int, ...]) -> None:
    """ValueError unless x is a batch of ``shape``-shaped images of 0s and 1s."""
    if tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"expected images of shape {tuple(shape)}, got {tuple(x.shape[1:])}")
    if not bool(((x == 0) | (x == 1)).all()):
        raise ValueError("a Bernoulli model scores binary images: values must be 0 or 1")


class BernoulliAutoregressive(nn.Module):
    """Base of the binary-image models: a subclass computes ``logits(x, y)`` of shape
    ``(B, *sample_shape)`` with the autoregressive property in ``order`` (a permutation of the
    flattened pixel indices, raster order by default)."""

    def __init__(self, sample_shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        self.sample_shape = tuple(sample_shape)
        self.num_classes = num_classes
        self.dims = int(torch.tensor(self.sample_shape).prod())

    def logits(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def order(self) -> torch.Tensor:
        """The pixels in the order they are generated (flattened indices)."""
        return torch.arange(self.dims)

    def log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x | y) in nats, (B,)."""
        check_binary(x, self.sample_shape)
        return bernoulli_log_prob(self.logits(x, y), x)

    def sample(self, n: int, generator: torch.Generator, y: torch.Tensor | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        """n exact samples, drawn pixel by pixel in ``order()``, all n in one batch."""
        return ancestral_sample(self.logits, n, self.sample_shape, self.order(), generator, y,
                                temperature, device=self.device)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def ancestral_sample(logits_fn, n: int, sample_shape: tuple[int, ...], order: torch.Tensor,
                     generator: torch.Generator, y: torch.Tensor | None = None,
                     temperature: float = 1.0, device: torch.device | str = "cpu"
                     ) -> torch.Tensor:
    """x_{o(d)} ~ Bernoulli(sigmoid(l_{o(d)}(x) / T)) for d = 1..D in turn; ``logits_fn(x, y)``
    maps (n, *sample_shape) images to logits of the same shape."""
    x = torch.zeros(n, *sample_shape, device=device)
    flat = x.view(n, -1)
    for i in order.tolist():
        p = torch.sigmoid(logits_fn(x, y).reshape(n, -1)[:, i] / temperature)
        flat[:, i] = torch.bernoulli(p, generator=generator)
    return x


class LabelBias(nn.Module):
    """A learned bias per class on each output (or hidden) unit: the class-conditional term
    V y of conditional models (y one-hot), zero for unconditional ones."""

    def __init__(self, num_classes: int, shape: tuple[int, ...]):
        super().__init__()
        self.embed = nn.Embedding(num_classes, int(torch.tensor(shape).prod())) \
            if num_classes else None
        self.shape = tuple(shape)
        if self.embed is not None:
            nn.init.zeros_(self.embed.weight)

    def forward(self, y: torch.Tensor | None, batch: int) -> torch.Tensor | float:
        if self.embed is None:
            return 0.0
        if y is None:
            raise ValueError("this model is class-conditional: pass the labels y")
        return self.embed(y).view(batch, *self.shape)
