"""REINFORCE: the Monte Carlo policy gradient (Williams 1992), with an optional learned baseline.

The policy gradient theorem gives grad J(theta) = E[ sum_t grad log pi_theta(a_t | s_t) G_t ]
with G_t = sum_{k>t} gamma^{k-t-1} r_k the return of the rest of the episode (Zhao eq. 9.32;
this is the deep form of the notes' Alg. 9.1). Subtracting a baseline b(s_t) leaves it unbiased
and lowers its variance; here b = v_w(s), fitted to G_t by least squares:

    L(theta) = -E_t[ (G_t - b(s_t)) log pi_theta(a_t | s_t) ],   L(w) = E_t[ (v_w(s_t) - G_t)^2 ]

G_t needs the episode's end, so an update uses only the steps of episodes that finished inside
the rollout (``complete_episodes``); the unfinished tail of each environment is discarded. An
episode cut by its time limit counts as ended: G_t is the return as played, with nothing
bootstrapped, which is what makes the estimate Monte Carlo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from mlatlas.core.config import require_at_least
from mlatlas.core.run import Run
from mlatlas.rl.deep.config import DeepRLConfig
from mlatlas.rl.deep.envs import Spaces
from mlatlas.rl.deep.evaluation import evaluate
from mlatlas.rl.deep.loop import Agent, prepare, train_agent
from mlatlas.rl.deep.policies import Policy, value_net
from mlatlas.rl.deep.rollout import collect, standardize
from mlatlas.rl.returns import discounted_returns

__all__ = ["Config", "complete_episodes", "evaluate", "reinforce_loss", "train"]


@dataclass
class Config(DeepRLConfig):
    METHOD: ClassVar[str] = "reinforce"

    lr: float = 1e-3
    """Learning rate (Adam), for the policy and the baseline."""
    # In environment steps, every 10 and 100 updates of the default 4000-step rollouts (the
    # docstrings are DeepRLConfig's).
    log_every: int = 40_000
    ckpt_every: int = 400_000
    n_steps: int = 500
    """Steps per environment in a rollout; only the episodes finished inside it are used."""
    baseline: bool = True
    """Subtract a learned state-value baseline b(s) = v_w(s) from the returns."""
    normalize_returns: bool = True
    """Standardise the weights G_t - b(s_t) of each batch (a common variance reduction)."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "CartPole-v1": dict(num_envs=8, n_steps=500, lr=3e-3, gamma=0.99, steps=500_000),
        "Acrobot-v1": dict(num_envs=8, n_steps=500, lr=3e-3, steps=500_000),
    }

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "n_steps")


def complete_episodes(dones: torch.Tensor) -> torch.Tensor:
    """(T, B) mask of the steps whose episode ends at or after them inside the rollout."""
    return dones.flip(0).cummax(0).values.flip(0)


def reinforce_loss(log_probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """-mean(w_t log pi(a_t | s_t)) for (N,) tensors; w_t = G_t or G_t - b(s_t)."""
    if log_probs.shape != weights.shape or log_probs.dim() != 1:
        raise ValueError(f"reinforce_loss needs two (N,) tensors, got "
                         f"{tuple(log_probs.shape)} and {tuple(weights.shape)}")
    return -(weights.detach() * log_probs).mean()


def make_actor(cfg: Config, spaces: Spaces) -> Policy:
    return Policy(spaces, cfg.hidden_sizes)


def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    run, generator, interaction = prepare(cfg, run)
    actor = make_actor(cfg, interaction.spaces)
    objects: dict[str, Any] = {"model": actor, "rng": generator}
    params = list(actor.parameters())
    baseline = None
    if cfg.baseline:
        baseline = value_net(interaction.spaces, cfg.hidden_sizes)
        objects["baseline"] = baseline
        params += list(baseline.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.lr, fused=True)
    objects["optimizer"] = optimizer

    def update(k: int) -> dict[str, Any]:
        rollout = collect(interaction, actor, None, cfg.n_steps, generator)
        mask = complete_episodes(rollout.dones)
        if not mask.any():
            return {}  # no episode finished in this rollout: nothing to learn from
        returns = discounted_returns(rollout.rewards, cfg.gamma, rollout.dones)[mask]
        obs, actions = rollout.obs[mask], rollout.actions[mask]
        loss = torch.zeros(())
        weights = returns
        parts: dict[str, Any] = {"return_mc": returns.mean()}
        if baseline is not None:
            values = baseline(obs)
            value_loss = (values - returns).square().mean()
            weights = returns - values.detach()
            loss = loss + value_loss
            parts["value_loss"] = value_loss.detach()
        if cfg.normalize_returns:
            weights = standardize(weights)
        policy_loss = reinforce_loss(actor.log_prob(actor.distribution(obs), actions), weights)
        optimizer.zero_grad(set_to_none=True)
        (loss + policy_loss).backward()
        optimizer.step()
        return {**parts, "policy_loss": policy_loss.detach(), "used": float(mask.float().mean())}

    agent = Agent(interaction, update, objects, actor.act, cfg.n_steps * cfg.num_envs)
    return train_agent(cfg, run, agent, progress)
