"""Proximal policy optimisation with the clipped surrogate (Schulman et al. 2017).

With the probability ratio rho_t(theta) = pi_theta(a_t | s_t) / pi_theta_old(a_t | s_t) and GAE
advantages A_t (normalised per minibatch), PPO maximises

    L^CLIP(theta) = E_t[ min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t) ]

and fits the critic to the returns R_t = A_t + v_old(s_t), optionally with the value clipped
around its old prediction (as in the PPO2 baselines code):

    L^V = E_t[ max((v(s_t) - R_t)^2, (v_old + clip(v(s_t) - v_old, -eps_v, eps_v) - R_t)^2) ] / 2

The loss minimised is  -L^CLIP + c_1 L^V - c_2 H[pi_theta(. | s_t)], over ``epochs`` passes of
shuffled minibatches of each rollout; the learning rate and eps may decay linearly to 0.
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

__all__ = ["Config", "evaluate", "make_actor", "ppo_loss", "train"]


@dataclass
class Config(DeepRLConfig):
    METHOD: ClassVar[str] = "ppo"

    n_steps: int = 128
    """Rollout length per environment; a rollout has n_steps x num_envs transitions."""
    lam: float = 0.95
    """GAE lambda: 1 gives the discounted return minus v(s), 0 the one-step TD error."""
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
    anneal: bool = True
    """Decay the learning rate and eps linearly to 0 over the run."""
    batch_size: int = 256
    """Minibatch size of the optimisation epochs."""
    epochs: int = 10
    """Passes over each rollout."""
    clip_range: float = 0.2
    """eps of the clipped ratio."""
    clip_range_vf: float = 0.0
    """eps_v of the value clipping; 0 turns it off."""

    # Tuned per environment after rl-baselines3-zoo's hyperparams/ppo.yml; changed where
    # measured to solve faster here (docs/methods/rl-deep.md).
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "CartPole-v1": dict(num_envs=16, n_steps=32, batch_size=512, lam=0.8, gamma=0.98,
                            epochs=20, lr=2e-3, steps=100_000),
        "Acrobot-v1": dict(num_envs=16, n_steps=128, batch_size=512, lam=0.94, gamma=0.99,
                           epochs=10, lr=1e-3, normalize_obs=True, normalize_reward=True,
                           steps=200_000),
        # gSDE redrawn every 4 steps, gamma 0.9 and lambda 0.95 as rl-zoo; its 4 x 1024
        # rollouts in minibatches of 64 (640 gradient steps a rollout) became 16 x 128 in
        # minibatches of 512 (40) with a constant lr of 2e-3, both normalisations and log sigma
        # -1: ~60k steps (seeds 0-5), as many as rl-zoo's setting needs here, in 1/8 of the
        # gradient steps. Without gSDE PPO needed ~145k.
        "Pendulum-v1": dict(num_envs=16, n_steps=128, batch_size=512, lam=0.95, gamma=0.9,
                            epochs=10, lr=2e-3, anneal=False, sde=True, sde_sample_freq=4,
                            log_std_init=-1.0, normalize_obs=True, normalize_reward=True,
                            steps=200_000),
        "MountainCarContinuous-v0": dict(num_envs=1, n_steps=8, batch_size=256, lam=0.9,
                                         gamma=0.9999, epochs=10, ent_coef=0.00429,
                                         lr=7.77e-5, clip_range=0.1, grad_clip=5.0,
                                         vf_coef=0.19, normalize_obs=True, steps=50_000),
    }

    def check(self) -> None:
        super().check()
        check_sde(self)
        require_at_least(self, 1, "n_steps", "batch_size", "epochs")
        require_unit(self, "lam")
        if self.clip_range <= 0 or self.clip_range_vf < 0:
            raise ConfigError("--clip-range must be positive and --clip-range-vf non-negative")
        if self.grad_clip < 0:
            raise ConfigError(f"--grad-clip must be >= 0 (0 disables), got {self.grad_clip}")


def ppo_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
             values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
             entropy: torch.Tensor, clip_range: float, clip_range_vf: float = 0.0,
             vf_coef: float = 0.5, ent_coef: float = 0.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-L^CLIP + c_1 L^V - c_2 H for one minibatch of (N,) tensors, and its parts.

    ``clip_range_vf`` = 0 leaves the value unclipped. The parts returned are the policy and value
    losses, the entropy, the approximate KL E[(rho - 1) - log rho] (Schulman's k3 estimator) and
    the fraction of ratios outside [1 - eps, 1 + eps].
    """
    shapes = {t.shape for t in (log_probs, old_log_probs, advantages, values, old_values,
                                returns, entropy)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"ppo_loss needs (N,) tensors of one shape, got {sorted(shapes)}")
    log_ratio = log_probs - old_log_probs
    ratio = log_ratio.exp()
    surrogate = torch.min(ratio * advantages,
                          ratio.clamp(1.0 - clip_range, 1.0 + clip_range) * advantages)
    policy_loss = -surrogate.mean()
    value_error = (values - returns).square()
    if clip_range_vf > 0:
        clipped = old_values + (values - old_values).clamp(-clip_range_vf, clip_range_vf)
        value_error = torch.max(value_error, (clipped - returns).square())
    value_loss = 0.5 * value_error.mean()
    entropy_mean = entropy.mean()
    loss = policy_loss + vf_coef * value_loss - ent_coef * entropy_mean
    with torch.no_grad():
        parts = {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
                 "entropy": entropy_mean.detach(),
                 "approx_kl": ((ratio - 1.0) - log_ratio).mean(),
                 "clip_fraction": ((ratio - 1.0).abs() > clip_range).float().mean()}
    return loss, parts


def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    run, generator, interaction = prepare(cfg, run)
    actor, critic = actor_and_critic(cfg, interaction.spaces)
    params = [*actor.parameters(), *critic.parameters()]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, eps=1e-5, fused=True)
    batch = cfg.n_steps * cfg.num_envs
    updates = total_updates(cfg.steps, batch)
    minibatch = min(cfg.batch_size, batch)

    def update(k: int) -> dict[str, Any]:
        progress_done = (k - 1) / updates
        lr = linear_decay(cfg.lr, progress_done) if cfg.anneal else cfg.lr
        clip_range = (linear_decay(cfg.clip_range, progress_done) if cfg.anneal
                      else cfg.clip_range)
        set_lr(optimizer, lr)
        rollout = collect(interaction, actor, critic, cfg.n_steps, generator)
        advantages, returns = rollout.advantages(cfg.gamma, cfg.lam)
        flat = {"obs": rollout.obs.flatten(0, 1), "actions": rollout.actions.flatten(0, 1),
                "old_log_probs": rollout.log_probs.flatten(0, 1),
                "old_values": rollout.values.flatten(0, 1),
                "advantages": advantages.flatten(0, 1), "returns": returns.flatten(0, 1)}
        history = []
        for _ in range(cfg.epochs):
            order = torch.randperm(batch, generator=generator)
            for start in range(0, batch - minibatch + 1, minibatch):
                idx = order[start:start + minibatch]
                mb = {k: v[idx] for k, v in flat.items()}
                dist = actor.distribution(mb["obs"])
                loss, parts = ppo_loss(
                    actor.log_prob(dist, mb["actions"]), mb["old_log_probs"],
                    standardize(mb["advantages"]), critic(mb["obs"]), mb["old_values"],
                    mb["returns"], actor.entropy(dist), max(clip_range, 1e-8),
                    cfg.clip_range_vf, cfg.vf_coef, cfg.ent_coef)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
                optimizer.step()
                history.append(torch.stack(list(parts.values())))
        return dict(zip(parts, torch.stack(history).mean(0).tolist(), strict=True))

    agent = Agent(interaction, update, {"model": actor, "critic": critic,
                                        "optimizer": optimizer, "rng": generator},
                  actor.act, batch)
    return train_agent(cfg, run, agent, progress)

