r"""Likelihood in the units the literature reports: nats per example and bits per dimension.

For a test set of N examples of D dimensions with NLL = -1/N sum_n log p(x_n) nats per example,

    bits/dim = NLL / (D ln 2).

The pixel-independent baseline is the best model that ignores every dependency between pixels:
p(x) = prod_d p_d(x_d), each p_d a categorical over the L grey levels (a Bernoulli for L = 2)
fitted on the training split with add-one (Laplace) smoothing, so it gives every level of every
pixel a positive probability on the test split.
"""

from __future__ import annotations

import math

import torch


def bits_per_dim(nll_nats: float, dims: int) -> float:
    """NLL in nats per example, as bits per dimension."""
    return nll_nats / (dims * math.log(2.0))


def independent_baseline_nll(x_train: torch.Tensor, x_test: torch.Tensor, levels: int) -> float:
    """Held-out NLL (nats per example) of the per-pixel categorical over ``levels`` evenly spaced
    values in [0, 1] (k / (levels - 1)), fitted with add-one smoothing on ``x_train``."""
    if levels < 2:
        raise ValueError(f"levels must be at least 2, got {levels}")
    k_train = torch.round(x_train.flatten(1) * (levels - 1)).long()
    k_test = torch.round(x_test.flatten(1) * (levels - 1)).long()
    dims = k_train.shape[1]
    counts = torch.ones(dims, levels, dtype=torch.float64)
    counts.scatter_add_(1, k_train.T, torch.ones(k_train.T.shape, dtype=torch.float64))
    log_p = (counts / counts.sum(1, keepdim=True)).log()
    return -float(log_p.gather(1, k_test.T).sum(0).mean())
