"""Observation and reward normalisation, the usual recipe (Engstrom et al. 2020, "Implementation
matters in deep policy gradients"):

    observation   o' = clip((o - mu_o) / sqrt(var_o + eps), -c, c), running mu_o, var_o
    reward        r' = clip(r / sqrt(var_G + eps), -c, c), where G_t = gamma G_{t-1} + r_t is a
                  running discounted return per environment (the reward is scaled, not centred)

Both are :class:`mlatlas.core.stats.RunningMeanStd` (float64, prior count 1e-4, Chan et al.'s
merge), so their statistics are module buffers and travel in the checkpoint with the networks.
"""

from __future__ import annotations

import math

import torch

from mlatlas.core.stats import RunningMeanStd


class ObsNormalizer(RunningMeanStd):
    """o' = clip((o - mu_o) / sqrt(var_o + eps), -c, c) for (N, dim) observations."""

    def __init__(self, dim: int, clip: float = 10.0, eps: float = 1e-8):
        super().__init__((dim,))
        self.clip, self.eps = clip, eps

    def forward(self, obs: torch.Tensor, update: bool = False) -> torch.Tensor:
        if update:
            self.update(obs)
        z = (obs - self.mean.float()) / torch.sqrt(self.var.float() + self.eps)
        return z.clamp(-self.clip, self.clip)


class RewardScaler(RunningMeanStd):
    """r / std(G) with G the running discounted return of each environment."""

    def __init__(self, num_envs: int, gamma: float, clip: float = 10.0, eps: float = 1e-8):
        super().__init__(())
        self.gamma, self.clip, self.eps = gamma, clip, eps
        self.register_buffer("returns", torch.zeros(num_envs, dtype=torch.float64))

    @torch.no_grad()
    def forward(self, rewards: torch.Tensor, dones: torch.Tensor) -> torch.Tensor:
        """Scaled (num_envs,) rewards; ``dones`` restarts G of the environments whose episode
        ended (after this reward has counted)."""
        self.returns.mul_(self.gamma).add_(rewards)
        self.update(self.returns)
        self.returns.masked_fill_(dones, 0.0)
        return (rewards / math.sqrt(self.var.item() + self.eps)).clamp(-self.clip, self.clip)
