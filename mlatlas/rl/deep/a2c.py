"""Advantage actor-critic, the synchronous form of A3C (Mnih et al. 2016).

B environments each take n steps with pi_theta; the advantages A_t are GAE(lambda) estimates
(lambda = 1 gives A3C's n-step return minus v(s_t)), the returns R_t = A_t + v(s_t), and one
gradient step on

    L(theta, w) = -E_t[ A_t log pi_theta(a_t | s_t) ] + c_1 E_t[ (v_w(s_t) - R_t)^2 ]
                  - c_2 E_t[ H(pi_theta(. | s_t)) ]

follows each rollout (RMSprop, as in the paper). This is the deep form of the notes' advantage
actor-critic (Zhao Alg. 10.2), with a batch of n-step advantages in place of one TD error.
With ``sde`` a continuous policy explores by gSDE (:mod:`~mlatlas.rl.deep.gsde`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from mlatlas.core.config import ConfigError, require_at_least, require_unit
from mlatlas.core.optim import linear_decay, set_lr
from mlatlas.core.run import Run
from mlatlas.rl.deep.config import DeepRLConfig, check_sde
from mlatlas.rl.deep.evaluation import evaluate
from mlatlas.rl.deep.loop import Agent, prepare, total_updates, train_agent
from mlatlas.rl.deep.rollout import actor_and_critic, collect, make_actor, standardize

__all__ = ["Config", "a2c_loss", "evaluate", "make_actor", "train"]


@dataclass
class Config(DeepRLConfig):
    METHOD: ClassVar[str] = "a2c"

    lr: float = 7e-4
    """Learning rate (RMSprop)."""
    # In environment steps, about every 10 and 100 updates of the presets' 80-step rollouts
    # (the docstrings are DeepRLConfig's).
    log_every: int = 1_000
    ckpt_every: int = 10_000
    n_steps: int = 5
    """Steps per environment between updates."""
    lam: float = 1.0
    """GAE lambda; 1 is A3C's n-step return."""
    log_std_init: float = 0.0
    """Initial log sigma of a Gaussian policy (continuous actions); with --sde, of every entry
    of gSDE's (features x actions) matrix log sigma."""
    sde: bool = False
    """Explore by generalised state-dependent exploration (gSDE; continuous actions): the noise
    z(s) theta_eps of the policy's features and a random matrix held fixed between draws,
    instead of fresh Gaussian noise at every step."""
    sde_sample_freq: int = -1
    """Steps between draws of gSDE's exploration matrix theta_eps; -1 draws it once at the
    start of each rollout."""
    ent_coef: float = 0.0
    """c_2, weight of the entropy bonus."""
    vf_coef: float = 0.5
    """c_1, weight of the value loss."""
    grad_clip: float = 0.5
    """Clip the global gradient norm to this (0 disables)."""
    anneal: bool = False
    """Decay the learning rate linearly to 0 over the run."""
    normalize_advantages: bool = False
    """Normalise the advantages of each rollout to zero mean and unit std."""

    # After rl-baselines3-zoo's hyperparams/a2c.yml; changed where measured to solve faster
    # here (docs/methods/rl-deep.md).
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "CartPole-v1": dict(num_envs=16, lr=2e-3, steps=500_000),
        # Acrobot pays -1 a step: without reward scaling the critic's targets (~ -100) swamp
        # the policy gradient and A2C stayed at -500 for 300k steps; scaled, it solves in ~34k
        # at rl-zoo's lr 7e-4 and in ~18k at 1.5e-3 (seeds 0-5; 2e-3 was less stable).
        "Acrobot-v1": dict(num_envs=16, lr=1.5e-3, normalize_obs=True, normalize_reward=True,
                           steps=500_000),
        # gSDE as rl-zoo (drawn once a rollout): seed 0 solved in 421k steps, and not in 1M
        # with plain Gaussian noise.
        "Pendulum-v1": dict(num_envs=8, n_steps=8, gamma=0.9, lam=0.9, lr=7e-4,
                            normalize_obs=True, normalize_reward=True, anneal=True, sde=True,
                            log_std_init=-2.0, steps=1_000_000),
        "MountainCarContinuous-v0": dict(num_envs=4, normalize_obs=True, steps=100_000),
    }

    def check(self) -> None:
        super().check()
        check_sde(self)
        require_at_least(self, 1, "n_steps")
        require_unit(self, "lam")
        if self.grad_clip < 0:
            raise ConfigError(f"--grad-clip must be >= 0 (0 disables), got {self.grad_clip}")


def a2c_loss(log_probs: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
             returns: torch.Tensor, entropy: torch.Tensor, vf_coef: float = 0.5,
             ent_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L(theta, w) of the module docstring for (N,) tensors, and its three parts."""
    shapes = {t.shape for t in (log_probs, advantages, values, returns, entropy)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"a2c_loss needs (N,) tensors of one shape, got {sorted(shapes)}")
    policy_loss = -(advantages.detach() * log_probs).mean()
    value_loss = (values - returns.detach()).square().mean()
    entropy_mean = entropy.mean()
    loss = policy_loss + vf_coef * value_loss - ent_coef * entropy_mean
    return loss, {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
                  "entropy": entropy_mean.detach()}


def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    run, generator, interaction = prepare(cfg, run)
    actor, critic = actor_and_critic(cfg, interaction.spaces)
    params = [*actor.parameters(), *critic.parameters()]
    optimizer = torch.optim.RMSprop(params, lr=cfg.lr, alpha=0.99, eps=1e-5, foreach=True)
    batch = cfg.n_steps * cfg.num_envs
    updates = total_updates(cfg.steps, batch)

    def update(k: int) -> dict[str, Any]:
        if cfg.anneal:
            set_lr(optimizer, linear_decay(cfg.lr, (k - 1) / updates))
        rollout = collect(interaction, actor, critic, cfg.n_steps, generator)
        advantages, returns = rollout.advantages(cfg.gamma, cfg.lam)
        advantages, returns = advantages.flatten(0, 1), returns.flatten(0, 1)
        if cfg.normalize_advantages:
            advantages = standardize(advantages)
        obs = rollout.obs.flatten(0, 1)
        # The rollout's values were computed without a graph; the critic is run again for one.
        dist = actor.distribution(obs)
        loss, parts = a2c_loss(actor.log_prob(dist, rollout.actions.flatten(0, 1)), advantages,
                               critic(obs), returns, actor.entropy(dist), cfg.vf_coef,
                               cfg.ent_coef)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
        optimizer.step()
        return parts

    agent = Agent(interaction, update, {"model": actor, "critic": critic,
                                        "optimizer": optimizer, "rng": generator},
                  actor.act, batch)
    return train_agent(cfg, run, agent, progress)
