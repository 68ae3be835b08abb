"""Deep Q-learning on the grid world (Zhao, Section 8.4).

The off-policy algorithm the book prints as "Algorithm 8.3" of Section 8.4 minimises the squared
Bellman optimality error

    J(w) = E[(R + gamma max_a q_hat(S', a, w_T) - q_hat(S, A, w))^2]                  (eq. 8.37)

over mini-batches drawn uniformly from a replay buffer of a behaviour policy's transitions; the
gradient treats the target y_T = R + gamma max_a q_hat(S', a, w_T) as fixed (eq. 8.38) and the
target network w_T is set to w every C iterations. The network maps the row and column of a
state, scaled to [0, 1], to the five action values: the alternative the book names beside
Figure 8.11's (row, column, action) -> value network, which fitted far more slowly here
(docs/methods/rl-tabular-vfa.md). Adam's learning rate falls linearly from ``lr`` to
``lr_final`` (:func:`mlatlas.core.optim.linear_interpolate`), which quiets the mini-batch noise
that otherwise flips near-tied greedy actions.

A training step is one iteration: one mini-batch update of w.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mlatlas.core.config import ConfigError, require_at_least
from mlatlas.core.optim import linear_interpolate, set_lr
from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import seed_everything
from mlatlas.nn.layers import mlp
from mlatlas.rl.tabular.bellman import exact_values, optimal_values
from mlatlas.rl.tabular.common import GridConfig, finish, make_world, rmse
from mlatlas.rl.tabular.episodes import rollout, start_states
from mlatlas.rl.tabular.gridworld import (
    ACTIONS,
    GridWorld,
    greedy_policy,
    parse_start,
    uniform_policy,
)
from mlatlas.rl.tabular.plots import curves_figure, trajectory_figure


class QNetwork(nn.Module):
    """q_hat(s, ., w): the normalised (row, col) of s -> tanh hidden layers -> |A| action values,
    the two-input, five-output design the book names beside Figure 8.11's."""

    def __init__(self, world: GridWorld, hidden: int = 100, layers: int = 2):
        super().__init__()
        self.shape = world.shape
        self.net = mlp(2, (hidden,) * layers, len(ACTIONS), nn.Tanh, orthogonal=False)

    def reset_parameters(self, generator: torch.Generator) -> QNetwork:
        """PyTorch's default Linear init, drawn from the run's generator."""
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                bound = 1.0 / math.sqrt(layer.in_features)
                nn.init.uniform_(layer.weight, -bound, bound, generator=generator)
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
        return self

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """States (N,) -> q_hat(s, a, w) for every action, (N, |A|)."""
        n_rows, n_cols = self.shape
        row, col = s // n_cols, s % n_cols
        inputs = torch.stack([row / max(n_rows - 1, 1), col / max(n_cols - 1, 1)], dim=1)
        return self.net(inputs.float())


def dqn_loss(net: nn.Module, target_net: nn.Module, batch: dict, gamma: float) -> torch.Tensor:
    """Mean of (y_T - q_hat(s, a, w))^2 over a mini-batch, y_T = r + gamma max_a q_hat(s', a, w_T)
    (0 in place of the max after a terminal s'); no gradient flows through y_T (eq. 8.38)."""
    with torch.no_grad():
        q_next = target_net(batch["s_next"]).max(dim=1).values
        y_target = batch["r"].float() + gamma * torch.where(
            batch["done"], torch.zeros_like(q_next), q_next)
    q = net(batch["s"]).gather(1, batch["a"][:, None]).squeeze(1)
    return (y_target - q).square().mean()


def collect_replay_buffer(world: GridWorld, pi_b: torch.Tensor, s0: torch.Tensor, length: int,
                          generator: torch.Generator) -> dict[str, torch.Tensor]:
    """B = {(s, a, r, s')}: every transition of len(s0) behaviour episodes of ``length`` steps,
    run side by side; also keeps the episodes' states (T+1, B) for the trajectory figure."""
    model = world.model
    episodes = rollout(model, pi_b, s0, length, generator)
    alive = episodes.alive.flatten()
    s_next = episodes.states[1:].flatten()[alive]
    return {"s": episodes.states[:-1].flatten()[alive], "a": episodes.actions.flatten()[alive],
            "r": episodes.rewards.flatten()[alive], "s_next": s_next,
            "done": model.terminal[s_next], "states": episodes.states}


@dataclass
class DQNConfig(GridConfig):
    METHOD: ClassVar[str] = "dqn_tabular"

    r_boundary: float = -10.0
    """Reward for trying to leave the grid (Figure 8.11 uses -10)."""
    r_forbidden: float = -10.0
    """Reward for entering or staying in a forbidden cell (Figure 8.11 uses -10)."""
    episode_length: int = 1000
    """Steps of each behaviour episode; its transitions fill the replay buffer (Figure 8.11:
    one episode of 1,000 steps)."""
    num_envs: int = 1
    """Behaviour episodes, run side by side; the buffer holds num_envs * episode_length samples."""
    start: str = "random"
    """Where the behaviour episodes start: 'random' or a 1-based 'row,col' cell."""
    batch_size: int = 100
    """Mini-batch drawn uniformly from the buffer each iteration (Figure 8.11: 100)."""
    hidden: int = 100
    """Units of each hidden layer (Figure 8.11: 100)."""
    layers: int = 2
    """Hidden layers (Figure 8.11 has one; one did not fit in our measurements, see the docs)."""
    lr: float = 0.01
    """Adam's learning rate."""
    lr_final: float = 0.001
    """Adam's learning rate after the decay; the decay quiets the mini-batch noise that otherwise
    flips near-tied greedy actions."""
    decay_start: int = 2500
    """Iteration at which lr starts decaying linearly to lr_final."""
    decay_steps: int = 2500
    """Iterations the linear decay takes (0: a step from lr to lr_final)."""
    target_every: int = 50
    """C: copy the main network into the target network every C iterations."""
    steps: int = 5000
    """Iterations (mini-batch updates)."""
    log_every: int = 10
    """Write a row of metrics.csv every this many iterations."""
    ckpt_every: int = 250
    """Write checkpoint.safetensors every this many iterations (and always at the end)."""

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "episode_length", "num_envs", "batch_size", "hidden", "layers",
                         "target_every")
        if not (self.lr > 0 and self.lr_final > 0):
            raise ConfigError(f"--lr and --lr-final must be positive, got {self.lr} and "
                              f"{self.lr_final}")
        if self.decay_start < 0 or self.decay_steps < 0:
            raise ConfigError("--decay-start and --decay-steps must be non-negative")

    def check_data(self) -> None:
        super().check_data()
        parse_start(self.start, make_world(self))


def learning_rate(cfg: DQNConfig, k: int) -> float:
    """Adam's step size at iteration k: lr until decay_start, then linear to lr_final over
    decay_steps, lr_final after. A function of k alone, so a run resumed with more steps follows
    the same schedule as an uninterrupted one."""
    return linear_interpolate(cfg.lr, cfg.lr_final, k, cfg.decay_start, cfg.decay_steps)


def train_dqn_tabular(cfg: DQNConfig, run: Run | None = None,
                      progress: bool | None = None) -> Run:
    """Deep Q-learning, off-policy, from one uniform behaviour episode (Figure 8.11)."""
    run = run or Run.create(cfg.METHOD, cfg)
    generator = seed_everything(cfg.seed)
    world = make_world(cfg)
    model = world.model
    v_star = optimal_values(model, cfg.gamma)
    s0 = start_states(parse_start(cfg.start, world), cfg.num_envs, model.n_states, generator)
    buffer = collect_replay_buffer(world, uniform_policy(model.n_states), s0,
                                   cfg.episode_length, generator)
    net = QNetwork(world, cfg.hidden, cfg.layers).reset_parameters(generator)
    target_net = QNetwork(world, cfg.hidden, cfg.layers)
    target_net.load_state_dict(net.state_dict())
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    all_states = torch.arange(model.n_states)
    size = buffer["s"].shape[0]

    def step(k: int) -> dict[str, float | torch.Tensor]:
        index = torch.randint(size, (cfg.batch_size,), generator=generator)
        set_lr(optimizer, learning_rate(cfg, k))
        loss = dqn_loss(net, target_net,
                        {key: buffer[key][index] for key in ("s", "a", "r", "s_next", "done")},
                        cfg.gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if k % cfg.target_every == 0:
            target_net.load_state_dict(net.state_dict())
        metrics = {"loss": loss.detach()}
        # Scoring the whole grid costs more than an update; do it only for the rows logged.
        if k % cfg.log_every == 0 or k == cfg.steps:
            with torch.no_grad():
                q = net(all_states).double()
            v_greedy = exact_values(model, greedy_policy(q), cfg.gamma)
            metrics.update(value_error=rmse(q.max(dim=1).values, v_star),
                           greedy_value_gap=(v_star - v_greedy).max().clamp(min=0))
        return metrics

    fit(run, step, total_steps=cfg.steps,
        objects={"model": net, "target": target_net, "optimizer": optimizer, "rng": generator,
                 "buffer": buffer},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress)
    with torch.no_grad():
        q = net(all_states).double()
    v_hat = q.max(dim=1).values
    pairs = torch.unique(buffer["s"] * model.n_actions + buffer["a"]).numel()
    finish(run, cfg, world, values=v_hat, policy=greedy_policy(q),
           title=f"deep Q-learning from {size} behaviour samples, greedy policy",
           extra={"eval/value_rmse_vs_optimal": rmse(v_hat, v_star).item(),
                  "train/buffer_size": size, "train/state_action_pairs_visited": pairs})
    paths = buffer["states"].T.tolist()
    run.save_figure(trajectory_figure(world, paths, f"behaviour episode, {size} steps"),
                    "trajectories.png")
    run.save_figure(curves_figure(run.metrics, ["loss", "value_error"], "step",
                                  "deep Q-learning"), "curves.png")
    return run
