"""Temporal-difference learning (Zhao, Chapter 7): TD(0), Sarsa, Expected Sarsa, n-step Sarsa and
Q-learning on- and off-policy.

Every algorithm of the chapter moves an estimate towards a TD target with the update (eq. 7.20)

    q_{t+1}(s_t, a_t) = q_t(s_t, a_t) - alpha_t(s_t, a_t) [q_t(s_t, a_t) - qbar_t],

leaving every other entry unchanged; the TD error is delta_t = q_t(s_t, a_t) - qbar_t. The targets
(Table 7.2):

    TD(0), state values (eq. 7.1):    vbar_t = r_{t+1} + gamma v_t(s_{t+1})
    Sarsa (eq. 7.12):                 qbar_t = r_{t+1} + gamma q_t(s_{t+1}, a_{t+1})
    Expected Sarsa (Box 7.4):         qbar_t = r_{t+1} + gamma sum_a pi_t(a|s_{t+1}) q_t(s_{t+1}, a)
    n-step Sarsa (eq. 7.17):          qbar_t = r_{t+1} + gamma r_{t+2} + ... + gamma^{n-1} r_{t+n}
                                               + gamma^n q_t(s_{t+n}, a_{t+n})
    Q-learning (eq. 7.18):            qbar_t = r_{t+1} + gamma max_a q_t(s_{t+1}, a)

TD(0), Sarsa and its variants solve the Bellman equation of the policy that generates the data
(eqs. 7.4, 7.13, 7.15); Q-learning solves the Bellman optimality equation (eq. 7.19), which is why
it may learn from any behaviour policy. An episode ending in a terminal state contributes no
bootstrap term (v = q = 0 there).

Control follows the algorithm boxes: Sarsa, Expected Sarsa and n-step Sarsa as Algorithm 7.1 and
Q-learning on-policy as Algorithm 7.2 (after each update the policy at s_t becomes epsilon-greedy
in q_{t+1}; the first policy is uniform, as in Fig. 7.2's setup), Q-learning off-policy as
Algorithm 7.3 (a fixed behaviour policy generates the data; the target policy is greedy).

Batches: ``num_envs`` episodes run side by side and each time step is one batched update of the
shared table; corrections that land on the same entry in one step are averaged
(:func:`~mlatlas.rl.tabular.episodes.scatter_mean_update`), so alpha keeps its meaning and
``num_envs=1`` is the book's single stream exactly. A training step of the path-finding methods is
one episode per stream; of TD(0) one batch of fixed-length episodes; of off-policy Q-learning one
segment of the behaviour policy's long episode.

Metrics (metrics.csv): ``td_error`` mean |delta_t| of the updates; TD(0) and off-policy
Q-learning: ``value_error_max`` / ``value_error_rms``, the max / root-mean-square over states of
v_t(s) - v_pi(s) (TD(0)) or max_a q_t(s, a) - v*(s) (Q-learning, Fig. 7.4f), the latter also
``greedy_value_gap`` max_s v*(s) - v_greedy(s) by exact evaluation; path finding: ``return`` the
undiscounted total reward of an episode and ``episode_length`` its steps (Fig. 7.2's right-hand
panels, averaged over streams and logged episodes), ``start_value_gap`` v*(s_0) - v_greedy(s_0)
(0 when the greedy path from the start is optimal) and ``epsilon``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch

from mlatlas.core.config import ConfigError, require_at_least, require_unit
from mlatlas.core.optim import exponential_decay
from mlatlas.core.plots import metric_curves
from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import seed_everything
from mlatlas.rl.tabular.bellman import evaluate_closed_form, exact_values, optimal_values
from mlatlas.rl.tabular.common import (
    OPTIMAL_TOL,
    GridConfig,
    finish,
    greedy_value_gap,
    make_world,
)
from mlatlas.rl.tabular.episodes import scatter_mean_update
from mlatlas.rl.tabular.gridworld import (
    GridWorld,
    TabularModel,
    epsilon_greedy_policy,
    greedy_path,
    greedy_policy,
    parse_policy,
    sample_actions,
    uniform_policy,
)
from mlatlas.rl.tabular.plots import trajectory_figure

# TD targets and the update -----------------------------------------------------------------
# Shapes: r (B,), the next state's values (B,) or rows (B, A); ``terminated`` (B,) bool marks a
# transition into a terminal state, whose value is zero.


def _bootstrap(value: torch.Tensor, terminated: torch.Tensor | None) -> torch.Tensor:
    return value if terminated is None else torch.where(terminated, torch.zeros_like(value), value)


def td_target(r: torch.Tensor, v_next: torch.Tensor, gamma: float,
              terminated: torch.Tensor | None = None) -> torch.Tensor:
    """vbar_t = r_{t+1} + gamma v_t(s_{t+1}) (eq. 7.6), the TD target of state values."""
    return r + gamma * _bootstrap(v_next, terminated)


def sarsa_target(r: torch.Tensor, q_next: torch.Tensor, gamma: float,
                 terminated: torch.Tensor | None = None) -> torch.Tensor:
    """qbar_t = r_{t+1} + gamma q_t(s_{t+1}, a_{t+1}) (eq. 7.12); ``q_next`` = q(s', a')."""
    return r + gamma * _bootstrap(q_next, terminated)


def expected_sarsa_target(r: torch.Tensor, q_next_row: torch.Tensor, pi_next_row: torch.Tensor,
                          gamma: float, terminated: torch.Tensor | None = None) -> torch.Tensor:
    """qbar_t = r_{t+1} + gamma sum_a pi_t(a|s_{t+1}) q_t(s_{t+1}, a) (Box 7.4); rows (B, A)."""
    return r + gamma * _bootstrap((pi_next_row * q_next_row).sum(dim=-1), terminated)


def q_learning_target(r: torch.Tensor, q_next_row: torch.Tensor, gamma: float,
                      terminated: torch.Tensor | None = None) -> torch.Tensor:
    """qbar_t = r_{t+1} + gamma max_a q_t(s_{t+1}, a) (eq. 7.18); ``q_next_row`` (B, A)."""
    return r + gamma * _bootstrap(q_next_row.max(dim=-1).values, terminated)


def n_step_target(rewards: torch.Tensor, q_boot: torch.Tensor, gamma: float,
                  bootstrap: torch.Tensor) -> torch.Tensor:
    """qbar_t = r_{t+1} + ... + gamma^{n-1} r_{t+n} + gamma^n q_t(s_{t+n}, a_{t+n}) (eq. 7.17).

    ``rewards`` (n, B) are r_{t+1..t+n}, zero after an episode's end; ``q_boot`` (B,) is
    q(s_{t+n}, a_{t+n}); ``bootstrap`` (B,) is False where the episode terminated within the n
    steps (the return is then the plain discounted sum, as in Monte Carlo).
    """
    n = rewards.shape[0]
    discounts = gamma ** torch.arange(n, dtype=rewards.dtype)
    g = (discounts[:, None] * rewards).sum(dim=0)
    return g + gamma ** n * torch.where(bootstrap, q_boot, torch.zeros_like(q_boot))


def td_update(table: torch.Tensor, index: tuple[torch.Tensor, ...], target: torch.Tensor,
              alpha: float | torch.Tensor) -> torch.Tensor:
    """table[index] <- table[index] - alpha [table[index] - target] (eq. 7.20), in place.

    Entries hit by several samples of the batch move by alpha times their mean correction.
    ``alpha`` is a number or a tensor shaped like ``table`` (per-entry step sizes). Returns the
    TD errors delta = table[index] - target before the update (the book's sign, eq. 7.6).
    """
    delta = table[index] - target
    scatter_mean_update(table, index, -delta, alpha)
    return delta


def step_sizes(alpha: float, visits: torch.Tensor, exponent: float) -> torch.Tensor:
    """alpha_t(s) = alpha / n_t(s)^exponent for n_t(s) updates of s so far (counting this one).

    Exponent 0 is a constant step; any exponent in (1/2, 1] meets the Robbins-Monro conditions
    sum_t alpha_t = inf, sum_t alpha_t^2 < inf of Theorem 7.1.
    """
    return alpha * visits.clamp(min=1).to(torch.float64) ** -exponent


def decayed_epsilon(epsilon: float, decay: float, k: int) -> float:
    """epsilon_k = epsilon * decay^(k - 1) for episode k = 1, 2, ... (Section 7.2.2's remedy for
    the late detours of a constant epsilon; decay 1 keeps it constant)."""
    return exponential_decay(epsilon, decay, k - 1)


# Shared configuration ------------------------------------------------------------------------


def _start_state(cfg, world: GridWorld) -> int:
    n_rows, n_cols = world.shape
    if not (1 <= cfg.start_row <= n_rows and 1 <= cfg.start_col <= n_cols):
        raise ConfigError(f"start cell ({cfg.start_row},{cfg.start_col}) is outside the "
                          f"{n_rows}x{n_cols} grid")
    s0 = world.state(cfg.start_row, cfg.start_col)
    if world.model.terminal[s0]:
        raise ConfigError(f"start cell ({cfg.start_row},{cfg.start_col}) is the target, where "
                          "episodes end at once; pick another --start-row/--start-col")
    return s0


def _initial_q(model: TabularModel, q0: float) -> torch.Tensor:
    """q0 everywhere except in terminal states, whose values are 0 by definition."""
    q = torch.full((model.n_states, model.n_actions), float(q0), dtype=torch.float64)
    return q.masked_fill_(model.terminal[:, None], 0.0)


# TD(0): state values of a given policy (Section 7.1) -------------------------------------------


@dataclass
class TD0Config(GridConfig):
    METHOD: ClassVar[str] = "td0"

    policy: str = "uniform"
    """The policy to evaluate: 'uniform', or one letter (u r d l s) per cell with rows separated
    by '/'."""
    alpha: float = 1.0
    """Learning rate alpha, the first step at each state."""
    alpha_exponent: float = 0.6
    """alpha_t(s) = alpha / n_t(s)^exponent, n_t(s) the updates of s so far: 0 keeps alpha
    constant, (0.5, 1] meets the conditions of Theorem 7.1."""
    v0: float = 0.0
    """Initial guess v_0(s) for every non-terminal state."""
    num_envs: int = 250
    """Episodes run side by side; each time step is one batched update, averaging the samples
    that share a state."""
    episode_length: int = 100
    """Time steps per episode; every episode starts in a uniformly drawn non-terminal cell, so a
    deterministic policy is evaluated at every state too."""
    steps: int = 50
    """Batches of num_envs episodes (each batch is one training step)."""
    log_every: int = 1
    """Write a row of metrics.csv every this many batches."""
    ckpt_every: int = 500
    """Write checkpoint.safetensors every this many batches (and always at the end)."""

    def check(self) -> None:
        super().check()
        require_unit(self, "alpha", low_open=True)
        if self.alpha_exponent < 0:
            raise ConfigError(f"--alpha-exponent must be >= 0, got {self.alpha_exponent}")
        require_at_least(self, 1, "num_envs", "episode_length")

    def check_data(self) -> None:
        super().check_data()
        parse_policy(self.policy, make_world(self))


def train_td0(cfg: TD0Config, run: Run | None = None, progress: bool | None = None) -> Run:
    run = run or Run.create(cfg.METHOD, cfg)
    generator = seed_everything(cfg.seed)
    world = make_world(cfg)
    model = world.model
    pi = parse_policy(cfg.policy, world)
    v_pi = evaluate_closed_form(model, pi, cfg.gamma)
    starts = torch.nonzero(~model.terminal).squeeze(1)
    tables = {"v": _initial_q(model, cfg.v0)[:, 0].clone()}
    # n_t(s), the updates of each state so far (the step sizes depend on it), and the samples.
    counts = {"visits": torch.zeros(model.n_states, dtype=torch.int64),
              "transitions": torch.zeros((), dtype=torch.int64)}

    episodic = bool(model.terminal.any())

    def step(k: int) -> dict[str, float]:
        v, visits = tables["v"], counts["visits"]
        s = starts[torch.randint(len(starts), (cfg.num_envs,), generator=generator)]
        deltas = []
        for _ in range(cfg.episode_length):
            a = sample_actions(pi, s, generator)
            s_next, r, terminated = model.step(s, a)
            # n_t(s) counts batched updates: samples of s averaged into one update count once
            # (a repeated index writes the same value).
            visits[s] += 1
            alpha = step_sizes(cfg.alpha, visits, cfg.alpha_exponent)
            vbar = td_target(r, v[s_next], cfg.gamma, terminated if episodic else None)
            deltas.append(td_update(v, (s,), vbar, alpha))
            s = s_next
            if episodic and terminated.any():
                s = s[~terminated]
                if s.numel() == 0:
                    break
        delta = torch.cat(deltas)
        counts["transitions"] += delta.numel()
        error = v - v_pi
        return {"td_error": delta.abs().mean(), "value_error_max": error.abs().max(),
                "value_error_rms": error.square().mean().sqrt()}

    fit(run, step, total_steps=cfg.steps,
        objects={"model": tables, "counts": counts, "rng": generator},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress)
    v = tables["v"]
    error = v - v_pi
    finish(run, cfg, world, values=v, policy=pi, title=f"TD(0) estimate of v_pi, {cfg.policy!r}",
           extra={"eval/value_error_max": error.abs().max().item(),
                  "eval/value_error_rms": error.square().mean().sqrt().item(),
                  "train/transitions": int(counts["transitions"])}, score=False)
    return run


# Path finding with Sarsa, Expected Sarsa, n-step Sarsa, Q-learning (Sections 7.2-7.4) ----------


def greedy_start_value(model: TabularModel, q: torch.Tensor, s0: int, gamma: float) -> float:
    """v(s0) of the greedy policy of q, exactly, from its path: a deterministic policy either
    reaches a terminal state or enters a loop, whose return sums as a geometric series."""
    path = greedy_path(model, q, s0, model.n_states)
    s = torch.tensor(path[:-1], dtype=torch.int64)
    r = model.reward[s, q[s].argmax(dim=1)].tolist()
    if model.terminal[path[-1]]:
        return sum(gamma ** i * r_i for i, r_i in enumerate(r))
    j = path.index(path[-1])  # the loop returns to path[j]
    prefix = sum(gamma ** i * r_i for i, r_i in enumerate(r[:j]))
    cycle = sum(gamma ** i * r_i for i, r_i in enumerate(r[j:]))
    return prefix + gamma ** j * cycle / (1 - gamma ** (len(r) - j))


@dataclass
class SarsaConfig(GridConfig):
    """Sarsa, Algorithm 7.1, on the path-finding task of Fig. 7.2: episodes start in one
    cell and end at the target; find an optimal path."""

    METHOD: ClassVar[str] = "sarsa"

    r_boundary: float = -10.0
    """Reward for trying to leave the grid (Fig. 7.2: -10)."""
    r_forbidden: float = -10.0
    """Reward for entering or staying in a forbidden cell (Fig. 7.2: -10)."""
    r_target: float = 0.0
    """Reward for entering the target (Fig. 7.2: 0)."""
    r_other: float = -1.0
    """Reward for any other move (Fig. 7.2: -1, so shorter paths are better)."""
    terminal_target: bool = True
    """End episodes at the target (the chapter's path-finding task)."""
    alpha: float = 0.1
    """Learning rate alpha, constant (Fig. 7.2: 0.1)."""
    epsilon: float = 0.1
    """Exploration of the epsilon-greedy policy (Fig. 7.2: 0.1)."""
    epsilon_decay: float = 1.0
    """Multiply epsilon by this after every episode, the remedy Section 7.2.2 suggests for the
    late detours of a constant epsilon; 1 keeps it constant as in Figs. 7.2 and 7.3."""
    q0: float = 0.0
    """Initial guess q_0(s, a) at every non-terminal state."""
    start_row: int = 1
    """Row of the start cell, from 1 (the book: the top-left cell)."""
    start_col: int = 1
    """Column of the start cell, from 1."""
    num_envs: int = 1
    """Episodes run side by side from the start cell, each time step one batched update of the
    shared q table; 1 is the book's algorithm."""
    max_episode_length: int = 2000
    """Cut an episode that has not reached the target after this many steps."""
    steps: int = 500
    """Episodes (per stream) to run; Fig. 7.2 shows 500."""
    log_every: int = 5
    """Write a row of metrics.csv (means over the episodes since the last row) every this many
    episodes."""
    ckpt_every: int = 500
    """Write checkpoint.safetensors every this many episodes (and always at the end)."""

    def check(self) -> None:
        super().check()
        _check_path_finding(self)

    def check_data(self) -> None:
        super().check_data()
        _start_state(self, make_world(self))


@dataclass
class ExpectedSarsaConfig(GridConfig):
    """Expected Sarsa (Box 7.4) in Algorithm 7.1's loop, on the path-finding task of
    Fig. 7.2."""

    METHOD: ClassVar[str] = "expected_sarsa"

    r_boundary: float = -10.0
    """Reward for trying to leave the grid (Fig. 7.2: -10)."""
    r_forbidden: float = -10.0
    """Reward for entering or staying in a forbidden cell (Fig. 7.2: -10)."""
    r_target: float = 0.0
    """Reward for entering the target (Fig. 7.2: 0)."""
    r_other: float = -1.0
    """Reward for any other move (Fig. 7.2: -1, so shorter paths are better)."""
    terminal_target: bool = True
    """End episodes at the target (the chapter's path-finding task)."""
    alpha: float = 0.1
    """Learning rate alpha, constant (Fig. 7.2: 0.1)."""
    epsilon: float = 0.1
    """Exploration of the epsilon-greedy policy (Fig. 7.2: 0.1)."""
    epsilon_decay: float = 1.0
    """Multiply epsilon by this after every episode, the remedy Section 7.2.2 suggests for the
    late detours of a constant epsilon; 1 keeps it constant as in Figs. 7.2 and 7.3."""
    q0: float = 0.0
    """Initial guess q_0(s, a) at every non-terminal state."""
    start_row: int = 1
    """Row of the start cell, from 1 (the book: the top-left cell)."""
    start_col: int = 1
    """Column of the start cell, from 1."""
    num_envs: int = 1
    """Episodes run side by side from the start cell, each time step one batched update of the
    shared q table; 1 is the book's algorithm."""
    max_episode_length: int = 2000
    """Cut an episode that has not reached the target after this many steps."""
    steps: int = 500
    """Episodes (per stream) to run; Fig. 7.2 shows 500."""
    log_every: int = 5
    """Write a row of metrics.csv (means over the episodes since the last row) every this many
    episodes."""
    ckpt_every: int = 500
    """Write checkpoint.safetensors every this many episodes (and always at the end)."""

    def check(self) -> None:
        super().check()
        _check_path_finding(self)

    def check_data(self) -> None:
        super().check_data()
        _start_state(self, make_world(self))


@dataclass
class QLearningConfig(GridConfig):
    """Q-learning on-policy, Algorithm 7.2, on the path-finding task of Fig. 7.3."""

    METHOD: ClassVar[str] = "q_learning"

    r_boundary: float = -10.0
    """Reward for trying to leave the grid (Fig. 7.2: -10)."""
    r_forbidden: float = -10.0
    """Reward for entering or staying in a forbidden cell (Fig. 7.2: -10)."""
    r_target: float = 0.0
    """Reward for entering the target (Fig. 7.2: 0)."""
    r_other: float = -1.0
    """Reward for any other move (Fig. 7.2: -1, so shorter paths are better)."""
    terminal_target: bool = True
    """End episodes at the target (the chapter's path-finding task)."""
    alpha: float = 0.1
    """Learning rate alpha, constant (Fig. 7.2: 0.1)."""
    epsilon: float = 0.1
    """Exploration of the epsilon-greedy policy (Fig. 7.2: 0.1)."""
    epsilon_decay: float = 1.0
    """Multiply epsilon by this after every episode, the remedy Section 7.2.2 suggests for the
    late detours of a constant epsilon; 1 keeps it constant as in Figs. 7.2 and 7.3."""
    q0: float = 0.0
    """Initial guess q_0(s, a) at every non-terminal state."""
    start_row: int = 1
    """Row of the start cell, from 1 (the book: the top-left cell)."""
    start_col: int = 1
    """Column of the start cell, from 1."""
    num_envs: int = 1
    """Episodes run side by side from the start cell, each time step one batched update of the
    shared q table; 1 is the book's algorithm."""
    max_episode_length: int = 2000
    """Cut an episode that has not reached the target after this many steps."""
    steps: int = 500
    """Episodes (per stream) to run; Fig. 7.2 shows 500."""
    log_every: int = 5
    """Write a row of metrics.csv (means over the episodes since the last row) every this many
    episodes."""
    ckpt_every: int = 500
    """Write checkpoint.safetensors every this many episodes (and always at the end)."""

    def check(self) -> None:
        super().check()
        _check_path_finding(self)

    def check_data(self) -> None:
        super().check_data()
        _start_state(self, make_world(self))


@dataclass
class NStepSarsaConfig(GridConfig):
    """n-step Sarsa (Section 7.3) in Algorithm 7.1's loop, on the path-finding task of
    Fig. 7.2."""

    METHOD: ClassVar[str] = "n_step_sarsa"

    r_boundary: float = -10.0
    """Reward for trying to leave the grid (Fig. 7.2: -10)."""
    r_forbidden: float = -10.0
    """Reward for entering or staying in a forbidden cell (Fig. 7.2: -10)."""
    r_target: float = 0.0
    """Reward for entering the target (Fig. 7.2: 0)."""
    r_other: float = -1.0
    """Reward for any other move (Fig. 7.2: -1, so shorter paths are better)."""
    terminal_target: bool = True
    """End episodes at the target (the chapter's path-finding task)."""
    alpha: float = 0.1
    """Learning rate alpha, constant (Fig. 7.2: 0.1)."""
    epsilon: float = 0.1
    """Exploration of the epsilon-greedy policy (Fig. 7.2: 0.1)."""
    epsilon_decay: float = 1.0
    """Multiply epsilon by this after every episode, the remedy Section 7.2.2 suggests for the
    late detours of a constant epsilon; 1 keeps it constant as in Figs. 7.2 and 7.3."""
    q0: float = 0.0
    """Initial guess q_0(s, a) at every non-terminal state."""
    start_row: int = 1
    """Row of the start cell, from 1 (the book: the top-left cell)."""
    start_col: int = 1
    """Column of the start cell, from 1."""
    num_envs: int = 1
    """Episodes run side by side from the start cell, each time step one batched update of the
    shared q table; 1 is the book's algorithm."""
    max_episode_length: int = 2000
    """Cut an episode that has not reached the target after this many steps."""
    n: int = 3
    """Steps before bootstrapping: 1 is Sarsa, large n approaches Monte Carlo."""
    steps: int = 500
    """Episodes (per stream) to run; Fig. 7.2 shows 500."""
    log_every: int = 5
    """Write a row of metrics.csv (means over the episodes since the last row) every this many
    episodes."""
    ckpt_every: int = 500
    """Write checkpoint.safetensors every this many episodes (and always at the end)."""

    def check(self) -> None:
        super().check()
        _check_path_finding(self)
        require_at_least(self, 1, "n")

    def check_data(self) -> None:
        super().check_data()
        _start_state(self, make_world(self))


PathFindingConfig = SarsaConfig | ExpectedSarsaConfig | QLearningConfig | NStepSarsaConfig


def _check_path_finding(cfg: PathFindingConfig) -> None:
    """The checks the four path-finding configs share."""
    require_unit(cfg, "alpha", low_open=True)
    require_unit(cfg, "epsilon")
    require_unit(cfg, "epsilon_decay", low_open=True)
    require_at_least(cfg, 1, "num_envs", "max_episode_length")


def _one_step_episodes(model: TabularModel, tables: dict, s0: int, generator: torch.Generator,
                       epsilon: float, *, cfg: PathFindingConfig, target,
                       next_action_first: bool):
    """One episode per stream of Algorithm 7.1 (``next_action_first``: Sarsa draws a_{t+1} from
    pi_t before updating) or 7.2 (a_t is drawn from the updated policy at the start of each
    step). ``target(q, pi, r, s', a', terminated)`` gives qbar_t from the tables before the
    update."""
    q, pi = tables["q"], tables["pi"]
    live = torch.arange(cfg.num_envs)  # the streams whose episode is still running
    s = torch.full((cfg.num_envs,), s0)
    a = sample_actions(pi, s, generator) if next_action_first else None
    total = torch.zeros(cfg.num_envs, dtype=torch.float64)
    length = torch.full((cfg.num_envs,), cfg.max_episode_length)
    deltas = []
    for t in range(cfg.max_episode_length):
        a_t = a if next_action_first else sample_actions(pi, s, generator)
        s_next, r, terminated = model.step(s, a_t)
        a_next = sample_actions(pi, s_next, generator) if next_action_first else None
        qbar = target(q, pi, r, s_next, a_next, terminated)
        deltas.append(td_update(q, (s, a_t), qbar, cfg.alpha))
        # Policy update at s_t only: epsilon-greedy in q_{t+1}.
        pi[s] = epsilon_greedy_policy(q[s], epsilon)
        total.index_add_(0, live, r)
        s, a = s_next, a_next
        if terminated.any():
            length[live[terminated]] = t + 1
            going = ~terminated
            s, live = s[going], live[going]
            a = a[going] if next_action_first else None
            if live.numel() == 0:
                break
    return total, length, torch.cat(deltas).abs().mean()


def _n_step_episodes(model: TabularModel, tables: dict, s0: int, generator: torch.Generator,
                     epsilon: float, *, cfg: NStepSarsaConfig):
    """One episode per stream of n-step Sarsa in Algorithm 7.1's loop: (s_t, a_t) is updated at
    time t + n, when r_{t+1..t+n}, s_{t+n} and a_{t+n} are known; after an episode terminates at T
    the pairs t > T - n are updated with the returns that remain (no bootstrap)."""
    q, pi, n, horizon = tables["q"], tables["pi"], cfg.n, cfg.max_episode_length
    batch = cfg.num_envs
    states = torch.zeros(horizon + 1, batch, dtype=torch.int64)
    actions = torch.zeros(horizon + 1, batch, dtype=torch.int64)
    rewards = torch.zeros(horizon + n, batch, dtype=torch.float64)  # zero after each end
    end = torch.full((batch,), horizon)  # time of each episode's last state
    terminated = torch.zeros(batch, dtype=torch.bool)
    states[0] = s0
    actions[0] = sample_actions(pi, states[0], generator)
    live = torch.arange(batch)
    deltas = []
    tau = 0
    while True:
        if tau < horizon and live.numel():
            s_next, r, term = model.step(states[tau, live], actions[tau, live])
            states[tau + 1, live] = s_next
            actions[tau + 1, live] = sample_actions(pi, s_next, generator)
            rewards[tau, live] = r
            end[live[term]] = tau + 1
            terminated[live[term]] = True
            live = live[~term]
        t = tau - n + 1
        if t >= 0:
            # Due now: pairs before the episode's end whose n rewards are in, or whose episode
            # terminated (a cut episode has no return beyond its horizon).
            due = (t < end) & ((t + n <= end) | terminated)
            if not due.any():  # a running episode always has a pair due: all are done
                break
            b = due.nonzero().squeeze(1)
            m = min(t + n, horizon)
            bootstrap = ~terminated[b] | (t + n < end[b])
            target = n_step_target(rewards[t:t + n, b], q[states[m, b], actions[m, b]],
                                   cfg.gamma, bootstrap)
            s_t = states[t, b]
            deltas.append(td_update(q, (s_t, actions[t, b]), target, cfg.alpha))
            pi[s_t] = epsilon_greedy_policy(q[s_t], epsilon)
        tau += 1
    return rewards.sum(dim=0), end, torch.cat(deltas).abs().mean()


def _train_control(cfg: PathFindingConfig, run: Run | None, progress: bool | None, episodes,
                   title: str, *, estimates_optimal: bool) -> Run:
    """The loop shared by the path-finding methods, one episode per stream a step:
    ``episodes(model, tables, s0, generator, epsilon)`` runs them and returns (total rewards,
    lengths, mean |delta|)."""
    run = run or Run.create(cfg.METHOD, cfg)
    generator = seed_everything(cfg.seed)
    world = make_world(cfg)
    model = world.model
    s0 = _start_state(cfg, world)
    v_star = optimal_values(model, cfg.gamma)
    tables = {"q": _initial_q(model, cfg.q0), "pi": uniform_policy(model.n_states)}
    counts = {"transitions": torch.zeros((), dtype=torch.int64)}

    def step(k: int) -> dict[str, float]:
        epsilon = decayed_epsilon(cfg.epsilon, cfg.epsilon_decay, k)
        total, length, td_error = episodes(model, tables, s0, generator, epsilon)
        counts["transitions"] += length.sum()
        gap = v_star[s0].item() - greedy_start_value(model, tables["q"], s0, cfg.gamma)
        return {"return": total.mean(), "episode_length": length.double().mean(),
                "td_error": td_error,
                "start_value_gap": max(gap, 0.0), "epsilon": epsilon}

    fit(run, step, total_steps=cfg.steps,
        objects={"model": tables, "counts": counts, "rng": generator},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress)
    q, pi = tables["q"], tables["pi"]
    # Sarsa's q estimates q_pi of its epsilon-greedy policy, Q-learning's q*.
    v = q.max(dim=1).values if estimates_optimal else (pi * q).sum(dim=1)
    v_greedy = exact_values(model, greedy_policy(q), cfg.gamma)
    start_gap = max(v_star[s0].item() - v_greedy[s0].item(), 0.0)
    path = greedy_path(model, q, s0, model.n_states)
    finish(run, cfg, world, values=v.masked_fill(model.terminal, 0.0), policy=pi, title=title,
           extra={"eval/start_state_optimal": start_gap < OPTIMAL_TOL,
                  "eval/start_value_gap": start_gap, "eval/start_value": v_greedy[s0].item(),
                  "eval/optimal_start_value": v_star[s0].item(),
                  "eval/path_length": len(path) - 1,
                  "eval/states_optimal": int((v_greedy >= v_star - OPTIMAL_TOL).sum()),
                  "eval/n_states": model.n_states,
                  "train/transitions": int(counts["transitions"])})
    run.save_figure(trajectory_figure(world, [path], f"{cfg.METHOD}: greedy path from "
                                      f"({cfg.start_row},{cfg.start_col})"), "trajectories.png")
    run.save_figure(metric_curves(run.metrics, ["return", "episode_length"], title=title,
                                  log=False), "returns.png")
    return run


def train_sarsa(cfg: SarsaConfig, run: Run | None = None, progress: bool | None = None) -> Run:
    def target(q, pi, r, s_next, a_next, terminated):
        return sarsa_target(r, q[s_next, a_next], cfg.gamma, terminated)

    episodes = partial(_one_step_episodes, cfg=cfg, target=target, next_action_first=True)
    return _train_control(cfg, run, progress, episodes,
                          f"Sarsa, alpha={cfg.alpha}, epsilon={cfg.epsilon}",
                          estimates_optimal=False)


def train_expected_sarsa(cfg: ExpectedSarsaConfig, run: Run | None = None,
                         progress: bool | None = None) -> Run:
    def target(q, pi, r, s_next, a_next, terminated):
        return expected_sarsa_target(r, q[s_next], pi[s_next], cfg.gamma, terminated)

    episodes = partial(_one_step_episodes, cfg=cfg, target=target, next_action_first=False)
    return _train_control(cfg, run, progress, episodes,
                          f"Expected Sarsa, alpha={cfg.alpha}, epsilon={cfg.epsilon}",
                          estimates_optimal=False)


def train_n_step_sarsa(cfg: NStepSarsaConfig, run: Run | None = None,
                       progress: bool | None = None) -> Run:
    episodes = partial(_n_step_episodes, cfg=cfg)
    return _train_control(cfg, run, progress, episodes,
                          f"{cfg.n}-step Sarsa, alpha={cfg.alpha}, epsilon={cfg.epsilon}",
                          estimates_optimal=False)


def train_q_learning(cfg: QLearningConfig, run: Run | None = None,
                     progress: bool | None = None) -> Run:
    def target(q, pi, r, s_next, a_next, terminated):
        return q_learning_target(r, q[s_next], cfg.gamma, terminated)

    episodes = partial(_one_step_episodes, cfg=cfg, target=target, next_action_first=False)
    return _train_control(cfg, run, progress, episodes,
                          f"Q-learning (on-policy), alpha={cfg.alpha}, epsilon={cfg.epsilon}",
                          estimates_optimal=True)


# Q-learning off-policy (Algorithm 7.3, Figs. 7.4 and 7.5) ---------------------------------------


@dataclass
class QLearningOffPolicyConfig(GridConfig):
    METHOD: ClassVar[str] = "q_learning_off_policy"

    behavior_policy: str = "uniform"
    """The behaviour policy pi_b that generates the data: 'uniform' (Fig. 7.4c) or one letter
    (u r d l s) per cell with rows separated by '/'."""
    behavior_epsilon: float = 0.0
    """Mix pi_b with the uniform policy: (1 - eps) pi_b + eps / |A|; with a letter policy this is
    the epsilon-greedy behaviour of Fig. 7.5 (eps 0.5, 0.1)."""
    alpha: float = 0.1
    """Learning rate alpha, constant (Fig. 7.4: 0.1)."""
    q0: float = 0.0
    """Initial guess q_0(s, a) (Fig. 7.4: 0 in (f), 10 in (g), 100 in (h))."""
    start_row: int = 1
    """Row of the cell where the behaviour episode starts, from 1."""
    start_col: int = 1
    """Column of that cell, from 1."""
    num_envs: int = 1
    """Behaviour episodes run side by side, each time step one batched update; 1 is the book's
    single episode."""
    segment_length: int = 1000
    """Time steps of the behaviour episode per training step."""
    steps: int = 100
    """Training steps, each one segment of segment_length time steps; the episode has
    steps x segment_length time steps (Fig. 7.4d: 100,000)."""
    log_every: int = 1
    """Write a row of metrics.csv every this many segments."""
    ckpt_every: int = 10
    """Write checkpoint.safetensors every this many segments (and always at the end)."""

    def check(self) -> None:
        super().check()
        require_unit(self, "behavior_epsilon")
        require_unit(self, "alpha", low_open=True)
        require_at_least(self, 1, "num_envs", "segment_length")

    def check_data(self) -> None:
        super().check_data()
        world = make_world(self)
        parse_policy(self.behavior_policy, world)
        _start_state(self, world)


def train_q_learning_off_policy(cfg: QLearningOffPolicyConfig, run: Run | None = None,
                                progress: bool | None = None) -> Run:
    run = run or Run.create(cfg.METHOD, cfg)
    generator = seed_everything(cfg.seed)
    world = make_world(cfg)
    model = world.model
    s0 = _start_state(cfg, world)
    pi_b = parse_policy(cfg.behavior_policy, world)
    pi_b = (1 - cfg.behavior_epsilon) * pi_b + cfg.behavior_epsilon / model.n_actions
    v_star = optimal_values(model, cfg.gamma)
    tables = {"q": _initial_q(model, cfg.q0)}
    # Where the behaviour episodes are, and stream 0's last segment (for the figure).
    behaviour = {"s": torch.full((cfg.num_envs,), s0),
                 "path": torch.zeros(cfg.segment_length + 1, dtype=torch.int64)}

    def estimated_values(q: torch.Tensor) -> torch.Tensor:
        return q.max(dim=1).values.masked_fill(model.terminal, 0.0)

    episodic = bool(model.terminal.any())

    def step(k: int) -> dict[str, float]:
        q, s = tables["q"], behaviour["s"]
        path, deltas = [s], []
        for _ in range(cfg.segment_length):
            a = sample_actions(pi_b, s, generator)
            s_next, r, terminated = model.step(s, a)
            qbar = q_learning_target(r, q[s_next], cfg.gamma, terminated if episodic else None)
            deltas.append(td_update(q, (s, a), qbar, cfg.alpha))
            path.append(s_next)
            # The target policy pi_T = greedy(q) does not act, so it is formed when needed; a
            # terminated behaviour episode starts again at the start cell.
            s = torch.where(terminated, s0, s_next) if episodic else s_next
        behaviour["path"] = torch.stack(path)[:, 0]
        behaviour["s"] = s
        error = estimated_values(q) - v_star
        return {"td_error": torch.cat(deltas).abs().mean(),
                "value_error_rms": error.square().mean().sqrt(),
                "value_error_max": error.abs().max(),
                "greedy_value_gap": greedy_value_gap(model, q, v_star, cfg.gamma)}

    fit(run, step, total_steps=cfg.steps,
        objects={"model": tables, "behaviour": behaviour, "rng": generator},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress)
    q = tables["q"]
    error = estimated_values(q) - v_star
    finish(run, cfg, world, values=estimated_values(q), policy=greedy_policy(q),
           title=f"Q-learning off-policy from {cfg.behavior_policy!r} behaviour",
           extra={"eval/value_error_rms": error.square().mean().sqrt().item(),
                  "eval/value_error_max": error.abs().max().item(),
                  "train/transitions": cfg.steps * cfg.segment_length * cfg.num_envs})
    run.save_figure(trajectory_figure(world, [behaviour["path"].tolist()],
                                      f"behaviour episode, last {cfg.segment_length} steps"),
                    "trajectories.png")
    run.save_figure(metric_curves(run.metrics, ["value_error_rms", "greedy_value_gap"],
                                  title="Q-learning off-policy", log=False), "errors.png")
    return run
