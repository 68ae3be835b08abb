"""Value-function approximation with linear features: TD-Linear, and Sarsa and Q-learning with
linear function approximation (Zhao, Sections 8.2-8.3).

Values are a function of a parameter vector w instead of a table. With a feature vector phi(s)
(:mod:`mlatlas.rl.tabular.features`) the linear approximation is v_hat(s, w) = phi(s)^T w
(eq. 8.1), and TD learning of state values (eq. 8.13, Algorithm 8.1) becomes TD-Linear
(eq. 8.14):

    w_{t+1} = w_t + alpha [r_{t+1} + gamma phi(s_{t+1})^T w_t - phi(s_t)^T w_t] phi(s_t).

Theory (Section 8.2.5). With d_pi the stationary distribution (d_pi^T = d_pi^T P_pi, Box 8.1),
D = diag(d_pi) and Phi the matrix whose rows are phi(s)^T, the expected TD-Linear update is
(Lemma 8.1)

    E[(r_{t+1} + gamma phi(s_{t+1})^T w - phi(s_t)^T w) phi(s_t)] = b - A w,
    A = Phi^T D (I - gamma P_pi) Phi,   b = Phi^T D r_pi                          (eq. 8.21)

so TD-Linear converges to w* = A^{-1} b, the minimiser of the projected Bellman error
||Phi w - M T_pi(Phi w)||_D with M = Phi (Phi^T D Phi)^{-1} Phi^T D (Box 8.5); with one-hot
features w* = v_pi (eq. 8.23). :func:`stationary_distribution`, :func:`td_fixed_point` and
:func:`expected_td_update` compute these exactly.

Action values (Section 8.3) use q_hat(s, a, w) = phi(s, a)^T w. Sarsa (eq. 8.35, Algorithm 8.2)
and Q-learning (eq. 8.36, Algorithm 8.3, on-policy version) update

    w_{t+1} = w_t + alpha [r_{t+1} + gamma q_hat(s_{t+1}, a_{t+1}, w_t) - q_hat(s_t, a_t, w_t)]
              phi(s_t, a_t),                                                       (Sarsa)
    w_{t+1} = w_t + alpha [r_{t+1} + gamma max_a q_hat(s_{t+1}, a, w_t) - q_hat(s_t, a_t, w_t)]
              phi(s_t, a_t),                                                       (Q-learning)

acting epsilon-greedily on q_hat.

Batching: the methods run ``num_envs`` episodes side by side and a training step is one batch of
them. Their corrections are summed, w <- w + alpha sum_b delta_b phi_b, so every sample moves w by
alpha delta phi as in the sequential algorithm (to first order in alpha, a batched step is
num_envs sequential ones).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from mlatlas.core.config import ConfigError, require_at_least, require_unit
from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import seed_everything
from mlatlas.rl.tabular.bellman import (
    exact_values,
    optimal_values,
    reward_pi,
    transition_pi,
)
from mlatlas.rl.tabular.common import GridConfig, finish, make_world, rmse
from mlatlas.rl.tabular.episodes import rollout, start_states
from mlatlas.rl.tabular.features import (
    ActionEncoding,
    Features,
    action_features,
    state_features,
)
from mlatlas.rl.tabular.gridworld import (
    GridWorld,
    greedy_path,
    greedy_policy,
    parse_policy,
    parse_start,
)
from mlatlas.rl.tabular.plots import curves_figure, surface_figure, trajectory_figure

# TD-Linear and its fixed point -----------------------------------------------------------------


def semi_gradient_update(w: torch.Tensor, phi: torch.Tensor, target: torch.Tensor,
                         alpha: float,
                         alive: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w + alpha sum_b [target_b - phi_b^T w] phi_b; returns (w, delta).

    Eq. 8.13 for a linear function, whose gradient in w is the feature vector: ``phi`` (B, m) are
    the features of the states (or state-action pairs) updated and ``target`` (B,) what the TD
    method puts in place of v_pi (or q_pi); ``alive`` False drops a transition.
    """
    delta = target - phi @ w
    if alive is not None:
        delta = torch.where(alive, delta, torch.zeros_like(delta))
    return w + alpha * (phi.T @ delta), delta


def td_linear_update(w: torch.Tensor, phi: torch.Tensor, r: torch.Tensor, phi_next: torch.Tensor,
                     gamma: float, alpha: float, *, done: torch.Tensor | None = None,
                     alive: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """TD-Linear (eq. 8.14) for a batch of transitions; returns (w_{t+1}, delta).

    ``w`` (m,), ``phi`` and ``phi_next`` (B, m) the features of s_t and s_{t+1}, ``r`` (B,).
    ``done`` marks s_{t+1} terminal (its value is 0); ``alive`` False drops a transition (a step
    after its episode ended). delta_b = r_b + gamma phi_next_b^T w - phi_b^T w and
    w_{t+1} = w + alpha sum_b delta_b phi_b.
    """
    v_next = phi_next @ w
    if done is not None:
        v_next = torch.where(done, torch.zeros_like(v_next), v_next)
    return semi_gradient_update(w, phi, r + gamma * v_next, alpha, alive)


def stationary_distribution(P_pi: torch.Tensor) -> torch.Tensor:  # noqa: N803 (the book's symbol)
    """d_pi with d_pi^T = d_pi^T P_pi and sum_s d_pi(s) = 1 (eq. 8.10), by a least-squares solve.

    Unique for a regular Markov chain (Box 8.1), e.g. under any policy that gives every action a
    positive probability on a grid whose cells all communicate.
    """
    n = P_pi.shape[0]
    system = torch.cat([P_pi.T - torch.eye(n, dtype=P_pi.dtype), torch.ones(1, n,
                                                                         dtype=P_pi.dtype)])
    rhs = torch.zeros(n + 1, 1, dtype=P_pi.dtype)
    rhs[-1] = 1.0
    return torch.linalg.lstsq(system, rhs).solution.squeeze(1)


def td_matrices(world: GridWorld, pi: torch.Tensor, Phi: torch.Tensor,  # noqa: N803
                gamma: float, d: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A = Phi^T D (I - gamma P_pi) Phi and b = Phi^T D r_pi (eq. 8.21); D = diag(d_pi)."""
    model = world.model
    P_pi = transition_pi(model, pi)
    d = stationary_distribution(P_pi) if d is None else d
    identity = torch.eye(model.n_states, dtype=Phi.dtype)
    weighted = Phi.T * d  # Phi^T D without forming D
    return weighted @ (identity - gamma * P_pi) @ Phi, weighted @ reward_pi(model, pi)


def td_fixed_point(world: GridWorld, pi: torch.Tensor, Phi: torch.Tensor,  # noqa: N803
                   gamma: float, d: torch.Tensor | None = None) -> torch.Tensor:
    """w* = A^{-1} b, where TD-Linear converges and the projected Bellman error is zero."""
    A, b = td_matrices(world, pi, Phi, gamma, d)
    return torch.linalg.solve(A, b)


def regular_fixed_point(world: GridWorld, pi: torch.Tensor, Phi: torch.Tensor,  # noqa: N803
                        gamma: float) -> torch.Tensor | None:
    """w* where it is defined: the chain under pi has a unique stationary distribution with
    d_pi(s) > 0 for every s (Box 8.1), so A is invertible (Box 8.4); None otherwise (an absorbing
    target, cells the policy never reaches) or on grids too large for dense matrices."""
    if world.n_states > 2500:
        return None
    P_pi = transition_pi(world.model, pi)
    identity = torch.eye(world.n_states, dtype=P_pi.dtype)
    if torch.linalg.matrix_rank(P_pi.T - identity) != world.n_states - 1:
        return None  # eigenvalue 1 is repeated: several closed classes
    d = stationary_distribution(P_pi)
    if d.min() <= 1e-12:
        return None
    return td_fixed_point(world, pi, Phi, gamma, d)


def expected_td_update(world: GridWorld, pi: torch.Tensor, Phi: torch.Tensor,  # noqa: N803
                       w: torch.Tensor, gamma: float, d: torch.Tensor) -> torch.Tensor:
    """E[(r_{t+1} + gamma phi(s_{t+1})^T w - phi(s_t)^T w) phi(s_t)] with s_t ~ d, a ~ pi(.|s_t)
    (eq. 8.19), summed over the model's transitions directly (not through A and b)."""
    model = world.model
    v = Phi @ w
    delta = model.reward + gamma * v[model.next_state] - v[:, None]  # (S, A)
    return Phi.T @ (d * (pi * delta).sum(dim=1))


# Linear action values ------------------------------------------------------------------------


def linear_q(phi: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """q_hat(s, a, w) = phi(s, a)^T w for features ``phi`` (..., m) -> (...)."""
    return phi @ w


def epsilon_greedy_actions(q: torch.Tensor, epsilon: float,
                           generator: torch.Generator) -> torch.Tensor:
    """a ~ epsilon-greedy(q(s, .)) for each row of ``q`` (B, |A|): a uniformly random action with
    probability epsilon, else the greedy one (the first on ties), so the greedy action has
    probability 1 - epsilon (|A| - 1) / |A| as in Algorithms 8.2 and 8.3."""
    explore = torch.rand(q.shape[0], generator=generator, dtype=q.dtype) < epsilon
    random = torch.randint(q.shape[1], (q.shape[0],), generator=generator)
    return torch.where(explore, random, q.argmax(dim=1))


def sarsa_linear_update(w: torch.Tensor, phi: torch.Tensor, r: torch.Tensor,
                        phi_next: torch.Tensor, done: torch.Tensor, gamma: float, alpha: float,
                        alive: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 8.35 for a batch; ``phi`` = phi(s_t, a_t), ``phi_next`` = phi(s_{t+1}, a_{t+1}), both
    (B, m). The target is r + gamma q_hat(s_{t+1}, a_{t+1}, w), without the q after a terminal
    s_{t+1}. Returns (w, delta)."""
    q_next = linear_q(phi_next, w)
    target = r + gamma * torch.where(done, torch.zeros_like(q_next), q_next)
    return semi_gradient_update(w, phi, target, alpha, alive)


def q_learning_linear_update(w: torch.Tensor, phi: torch.Tensor, r: torch.Tensor,
                             phi_next: torch.Tensor, done: torch.Tensor, gamma: float,
                             alpha: float, alive: torch.Tensor | None = None):
    """Eq. 8.36 for a batch; ``phi`` = phi(s_t, a_t) (B, m), ``phi_next`` = phi(s_{t+1}, .)
    (B, |A|, m). The target is r + gamma max_a q_hat(s_{t+1}, a, w). Returns (w, delta)."""
    q_next = linear_q(phi_next, w).max(dim=1).values
    target = r + gamma * torch.where(done, torch.zeros_like(q_next), q_next)
    return semi_gradient_update(w, phi, target, alpha, alive)


# Configs -------------------------------------------------------------------------------------


def _check_linear(cfg: TDLinearConfig | SarsaLinearConfig | QLearningLinearConfig) -> None:
    """The checks the three linear methods share."""
    if cfg.order < 0:
        raise ConfigError(f"--order must be non-negative, got {cfg.order}")
    if not cfg.alpha > 0:
        raise ConfigError(f"--alpha must be positive, got {cfg.alpha}")
    require_at_least(cfg, 1, "num_envs")


@dataclass
class TDLinearConfig(GridConfig):
    METHOD: ClassVar[str] = "td_linear"

    policy: str = "uniform"
    """The policy to evaluate: 'uniform' (Figure 8.6's, each action with probability 0.2), or one
    letter (u r d l s) per cell with rows separated by '/'."""
    features: Features = "fourier"
    """phi(s): polynomial in (x, y) in [-1, 1] (eqs. 8.15-8.17), Fourier cos(pi (c1 x + c2 y))
    with (x, y) in [0, 1] (eq. 8.18), or one-hot (tabular TD, Box 8.2)."""
    order: int = 3
    """Polynomial degree, or the Fourier order q (c1, c2 in 0..q); unused by 'tabular'."""
    alpha: float = 0.0005
    """Constant step size alpha_t (the book's 0.0005)."""
    episode_length: int = 500
    """Steps per episode; each episode starts from a uniformly random state (Section 8.2.4)."""
    num_envs: int = 10
    """Episodes run side by side in one step; a run sees steps * num_envs episodes."""
    w0_std: float = 1.0
    """w_0 ~ N(0, w0_std^2) elementwise (the book draws it from a standard normal)."""
    steps: int = 50
    """Batches of num_envs episodes (50 x 10 = the book's 500 episodes)."""
    log_every: int = 1
    """Write a row of metrics.csv every this many batches."""
    ckpt_every: int = 10
    """Write checkpoint.safetensors every this many batches (and always at the end)."""

    def check(self) -> None:
        super().check()
        _check_linear(self)
        require_at_least(self, 1, "episode_length")
        if self.w0_std < 0:
            raise ConfigError(f"--w0-std must be non-negative, got {self.w0_std}")

    def check_data(self) -> None:
        super().check_data()
        parse_policy(self.policy, make_world(self))


@dataclass
class SarsaLinearConfig(GridConfig):
    METHOD: ClassVar[str] = "sarsa_linear"

    r_boundary: float = -10.0
    """Reward for trying to leave the grid (Figures 8.9 and 8.10 use -10)."""
    r_forbidden: float = -10.0
    """Reward for entering or staying in a forbidden cell (Figures 8.9 and 8.10 use -10)."""
    terminal_target: bool = True
    """End episodes at the target (Algorithms 8.2 and 8.3 run until the target is reached)."""
    start: str = "1,1"
    """Where episodes start: a 1-based 'row,col' cell (the book's top-left) or 'random'."""
    features: Features = "fourier"
    """phi(s, a): Fourier or polynomial in (x, y) and the action, or one-hot (tabular)."""
    action_encoding: ActionEncoding = "coordinate"
    """How phi(s, a) takes the action: as a third coordinate of the basis (scaled like x and y),
    or one block of state features per action."""
    order: int = 5
    """Polynomial degree or Fourier order q (the book uses Fourier of order 5)."""
    alpha: float = 0.001
    """Constant step size (the book's 0.001)."""
    epsilon: float = 0.1
    """Exploration of the epsilon-greedy policy on q_hat (the book's 0.1)."""
    num_envs: int = 10
    """Episodes run side by side in one step, all updating the same w."""
    max_episode_length: int = 1000
    """Cut an episode that has not reached the target after this many steps."""
    steps: int = 50
    """Batches of num_envs episodes (50 x 10 = the book's 500 episodes)."""
    log_every: int = 1
    """Write a row of metrics.csv every this many batches."""
    ckpt_every: int = 10
    """Write checkpoint.safetensors every this many batches (and always at the end)."""

    def check(self) -> None:
        super().check()
        _check_control(self)

    def check_data(self) -> None:
        super().check_data()
        parse_start(self.start, make_world(self))


@dataclass
class QLearningLinearConfig(GridConfig):
    METHOD: ClassVar[str] = "q_learning_linear"

    r_boundary: float = -10.0
    """Reward for trying to leave the grid (Figures 8.9 and 8.10 use -10)."""
    r_forbidden: float = -10.0
    """Reward for entering or staying in a forbidden cell (Figures 8.9 and 8.10 use -10)."""
    terminal_target: bool = True
    """End episodes at the target (Algorithms 8.2 and 8.3 run until the target is reached)."""
    start: str = "1,1"
    """Where episodes start: a 1-based 'row,col' cell (the book's top-left) or 'random'."""
    features: Features = "fourier"
    """phi(s, a): Fourier or polynomial in (x, y) and the action, or one-hot (tabular)."""
    action_encoding: ActionEncoding = "coordinate"
    """How phi(s, a) takes the action: as a third coordinate of the basis (scaled like x and y),
    or one block of state features per action."""
    order: int = 5
    """Polynomial degree or Fourier order q (the book uses Fourier of order 5)."""
    alpha: float = 0.001
    """Constant step size (the book's 0.001)."""
    epsilon: float = 0.1
    """Exploration of the epsilon-greedy policy on q_hat (the book's 0.1)."""
    num_envs: int = 10
    """Episodes run side by side in one step, all updating the same w."""
    max_episode_length: int = 1000
    """Cut an episode that has not reached the target after this many steps."""
    steps: int = 200
    """Batches of num_envs episodes; Q-learning needs about 2,000 episodes here (the book shows
    500)."""
    log_every: int = 1
    """Write a row of metrics.csv every this many batches."""
    ckpt_every: int = 10
    """Write checkpoint.safetensors every this many batches (and always at the end)."""

    def check(self) -> None:
        super().check()
        _check_control(self)

    def check_data(self) -> None:
        super().check_data()
        parse_start(self.start, make_world(self))


def _check_control(cfg: SarsaLinearConfig | QLearningLinearConfig) -> None:
    _check_linear(cfg)
    require_at_least(cfg, 1, "max_episode_length")
    require_unit(cfg, "epsilon")


# Training ------------------------------------------------------------------------------------


def train_td_linear(cfg: TDLinearConfig, run: Run | None = None,
                    progress: bool | None = None) -> Run:
    """Algorithm 8.1 with linear features on episodes of a given policy (Figures 8.7, 8.8)."""
    run = run or Run.create(cfg.METHOD, cfg)
    generator = seed_everything(cfg.seed)
    world = make_world(cfg)
    model = world.model
    pi = parse_policy(cfg.policy, world)
    Phi = state_features(world, cfg.features, cfg.order)
    v_pi = exact_values(model, pi, cfg.gamma)
    w_star = regular_fixed_point(world, pi, Phi, cfg.gamma)
    tables = {"w": cfg.w0_std * torch.randn(Phi.shape[1], dtype=torch.float64,
                                            generator=generator)}

    def step(k: int) -> dict[str, float | torch.Tensor]:
        s0 = torch.randint(model.n_states, (cfg.num_envs,), generator=generator)
        episodes = rollout(model, pi, s0, cfg.episode_length, generator)
        w, td_sq = tables["w"], 0.0
        for t in range(cfg.episode_length):
            s, s_next = episodes.states[t], episodes.states[t + 1]
            w, delta = td_linear_update(w, Phi[s], episodes.rewards[t], Phi[s_next], cfg.gamma,
                                        cfg.alpha, done=model.terminal[s_next],
                                        alive=episodes.alive[t])
            td_sq = td_sq + delta.square().mean()
        tables["w"] = w
        metrics = {"rmse": rmse(Phi @ w, v_pi), "td_error": (td_sq / cfg.episode_length).sqrt(),
                   "episodes": k * cfg.num_envs}
        if w_star is not None:
            metrics["rmse_vs_fixed_point"] = rmse(Phi @ w, Phi @ w_star)
        return metrics

    fit(run, step, total_steps=cfg.steps, objects={"model": tables, "rng": generator},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress)
    w = tables["w"]
    v_hat = Phi @ w
    extra = {"eval/rmse": rmse(v_hat, v_pi).item(), "train/feature_dim": Phi.shape[1],
             "train/episodes": cfg.steps * cfg.num_envs}
    if w_star is not None:
        extra.update({"eval/rmse_fixed_point_vs_true": rmse(Phi @ w_star, v_pi).item(),
                      "eval/rmse_vs_fixed_point": rmse(v_hat, Phi @ w_star).item()})
    name = f"{cfg.features}" + ("" if cfg.features == "tabular" else f" order {cfg.order}")
    finish(run, cfg, world, values=v_hat, policy=pi,
           title=f"TD-Linear, {name} features, policy {cfg.policy!r}", extra=extra, score=False)
    run.save_figure(surface_figure(world, v_pi, v_hat, f"TD-Linear ({name}, m={Phi.shape[1]})"),
                    "surfaces.png")
    run.save_figure(curves_figure(run.metrics, ["rmse"], "episodes", "TD-Linear"), "curves.png")
    return run


# One transition of the whole batch: (w, act, Phi, s, a, r, s', done, alive) -> (w, delta, a').
Transition = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _train_linear_control(cfg: SarsaLinearConfig | QLearningLinearConfig, run: Run | None,
                          progress: bool | None, transition: Transition, label: str) -> Run:
    """Algorithms 8.2 (Sarsa) and 8.3 (Q-learning, on-policy), num_envs episodes at a time;
    ``transition`` updates w for one time step of the batch and draws a_{t+1}."""
    run = run or Run.create(cfg.METHOD, cfg)
    generator = seed_everything(cfg.seed)
    world = make_world(cfg)
    model = world.model
    start = parse_start(cfg.start, world)
    Phi = action_features(world, cfg.features, cfg.order, cfg.action_encoding)  # (S, A, m)
    v_star = optimal_values(model, cfg.gamma)
    batch = cfg.num_envs
    tables = {"w": torch.zeros(Phi.shape[2], dtype=torch.float64)}

    def act(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """a ~ epsilon-greedy(q_hat(s, ., w)): the policy update of Algorithms 8.2 and 8.3."""
        return epsilon_greedy_actions(linear_q(Phi[s], w), cfg.epsilon, generator)

    def step(k: int) -> dict[str, float | torch.Tensor]:
        w = tables["w"]
        s = start_states(start, batch, model.n_states, generator)
        alive = ~model.terminal[s]
        a = act(w, s)
        total = torch.zeros(batch, dtype=torch.float64)
        length = torch.zeros(batch, dtype=torch.int64)
        td_sq, samples = 0.0, 0
        for _ in range(cfg.max_episode_length):
            if not alive.any():
                break
            s_next, r, done = model.step(s, a)
            w, delta, a_next = transition(w, act, Phi, s, a, r, s_next, done, alive)
            total += torch.where(alive, r, torch.zeros_like(r))
            length += alive
            td_sq, samples = td_sq + delta.square().sum(), samples + int(alive.sum())
            s, a, alive = s_next, a_next, alive & ~done
        tables["w"] = w
        q = linear_q(Phi, w)
        v_greedy = exact_values(model, greedy_policy(q), cfg.gamma)
        gap = (v_star - v_greedy).clamp(min=0)
        return {"return": total.mean(), "episode_length": length.double().mean(),
                "td_error": (td_sq / max(samples, 1)) ** 0.5, "episodes": k * batch,
                "greedy_value_gap": gap.max(),
                "start_value_gap": gap.max() if start is None else gap[start]}

    fit(run, step, total_steps=cfg.steps, objects={"model": tables, "rng": generator},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress)
    q = linear_q(Phi, tables["w"])
    pi = greedy_policy(q)
    v_hat = torch.where(model.terminal, torch.zeros(()), q.max(dim=1).values)
    gap = (v_star - exact_values(model, pi, cfg.gamma)).clamp(min=0)
    finish(run, cfg, world, values=v_hat, policy=pi,
           title=f"{label} with {cfg.features} features (order {cfg.order}), greedy policy",
           extra={"eval/start_value_gap": (gap.max() if start is None else gap[start]).item(),
                  "eval/value_rmse_vs_optimal": rmse(v_hat, v_star).item(),
                  "train/episodes": cfg.steps * batch, "train/feature_dim": Phi.shape[2]})
    s0 = start if start is not None else 0
    run.save_figure(trajectory_figure(world, [greedy_path(model, pi, s0, 100)],
                                      f"greedy path from {world.cell(s0)}"), "trajectories.png")
    run.save_figure(curves_figure(run.metrics, ["return", "episode_length"], "episodes", label),
                    "curves.png")
    return run


def train_sarsa_linear(cfg: SarsaLinearConfig, run: Run | None = None,
                       progress: bool | None = None) -> Run:
    def transition(w, act, Phi, s, a, r, s_next, done, alive):  # noqa: N803
        # Sarsa draws a_{t+1} from the policy before the update (Algorithm 8.2).
        a_next = act(w, s_next)
        w, delta = sarsa_linear_update(w, Phi[s, a], r, Phi[s_next, a_next], done, cfg.gamma,
                                       cfg.alpha, alive)
        return w, delta, a_next

    return _train_linear_control(cfg, run, progress, transition, "Sarsa")


def train_q_learning_linear(cfg: QLearningLinearConfig, run: Run | None = None,
                            progress: bool | None = None) -> Run:
    def transition(w, act, Phi, s, a, r, s_next, done, alive):  # noqa: N803
        w, delta = q_learning_linear_update(w, Phi[s, a], r, Phi[s_next], done, cfg.gamma,
                                            cfg.alpha, alive)
        # Q-learning draws a_{t+1} from the policy after the update (Algorithm 8.3).
        return w, delta, act(w, s_next)

    return _train_linear_control(cfg, run, progress, transition, "Q-learning")
