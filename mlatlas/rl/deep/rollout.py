"""On-policy rollouts: T steps of B parallel environments under the current policy, stored
time-major, with the values an advantage estimate needs (REINFORCE, A2C, PPO and TRPO share it),
and the actor and critic of the agents that learn from GAE advantages (A2C, PPO, TRPO): a
Gaussian policy with fresh noise at every step, or with ``sde`` the state-dependent exploration
of :mod:`~mlatlas.rl.deep.gsde`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mlatlas.core.config import ConfigError
from mlatlas.rl.deep.envs import Interaction, Spaces
from mlatlas.rl.deep.gsde import StateDependentPolicy
from mlatlas.rl.deep.policies import Policy, value_net
from mlatlas.rl.returns import gae


def make_actor(cfg: Any, spaces: Spaces) -> Policy:
    """pi_theta of an actor-critic config (its ``hidden_sizes``, ``log_std_init`` and
    ``sde``, ``sde_sample_freq``): explored by gSDE with ``sde``, which needs Box actions."""
    if not cfg.sde:
        return Policy(spaces, cfg.hidden_sizes, cfg.log_std_init)
    if spaces.discrete:
        raise ConfigError(f"--sde needs continuous (Box) actions; {cfg.env} has discrete ones")
    return StateDependentPolicy(spaces, cfg.hidden_sizes, cfg.log_std_init, cfg.sde_sample_freq)


def actor_and_critic(cfg: Any, spaces: Spaces) -> tuple[Policy, nn.Module]:
    """pi_theta and v_w, of the same hidden sizes."""
    return make_actor(cfg, spaces), value_net(spaces, cfg.hidden_sizes)


@dataclass
class Rollout:
    obs: torch.Tensor          # (T, B, obs_dim) s_t, normalised as the policy saw them
    actions: torch.Tensor      # (T, B) or (T, B, act_dim)
    log_probs: torch.Tensor    # (T, B) log pi_old(a_t | s_t)
    values: torch.Tensor       # (T, B) v(s_t), zeros without a critic
    next_values: torch.Tensor  # (T, B) v(s_{t+1}) of the state really reached (see gae)
    rewards: torch.Tensor      # (T, B) r_{t+1}
    terminated: torch.Tensor   # (T, B) bool
    dones: torch.Tensor        # (T, B) bool

    def advantages(self, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        """GAE(lambda) advantages A_t and the value targets A_t + v(s_t)."""
        advantages = gae(self.rewards, self.values, self.next_values, self.terminated,
                         self.dones, gamma, lam)
        return advantages, advantages + self.values


def standardize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std, as advantages are normalised per batch (a single value is centred)."""
    return (x - x.mean()) / (x.std() + eps) if x.numel() > 1 else x - x.mean()


@torch.no_grad()
def collect(interaction: Interaction, policy: Policy,
            value_fn: Callable[[torch.Tensor], torch.Tensor] | None, n_steps: int,
            generator: torch.Generator) -> Rollout:
    """Act for ``n_steps`` steps in every environment of ``interaction``."""
    steps = []
    for t in range(n_steps):
        dist, actions = policy.explore(interaction.obs, generator, t)
        steps.append((policy.log_prob(dist, actions), interaction.step(actions)))
    log_probs = torch.stack([s[0] for s in steps])
    ts = [s[1] for s in steps]
    obs = torch.stack([t.obs for t in ts])
    dones = torch.stack([t.dones for t in ts])
    if value_fn is None:
        values = next_values = torch.zeros(dones.shape)
    else:
        values = value_fn(obs)
        # v(s_{t+1}) is v of the next row's observation except where an episode ended (its
        # final observation) and after the last row: one batched call for those.
        next_values = torch.cat([values[1:], values[:1]])
        cut = dones.clone()
        cut[-1] = True
        next_values[cut] = value_fn(torch.stack([t.next_obs for t in ts])[cut])
    return Rollout(obs, torch.stack([t.actions for t in ts]), log_probs, values, next_values,
                   torch.stack([t.rewards for t in ts]), torch.stack([t.terminated for t in ts]),
                   dones)
