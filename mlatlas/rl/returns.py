"""Discounted returns, shared by the tabular and the deep methods.

For rewards r_{t+1} collected at t = 0..T-1 (time-major, one column per episode) the discounted
return is G_t = r_{t+1} + gamma G_{t+1} (Zhao eq. 2.4), computed backwards in one pass over time
and vectorized over episodes. ``dones[t]`` marks a transition that ended its episode, so nothing
after it is added; ``bootstrap`` is v(s_T), the value of the state where a batch of unfinished
episodes was cut off (G_T = bootstrap).
"""

from __future__ import annotations

import torch


def discounted_returns(rewards: torch.Tensor, gamma: float, dones: torch.Tensor | None = None,
                       bootstrap: torch.Tensor | None = None) -> torch.Tensor:
    """G_t for every t of (T, ...) rewards; ``dones`` and ``bootstrap`` as in the module doc."""
    returns = torch.empty_like(rewards)
    g = torch.zeros_like(rewards[0]) if bootstrap is None else bootstrap.to(rewards.dtype)
    for t in range(rewards.shape[0] - 1, -1, -1):
        if dones is not None:
            g = torch.where(dones[t], torch.zeros_like(g), g)
        g = rewards[t] + gamma * g
        returns[t] = g
    return returns
