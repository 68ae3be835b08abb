"""Experience replay (Lin 1992; Mnih et al. 2015) for the off-policy agents DDPG and TD3.

The buffer D keeps the last N transitions (s, a, r, s', terminated) in one preallocated (N, W)
tensor, one row each, written circularly: row ``pos`` is overwritten next and
pos <- (pos + n) mod N after n rows. A minibatch is drawn uniformly with replacement among the
``size`` = min(rows written, N) filled rows,

    i_1, ..., i_B ~ U{0, ..., size - 1},

with the run's torch.Generator, so the same seed draws the same minibatches. The rows, ``pos``
and ``size`` live in the dict ``state`` of tensors, which :func:`mlatlas.core.run.fit` writes
into the checkpoint and restores in place, so a resumed run samples from the same buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """A minibatch of transitions, views into one gathered tensor; leading dims (..., B)."""

    obs: torch.Tensor         # (..., B, obs_dim) s
    actions: torch.Tensor     # (..., B, act_dim) a
    rewards: torch.Tensor     # (..., B) r
    next_obs: torch.Tensor    # (..., B, obs_dim) s', the final observation at an episode's end
    terminated: torch.Tensor  # (..., B) 1.0 where s' is terminal (no bootstrap), else 0.0

    def __getitem__(self, i: int) -> Batch:
        """The i-th of a stack of minibatches (first dim)."""
        return Batch(self.obs[i], self.actions[i], self.rewards[i], self.next_obs[i],
                     self.terminated[i])


class ReplayBuffer:
    """A circular buffer of ``capacity`` transitions with vector observations and actions."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int):
        if capacity < 1 or obs_dim < 1 or act_dim < 1:
            raise ValueError(f"ReplayBuffer needs capacity, obs_dim and act_dim >= 1, got "
                             f"{capacity}, {obs_dim}, {act_dim}")
        self.obs_dim, self.act_dim = obs_dim, act_dim
        # Row layout: s | a | r | s' | terminated. One tensor makes a minibatch one gather.
        self._cols = [0, obs_dim, obs_dim + act_dim, obs_dim + act_dim + 1,
                      2 * obs_dim + act_dim + 1, 2 * obs_dim + act_dim + 2]
        self.state: dict[str, torch.Tensor] = {
            "data": torch.zeros(capacity, self._cols[-1]),
            "pos": torch.zeros((), dtype=torch.long),
            "size": torch.zeros((), dtype=torch.long),
        }

    @property
    def capacity(self) -> int:
        # Read from the rows themselves: a resumed run keeps the capacity it was checkpointed
        # with even when its config now asks for more steps.
        return self.state["data"].shape[0]

    def __len__(self) -> int:
        return int(self.state["size"])

    @property
    def pos(self) -> int:
        return int(self.state["pos"])

    def add(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
            next_obs: torch.Tensor, terminated: torch.Tensor) -> None:
        """Append n transitions: (n, obs_dim), (n, act_dim), (n,), (n, obs_dim), (n,)."""
        n = obs.shape[0]
        shapes = (obs.shape, actions.shape, rewards.shape, next_obs.shape, terminated.shape)
        expected = ((n, self.obs_dim), (n, self.act_dim), (n,), (n, self.obs_dim), (n,))
        if tuple(map(tuple, shapes)) != expected:
            raise ValueError(f"ReplayBuffer.add expects shapes {expected}, got "
                             f"{tuple(tuple(s) for s in shapes)}")
        rows = torch.cat([obs, actions, rewards[:, None], next_obs,
                          terminated[:, None].to(obs.dtype)], dim=1)
        start = self.pos
        if n > self.capacity:
            # Only the newest ``capacity`` rows would survive writing them one by one; they land
            # where that would have put them.
            rows = rows[-self.capacity:]
            start = (start + n - self.capacity) % self.capacity
        m, data = rows.shape[0], self.state["data"]
        first = min(m, self.capacity - start)
        data[start:start + first] = rows[:first]
        data[:m - first] = rows[first:]
        self.state["pos"].fill_((self.pos + n) % self.capacity)
        self.state["size"].fill_(min(len(self) + n, self.capacity))

    def sample(self, batch_size: int, generator: torch.Generator,
               num_batches: int | None = None) -> Batch:
        """``batch_size`` transitions drawn uniformly from the filled rows, or a stack of
        ``num_batches`` such minibatches (leading dim) drawn in one call."""
        size = len(self)
        if size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        shape = (batch_size,) if num_batches is None else (num_batches, batch_size)
        idx = torch.randint(size, shape, generator=generator)
        rows = self.state["data"][idx]
        c = self._cols
        return Batch(rows[..., c[0]:c[1]], rows[..., c[1]:c[2]], rows[..., c[2]],
                     rows[..., c[3]:c[4]], rows[..., c[4]])
