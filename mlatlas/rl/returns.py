"""Discounted returns and GAE advantages, shared by the tabular and the deep methods.

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


def gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor,
        terminated: torch.Tensor, dones: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates A_t for (T, ...) time-major tensors (Schulman et al. 2016).

        delta_t = r_{t+1} + gamma (1 - terminated_t) v(s_{t+1}) - v(s_t)
        A_t     = delta_t + gamma lambda (1 - done_t) A_{t+1}

    ``next_values[t]`` is v(s_{t+1}) of the state the transition really reached: at an episode's
    end that is the final observation, not the first one of the next episode. ``terminated``
    marks true terminal states (their value is 0); ``dones`` marks every episode end, time-limit
    truncations included, where the sum stops but v of the cut-off state is still bootstrapped.
    lambda = 1 gives the discounted return minus v(s_t); lambda = 0 the one-step TD error.
    """
    shapes = {t.shape for t in (rewards, values, next_values, terminated, dones)}
    if len(shapes) != 1:
        raise ValueError(f"gae needs tensors of one shape, got {sorted(map(tuple, shapes))}")
    not_terminal = 1.0 - terminated.to(rewards.dtype)
    deltas = rewards + gamma * not_terminal * next_values - values
    carry = gamma * lam * (1.0 - dones.to(rewards.dtype))
    advantages = torch.empty_like(rewards)
    a = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        a = deltas[t] + carry[t] * a
        advantages[t] = a
    return advantages
