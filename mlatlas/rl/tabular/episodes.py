"""Episodes on the tabular model, many at once.

``rollout`` runs B episodes side by side for T steps: the loop is over time only, every step is
one gather on the (S, A) model tables for the whole batch. Episodes that reach a terminal state
stay there; ``alive[t]`` is False for the steps after the end, so their rewards count as zero.

``scatter_mean_update`` applies a batch of tabular updates q(s, a) <- q(s, a) + alpha delta: when
several episodes update the same (s, a) in one step their corrections are averaged, so the step
size stays alpha however large the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlatlas.rl.tabular.gridworld import TabularModel, sample_actions


@dataclass
class Episodes:
    """Time-major batch: ``states`` (T+1, B), ``actions`` and ``rewards`` (T, B), ``alive``
    (T, B) True where step t happened before the episode ended."""

    states: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    alive: torch.Tensor


def rollout(model: TabularModel, pi: torch.Tensor, s0: torch.Tensor, length: int,
            generator: torch.Generator, a0: torch.Tensor | None = None) -> Episodes:
    """Follow pi from states s0 (B,) for ``length`` steps; ``a0`` fixes the first actions
    (exploring starts)."""
    batch = s0.shape[0]
    states = torch.empty(length + 1, batch, dtype=torch.int64)
    actions = torch.empty(length, batch, dtype=torch.int64)
    rewards = torch.zeros(length, batch, dtype=model.reward.dtype)
    alive = torch.empty(length, batch, dtype=torch.bool)
    s, running = s0, ~model.terminal[s0]
    states[0] = s
    for t in range(length):
        a = a0 if (t == 0 and a0 is not None) else sample_actions(pi, s, generator)
        s_next, r, terminated = model.step(s, a)
        actions[t], alive[t] = a, running
        rewards[t] = torch.where(running, r, torch.zeros_like(r))
        s = torch.where(running, s_next, s)
        states[t + 1] = s
        running = running & ~terminated
    return Episodes(states, actions, rewards, alive)


def scatter_mean_update(table: torch.Tensor, index: tuple[torch.Tensor, ...],
                        delta: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """table[index] += alpha * mean of the deltas that share an index (in place; returns it)."""
    flat = torch.zeros(table.numel(), dtype=table.dtype)
    count = torch.zeros(table.numel(), dtype=table.dtype)
    linear = torch.zeros_like(index[0])
    for i, size in zip(index, table.shape, strict=True):
        linear = linear * size + i
    flat.index_add_(0, linear, delta.to(table.dtype))
    count.index_add_(0, linear, torch.ones_like(delta, dtype=table.dtype))
    table.add_(alpha * (flat / count.clamp(min=1)).view_as(table))
    return table


def start_states(start: int | None, n: int, n_states: int,
                 generator: torch.Generator) -> torch.Tensor:
    """n start states: all ``start``, or uniformly random when it is None."""
    if start is None:
        return torch.randint(n_states, (n,), generator=generator)
    return torch.full((n,), start, dtype=torch.int64)
