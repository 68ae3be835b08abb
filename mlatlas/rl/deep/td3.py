"""Twin delayed deep deterministic policy gradient, TD3 (Fujimoto, van Hoof & Meger 2018).

DDPG (:mod:`~mlatlas.rl.deep.ddpg`) with three changes against the critic's overestimation:

Target policy smoothing: the target action is the target actor's, perturbed by clipped noise and
kept in the box,

    a' = clip(mu_phi'(s') + clip(eps, -c, c), low, high),     eps ~ N(0, sigma~^2 I).

Clipped double Q: two critics Q_theta1, Q_theta2 (K in general) regress on one target built from
the smaller of their target copies,

    y = r + gamma (1 - terminated) min_k Q_theta'_k(s', a'),
    L(theta_k) = E_D[(Q_theta_k(s, a) - y)^2],   k = 1, 2.

Delayed policy updates: the actor ascends E_D[Q_theta1(s, mu_phi(s))] and the targets move by
Polyak averaging only every ``policy_delay`` (d = 2) critic updates, so the policy follows a
critic whose error has had time to shrink.

As in DDPG the networks work in the unit box, so sigma~ and c are fractions of the half-width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from mlatlas.core.config import ConfigError
from mlatlas.core.run import Run
from mlatlas.rl.deep import ddpg
from mlatlas.rl.deep.config import DeepRLConfig
from mlatlas.rl.deep.ddpg import (
    check_replay_fields,
    ddpg_target,
    make_actor,
    policy_update_due,
    train_offpolicy,
)
from mlatlas.rl.deep.envs import Spaces
from mlatlas.rl.deep.evaluation import evaluate
from mlatlas.rl.deep.replay import Batch

__all__ = ["Config", "evaluate", "make_actor", "policy_update_due", "target_policy_smoothing",
           "td3_target", "train"]


@dataclass
class Config(DeepRLConfig):
    """DDPG's fields (the same flags, defaults and presets) and the three of TD3's changes."""

    METHOD: ClassVar[str] = "td3"

    env: str = "Pendulum-v1"
    """A gymnasium environment id with a bounded Box action space."""
    steps: int = 50_000
    """Environment steps to train for (summed over the parallel environments; rounded down to
    whole updates, at least one)."""
    num_envs: int = 1
    """Parallel environments; each update steps all of them ``train_freq`` times."""
    lr: float = 1e-3
    """Learning rate of the actor and the critic (Adam)."""
    hidden: int = 256
    """Width of each hidden layer of the actor and the critic."""
    buffer_size: int = 1_000_000
    """Capacity of the replay buffer in transitions (no more than ``steps`` are allocated)."""
    batch_size: int = 256
    """Transitions per minibatch."""
    learning_starts: int = 100
    """Environment steps of uniformly random actions before learning starts."""
    train_freq: int = 1
    """Vector-environment steps per update (each gives num_envs transitions)."""
    gradient_steps: int = 1
    """Gradient steps of the critic per update."""
    tau: float = 0.005
    """Polyak coefficient of the target networks (1 copies, 0 freezes)."""
    noise: Literal["gaussian", "ou"] = "gaussian"
    """Exploration noise: 'gaussian' (independent) or 'ou' (Ornstein-Uhlenbeck, correlated)."""
    noise_std: float = 0.1
    """sigma of the exploration noise, as a fraction of the action box's half-width (for 'ou' the
    process's sigma: its stationary std is about sigma / sqrt(2 theta))."""
    ou_theta: float = 0.15
    """theta, the mean-reversion rate of the Ornstein-Uhlenbeck noise."""
    ou_dt: float = 0.01
    """dt, the time step of the Ornstein-Uhlenbeck noise."""
    # In environment steps, every 500 and 10,000 updates of the Pendulum preset's 4.
    log_every: int = 2_000
    """Write a row of metrics.csv every this many environment steps (rounded up to whole
    updates)."""
    ckpt_every: int = 40_000
    """Write checkpoint.safetensors (replay buffer included) every this many environment steps
    (rounded up to whole updates; and always at the end)."""
    policy_delay: int = 2
    """d: the actor and the targets move once every d critic updates."""
    target_noise: float = 0.2
    """sigma~ of the target policy smoothing noise, as a fraction of the box's half-width."""
    target_noise_clip: float = 0.5
    """c: the smoothing noise is clipped to [-c, c] (fraction of the half-width)."""
    n_critics: int = 2
    """Critics whose minimum forms the target (2, the twin, in the paper)."""

    # DDPG's presets: rl-zoo's td3.yml and ddpg.yml tune these tasks alike, and so did the
    # measurements here.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = ddpg.Config.PRESETS

    def check(self) -> None:
        super().check()
        check_replay_fields(self)
        if self.policy_delay < 1 or self.n_critics < 1:
            raise ConfigError(f"--policy-delay and --n-critics must be at least 1, got "
                              f"{self.policy_delay} and {self.n_critics}")
        if self.target_noise < 0 or self.target_noise_clip < 0:
            raise ConfigError("--target-noise and --target-noise-clip must be >= 0")


def target_policy_smoothing(next_actions: torch.Tensor, eps: torch.Tensor, noise_clip: float,
                            low: float | torch.Tensor, high: float | torch.Tensor
                            ) -> torch.Tensor:
    """a' = clip(mu'(s') + clip(eps, -c, c), low, high) for (B, d) target actions and noise."""
    if next_actions.shape != eps.shape:
        raise ValueError(f"target_policy_smoothing needs actions and noise of one shape, got "
                         f"{tuple(next_actions.shape)} and {tuple(eps.shape)}")
    low_t = torch.as_tensor(low, dtype=next_actions.dtype)
    high_t = torch.as_tensor(high, dtype=next_actions.dtype)
    return torch.clamp(next_actions + eps.clamp(-noise_clip, noise_clip), low_t, high_t)


def td3_target(rewards: torch.Tensor, terminated: torch.Tensor, next_q: torch.Tensor,
               gamma: float) -> torch.Tensor:
    """y = r + gamma (1 - terminated) min_k Q'_k(s', a') for (B,) rewards and terminal flags and
    (K, B) target values of the K critics (clipped double Q for K = 2)."""
    if next_q.dim() != 2:
        raise ValueError(f"td3_target needs (K, B) target values, got {tuple(next_q.shape)}")
    return ddpg_target(rewards, terminated, next_q.min(0).values, gamma)


class Learner(ddpg.Learner):
    """DDPG's learner with K critics, a delayed actor and the smoothed, clipped target."""

    def __init__(self, cfg: Config, spaces: Spaces):
        super().__init__(cfg, spaces, n_critics=cfg.n_critics, policy_delay=cfg.policy_delay)
        self.cfg: Config = cfg

    @torch.no_grad()
    def target(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        mu_next = self.target_actor.unit(batch.next_obs)
        eps = self.cfg.target_noise * torch.randn(mu_next.shape, generator=generator)
        next_actions = target_policy_smoothing(mu_next, eps, self.cfg.target_noise_clip,
                                               -1.0, 1.0)
        return td3_target(batch.rewards, batch.terminated,
                          self.target_critic(batch.next_obs, next_actions), self.cfg.gamma)


def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    return train_offpolicy(cfg, run, progress, Learner)
