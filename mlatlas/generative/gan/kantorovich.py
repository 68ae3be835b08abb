r"""Kantorovich-Rubinstein duality, measured: a critic trained between two fixed sample sets.

For samples x_1..x_n ~ P and y_1..y_n ~ Q,

    W1(P_n, Q_n) = sup_{||f||_L <= 1} 1/n sum_i f(x_i) - 1/n sum_i f(y_i),

and the left side is computed exactly by an assignment
(:func:`mlatlas.eval.metrics.wasserstein1_exact`). :func:`critic_estimates` trains an MLP critic
on the right side alone, with the gradient penalty of WGAN-GP or the weight clipping of WGAN, and
records E f(x) - E f(y) on the two sets as it trains, so the gap to the exact W1 can be watched
(``one-sided``: the penalty on gradient norms above 1 only):
the penalty's estimate climbs to W1 (a 1-Lipschitz critic cannot exceed it, up to the penalty's
softness), the clipped critic's to K W1 for the unknown, small Lipschitz constant K its clipping
allows.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from mlatlas.generative.gan.losses import (
    clip_weights,
    critic_loss,
    gradient_penalty,
    interpolates,
    wasserstein_estimate,
)
from mlatlas.nn.layers import mlp


def critic_estimates(x: torch.Tensor, y: torch.Tensor, steps: int, record: list[int],
                     constraint: Literal["penalty", "one-sided", "clip"] = "penalty",
                     hidden: int = 128, batch_size: int = 256, gp_lambda: float = 10.0,
                     clip: float = 0.01, seed: int = 0) -> list[tuple[int, float]]:
    """Train an MLP critic on the dual objective between point sets x and y, (N, D) each, for
    ``steps`` steps (Adam 1e-4, betas (0.5, 0.9) with the penalty; RMSprop 5e-5 with clipping,
    as the two papers train their critics); returns (step, E f(x) - E f(y) on the full sets) at
    each step in ``record``."""
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"critic_estimates needs two (N, D) sets of one shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    critic = nn.Sequential(mlp(x.shape[1], (hidden,) * 2, hidden, nn.LeakyReLU, orthogonal=False),
                           nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
    f = lambda v: critic(v).squeeze(1)  # noqa: E731
    if constraint in ("penalty", "one-sided"):
        optimizer = torch.optim.Adam(critic.parameters(), lr=1e-4, betas=(0.5, 0.9))
    elif constraint == "clip":
        optimizer = torch.optim.RMSprop(critic.parameters(), lr=5e-5)
    else:
        raise ValueError(f"unknown constraint {constraint!r}; use penalty, one-sided or clip")
    out, wanted = [], set(record)
    for step in range(1, steps + 1):
        i = torch.randint(len(x), (batch_size,), generator=generator)
        j = torch.randint(len(y), (batch_size,), generator=generator)
        real, fake = x[i], y[j]
        loss = critic_loss(f(real), f(fake))
        if constraint != "clip":
            eps = torch.rand(batch_size, generator=generator)
            loss = loss + gradient_penalty(f, interpolates(real, fake, eps), gp_lambda,
                                           one_sided=constraint == "one-sided")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if constraint == "clip":
            clip_weights(critic, clip)
        if step in wanted:
            with torch.no_grad():
                out.append((step, float(wasserstein_estimate(f(x), f(y)))))
    return out
