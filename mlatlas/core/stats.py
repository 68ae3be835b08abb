"""Running statistics shared by the families (observation and reward normalisers in deep RL,
score normalisation in PPO-RLHF).

Batches x_1, x_2, ... of n_b values each are merged one by one (Chan et al. 1979): with
n = n_a + n_b and delta = mean_b - mean_a,

    mean = mean_a + delta n_b / n
    var  = (var_a n_a + var_b n_b + delta^2 n_a n_b / n) / n

so after any number of updates ``mean`` and ``var`` are those of every value seen (population
variance), without keeping the values.
"""

from __future__ import annotations

import torch
from torch import nn


class RunningMeanStd(nn.Module):
    """Mean and variance over the first axis of everything passed to :meth:`update`.

    ``shape`` is that of one value (() for scalars); ``count`` is the prior count, a tiny one
    keeping a first update of a single value from dividing by zero. The statistics are buffers,
    so a checkpoint of the module carries them.
    """

    def __init__(self, shape: tuple[int, ...] = (), dtype: torch.dtype = torch.float64,
                 count: float = 1e-4):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape, dtype=dtype))
        self.register_buffer("var", torch.ones(shape, dtype=dtype))
        self.register_buffer("count", torch.tensor(count, dtype=dtype))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge a batch ``x`` of shape (n, *shape)."""
        if tuple(x.shape[1:]) != tuple(self.mean.shape):
            raise ValueError(f"RunningMeanStd of values shaped {tuple(self.mean.shape)} got a "
                             f"batch shaped {tuple(x.shape)}")
        x = x.to(self.mean.dtype)
        n = x.shape[0]
        batch_mean, batch_var = x.mean(0), x.var(0, unbiased=False)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.var.copy_((self.var * self.count + batch_var * n
                        + delta.square() * self.count * n / total) / total)
        self.count.copy_(total)
