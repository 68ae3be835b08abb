"""Value-function approximation: TD-linear, Sarsa and Q-learning with linear features, deep
Q-learning (Zhao, Chapter 8).

Values are a function of a parameter vector w instead of a table. With a feature vector phi(s) the
linear approximation is v_hat(s, w) = phi(s)^T w (eq. 8.1), and TD learning of state values
(eq. 8.13, Algorithm 8.1) becomes TD-Linear (eq. 8.14):

    w_{t+1} = w_t + alpha [r_{t+1} + gamma phi(s_{t+1})^T w_t - phi(s_t)^T w_t] phi(s_t).

Features of a cell (Section 8.2.4; x the column, y the row):

- polynomial, x and y scaled to [-1, 1]: order 1 is [1, x, y] (eq. 8.15), order 2 adds
  [x^2, y^2, xy] (eq. 8.16), order 3 adds [x^3, y^3, x^2 y, x y^2] (eq. 8.17);
- Fourier, x and y scaled to [0, 1]: cos(pi (c1 x + c2 y)) for c1, c2 in {0..q}, (q+1)^2 of them
  (eq. 8.18);
- one-hot phi(s) = e_s, with which TD-Linear is tabular TD(0) (Box 8.2).

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

acting epsilon-greedily on q_hat. The book uses "Fourier features of order 5" without saying how
the action enters; by default the action index, scaled like x and y, is a third coordinate,
cos(pi (c1 x + c2 y + c3 z)) with (q+1)^3 terms; ``action_encoding='one_hot'`` uses one block of
state features per action, phi(s, a) = e_a (x) phi(s), instead.

Deep Q-learning (Section 8.4, the off-policy algorithm the book prints as "Algorithm 8.3")
minimises the squared Bellman optimality error
J = E[(R + gamma max_a q_hat(S', a, w_T) - q_hat(S, A, w))^2] (eq. 8.37) over mini-batches drawn
uniformly from a replay buffer of a behaviour policy's transitions; the gradient treats the target
as fixed (eq. 8.38) and the target network w_T is set to w every C iterations. The network maps
the row and column of a state, scaled to [0, 1], to the five action values: the alternative the
book names beside Figure 8.11's (row, column, action) -> value network, which fitted far more
slowly here (docs/methods/rl-tabular-vfa.md).

Batching: sampling methods run ``num_envs`` episodes side by side. Their corrections are summed,
w <- w + alpha sum_b delta_b phi_b, so every sample moves w by alpha delta phi as in the sequential
algorithm (to first order in alpha, a batched step is num_envs sequential ones).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mlatlas.core.config import ConfigError, require_at_least, require_unit
from mlatlas.core.plots import plt
from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import seed_everything
from mlatlas.rl.tabular.bellman import reward_pi, transition_pi
from mlatlas.rl.tabular.common import (
    GridConfig,
    exact_values,
    finish,
    make_world,
    optimal_values,
)
from mlatlas.rl.tabular.episodes import rollout
from mlatlas.rl.tabular.gridworld import (
    ACTIONS,
    GridWorld,
    greedy_policy,
    parse_policy,
    parse_start,
    uniform_policy,
)
from mlatlas.rl.tabular.plots import trajectory_figure

FEATURES = ("polynomial", "fourier", "tabular")

# Features ------------------------------------------------------------------------------------


def cell_coordinates(world: GridWorld, low: float, high: float) -> tuple[torch.Tensor, ...]:
    """(x, y) of every state, the column and the row scaled linearly to [low, high]."""
    n_rows, n_cols = world.shape
    row = torch.arange(n_rows, dtype=torch.float64).repeat_interleave(n_cols)
    col = torch.arange(n_cols, dtype=torch.float64).repeat(n_rows)
    # max(., 1): a grid one cell wide has its single column at ``low``.
    x = low + (high - low) * col / max(n_cols - 1, 1)
    y = low + (high - low) * row / max(n_rows - 1, 1)
    return x, y


def polynomial_features(x: torch.Tensor, y: torch.Tensor, order: int) -> torch.Tensor:
    """(N, (order+1)(order+2)/2) monomials x^i y^j, i + j <= order, in the book's order: degree by
    degree, within a degree the pure powers x^k, y^k first, then x^{k-1} y, ..., x y^{k-1}
    (eqs. 8.15-8.17)."""
    columns = [torch.ones_like(x)]
    for k in range(1, order + 1):
        columns += [x**k, y**k] + [x ** (k - j) * y**j for j in range(1, k)]
    return torch.stack(columns, dim=1)


def fourier_features(x: torch.Tensor, y: torch.Tensor, order: int) -> torch.Tensor:
    """(N, (q+1)^2) cos(pi (c1 x + c2 y)) for c1, c2 in {0..q}, c1 the outer index (eq. 8.18)."""
    c = torch.arange(order + 1, dtype=x.dtype)
    c1, c2 = c.repeat_interleave(order + 1), c.repeat(order + 1)
    return torch.cos(math.pi * (x[:, None] * c1 + y[:, None] * c2))


def state_features(world: GridWorld, kind: str, order: int) -> torch.Tensor:
    """Phi: (S, m), the feature vector phi(s)^T of every state as a row (eq. 8.20)."""
    if kind == "polynomial":
        return polynomial_features(*cell_coordinates(world, -1.0, 1.0), order)
    if kind == "fourier":
        return fourier_features(*cell_coordinates(world, 0.0, 1.0), order)
    if kind == "tabular":
        return torch.eye(world.n_states, dtype=torch.float64)
    raise ConfigError(f"unknown features {kind!r}; use one of {', '.join(FEATURES)}")


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


def rmse(estimate: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """sqrt(mean_s (estimate(s) - truth(s))^2), the book's "state value error (RMSE)"."""
    return (estimate - truth).square().mean().sqrt()


# Linear action values ------------------------------------------------------------------------


def action_features(world: GridWorld, kind: str, order: int,
                    encoding: str = "coordinate") -> torch.Tensor:
    """phi(s, a) for every pair: (S, |A|, m).

    ``coordinate``: the action index, scaled like x and y, is a third coordinate of the basis:
    cos(pi (c1 x + c2 y + c3 z)) for c1, c2, c3 in {0..q} (eq. 8.18 in three variables), or the
    monomials of (x, y, z) of degree <= order; with q (or the degree) >= |A| - 1 the basis spans
    every function of the action. ``one_hot``: one block of state features per action,
    phi(s, a) = e_a (x) phi(s). ``tabular`` features are the one-hot e_(s, a) either way.
    """
    n_states, n_actions = world.n_states, len(ACTIONS)
    if kind == "tabular":
        return torch.eye(n_states * n_actions, dtype=torch.float64).view(n_states, n_actions, -1)
    if encoding == "one_hot":
        phi = state_features(world, kind, order)  # (S, m)
        blocks = torch.eye(n_actions, dtype=phi.dtype)[None, :, :, None] * phi[:, None, None, :]
        return blocks.reshape(n_states, n_actions, -1)
    low = -1.0 if kind == "polynomial" else 0.0
    x, y = cell_coordinates(world, low, 1.0)
    z = low + (1.0 - low) * torch.arange(n_actions, dtype=torch.float64) / (n_actions - 1)
    x, y, z = (t.reshape(shape).expand(n_states, n_actions).reshape(-1)
               for t, shape in ((x, (-1, 1)), (y, (-1, 1)), (z, (1, -1))))
    coords = torch.stack([x, y, z], dim=1)
    if kind == "polynomial":
        powers = torch.tensor(_powers(3, order), dtype=coords.dtype)  # (m, 3)
        phi = (coords[:, None, :] ** powers).prod(dim=2)
    else:
        c = torch.cartesian_prod(*[torch.arange(order + 1, dtype=coords.dtype)] * 3)
        phi = torch.cos(math.pi * coords @ c.T)
    return phi.view(n_states, n_actions, -1)


def _powers(n_vars: int, order: int) -> list[tuple[int, ...]]:
    """Exponents of the monomials of n_vars variables of degree <= order, degree by degree."""
    powers = [p for p in itertools.product(range(order + 1), repeat=n_vars) if sum(p) <= order]
    return sorted(powers, key=lambda p: (sum(p), [-e for e in p]))


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


# Deep Q-learning -----------------------------------------------------------------------------


class QNetwork(nn.Module):
    """q_hat(s, ., w): the normalised (row, col) of s -> tanh hidden layers -> |A| action values,
    the two-input, five-output design the book names beside Figure 8.11's."""

    def __init__(self, world: GridWorld, hidden: int = 100, layers: int = 2):
        super().__init__()
        self.shape = world.shape
        widths = [2] + [hidden] * layers
        blocks: list[nn.Module] = []
        for n_in, n_out in zip(widths, widths[1:], strict=False):
            blocks += [nn.Linear(n_in, n_out), nn.Tanh()]
        self.net = nn.Sequential(*blocks, nn.Linear(widths[-1], len(ACTIONS)))

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


# Configs -------------------------------------------------------------------------------------


def start_states(start: int | None, n: int, n_states: int,
                 generator: torch.Generator) -> torch.Tensor:
    """n start states: all ``start``, or uniformly random when it is None."""
    if start is None:
        return torch.randint(n_states, (n,), generator=generator)
    return torch.full((n,), start, dtype=torch.int64)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class TDLinearConfig(GridConfig):
    policy: str = "uniform"
    """The policy to evaluate: 'uniform' (Figure 8.6's, each action with probability 0.2), or one
    letter (u r d l s) per cell with rows separated by '/'."""
    features: Literal["polynomial", "fourier", "tabular"] = "fourier"
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
    """Write a row of metrics.csv every this many steps."""
    ckpt_every: int = 10
    """Write checkpoint.safetensors every this many steps (and always at the end)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_policy(self.policy, make_world(self))
        _check_common(self)
        require_at_least(self, 1, "episode_length")
        _check(self.w0_std >= 0, f"--w0-std must be non-negative, got {self.w0_std}")


def _check_common(cfg) -> None:
    _check(cfg.features in FEATURES,
           f"--features must be one of {', '.join(FEATURES)}, got {cfg.features!r}")
    _check(cfg.order >= 0, f"--order must be non-negative, got {cfg.order}")
    _check(cfg.alpha > 0, f"--alpha must be positive, got {cfg.alpha}")
    require_at_least(cfg, 1, "num_envs")


@dataclass
class SarsaLinearConfig(GridConfig):
    r_boundary: float = -10.0
    """Reward for trying to leave the grid (Figures 8.9 and 8.10 use -10)."""
    r_forbidden: float = -10.0
    """Reward for entering or staying in a forbidden cell (Figures 8.9 and 8.10 use -10)."""
    terminal_target: bool = True
    """End episodes at the target (Algorithms 8.2 and 8.3 run until the target is reached)."""
    start: str = "1,1"
    """Where episodes start: a 1-based 'row,col' cell (the book's top-left) or 'random'."""
    features: Literal["polynomial", "fourier", "tabular"] = "fourier"
    """phi(s, a): Fourier or polynomial in (x, y) and the action, or one-hot (tabular)."""
    action_encoding: Literal["coordinate", "one_hot"] = "coordinate"
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
    """Write a row of metrics.csv every this many steps."""
    ckpt_every: int = 10
    """Write checkpoint.safetensors every this many steps (and always at the end)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_start(self.start, make_world(self))
        _check_common(self)
        require_at_least(self, 1, "max_episode_length")
        require_unit(self, "epsilon")


@dataclass
class QLearningLinearConfig(SarsaLinearConfig):
    """Q-learning (on-policy version, Algorithm 8.3) takes Sarsa's fields."""

    steps: int = 200
    """Batches of num_envs episodes; Q-learning needs about 2,000 episodes here (the book shows
    500)."""


@dataclass
class DQNConfig(GridConfig):
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

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_start(self.start, make_world(self))
        require_at_least(self, 1, "episode_length", "num_envs", "batch_size", "hidden", "layers",
                         "target_every")
        _check(self.lr > 0 and self.lr_final > 0,
               f"--lr and --lr-final must be positive, got {self.lr} and {self.lr_final}")
        _check(self.decay_start >= 0 and self.decay_steps >= 0,
               "--decay-start and --decay-steps must be non-negative")


# Training ------------------------------------------------------------------------------------


def train_td_linear(cfg: TDLinearConfig, run: Run | None = None,
                    progress: bool | None = None) -> Run:
    """Algorithm 8.1 with linear features on episodes of a given policy (Figures 8.7, 8.8)."""
    run = run or Run.create("td_linear", cfg)
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

    fit(run, step, total_steps=cfg.steps, objects={"tables": tables, "generator": generator},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress)
    w = tables["w"]
    v_hat = Phi @ w
    extra = {"rmse": rmse(v_hat, v_pi).item(), "feature_dim": Phi.shape[1],
             "episodes": cfg.steps * cfg.num_envs}
    if w_star is not None:
        extra.update(rmse_fixed_point_vs_true=rmse(Phi @ w_star, v_pi).item(),
                     rmse_vs_fixed_point=rmse(v_hat, Phi @ w_star).item())
    name = f"{cfg.features}" + ("" if cfg.features == "tabular" else f" order {cfg.order}")
    finish(run, cfg, world, values=v_hat, policy=pi,
           title=f"TD-Linear, {name} features, policy {cfg.policy!r}", extra=extra, score=False)
    run.save_figure(surface_figure(world, v_pi, v_hat, f"TD-Linear ({name}, m={Phi.shape[1]})"),
                    "surfaces.png")
    run.save_figure(curves_figure(run.metrics, ["rmse"], "episodes", "TD-Linear"), "curves.png")
    return run


def _train_linear_control(name: str, cfg: SarsaLinearConfig, run: Run | None,
                          progress: bool | None) -> Run:
    """Algorithms 8.2 (Sarsa) and 8.3 (Q-learning, on-policy), num_envs episodes at a time."""
    run = run or Run.create(name, cfg)
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
            if name == "sarsa_linear":
                a_next = act(w, s_next)
                w, delta = sarsa_linear_update(w, Phi[s, a], r, Phi[s_next, a_next], done,
                                               cfg.gamma, cfg.alpha, alive)
            else:
                w, delta = q_learning_linear_update(w, Phi[s, a], r, Phi[s_next], done,
                                                    cfg.gamma, cfg.alpha, alive)
                # Q-learning draws a_{t+1} from the policy after the update (Algorithm 8.3).
                a_next = act(w, s_next)
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

    fit(run, step, total_steps=cfg.steps, objects={"tables": tables, "generator": generator},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress)
    q = linear_q(Phi, tables["w"])
    pi = greedy_policy(q)
    v_hat = torch.where(model.terminal, torch.zeros(()), q.max(dim=1).values)
    gap = (v_star - exact_values(model, pi, cfg.gamma)).clamp(min=0)
    label = "Sarsa" if name == "sarsa_linear" else "Q-learning"
    finish(run, cfg, world, values=v_hat, policy=pi,
           title=f"{label} with {cfg.features} features (order {cfg.order}), greedy policy",
           extra={"start_value_gap": (gap.max() if start is None else gap[start]).item(),
                  "value_rmse_vs_optimal": rmse(v_hat, v_star).item(),
                  "episodes": cfg.steps * batch, "feature_dim": Phi.shape[2]})
    s0 = start if start is not None else 0
    run.save_figure(trajectory_figure(world, [greedy_path(model, pi, s0)],
                                      f"greedy path from {world.cell(s0)}"), "trajectories.png")
    run.save_figure(curves_figure(run.metrics, ["return", "episode_length"], "episodes", label),
                    "curves.png")
    return run


def train_sarsa_linear(cfg: SarsaLinearConfig, run: Run | None = None,
                       progress: bool | None = None) -> Run:
    return _train_linear_control("sarsa_linear", cfg, run, progress)


def train_q_learning_linear(cfg: QLearningLinearConfig, run: Run | None = None,
                            progress: bool | None = None) -> Run:
    return _train_linear_control("q_learning_linear", cfg, run, progress)


def learning_rate(cfg: DQNConfig, k: int) -> float:
    """Adam's step size at iteration k: lr until decay_start, then linear to lr_final over
    decay_steps, lr_final after. A function of k alone, so a run resumed with more steps follows
    the same schedule as an uninterrupted one."""
    progress = min(max(k - cfg.decay_start, 0) / max(cfg.decay_steps, 1), 1.0)
    return cfg.lr + (cfg.lr_final - cfg.lr) * progress


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


def train_dqn_tabular(cfg: DQNConfig, run: Run | None = None,
                      progress: bool | None = None) -> Run:
    """Deep Q-learning, off-policy, from one uniform behaviour episode (Figure 8.11)."""
    run = run or Run.create("dqn_tabular", cfg)
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
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, k)
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
        objects={"q_net": net, "target_net": target_net, "optimizer": optimizer,
                 "generator": generator, "buffer": buffer},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress)
    with torch.no_grad():
        q = net(all_states).double()
    v_hat = q.max(dim=1).values
    pairs = torch.unique(buffer["s"] * model.n_actions + buffer["a"]).numel()
    finish(run, cfg, world, values=v_hat, policy=greedy_policy(q),
           title=f"deep Q-learning from {size} behaviour samples, greedy policy",
           extra={"value_rmse_vs_optimal": rmse(v_hat, v_star).item(),
                  "buffer_size": size, "state_action_pairs_visited": pairs})
    paths = buffer["states"].T.tolist()
    run.save_figure(trajectory_figure(world, paths, f"behaviour episode, {size} steps"),
                    "trajectories.png")
    run.save_figure(curves_figure(run.metrics, ["loss", "value_error"], "step",
                                  "deep Q-learning"), "curves.png")
    return run


# Pictures ------------------------------------------------------------------------------------


def greedy_path(model, pi: torch.Tensor, s0: int, limit: int = 100) -> list[int]:
    """The states visited following the deterministic pi from s0 until a terminal state, a
    repeated state or ``limit`` steps."""
    path, s = [s0], s0
    actions = pi.argmax(dim=1)
    for _ in range(limit):
        if model.terminal[s]:
            break
        s = int(model.next_state[s, actions[s]])
        if s in path:
            path.append(s)
            break
        path.append(s)
    return path


def surface_figure(world: GridWorld, v_true: torch.Tensor, v_hat: torch.Tensor, title: str):
    """True and estimated state values as 3D surfaces over (column, row) (Figures 8.6c, 8.7)."""
    n_rows, n_cols = world.shape
    col, row = torch.meshgrid(torch.arange(1, n_cols + 1), torch.arange(1, n_rows + 1),
                              indexing="xy")
    fig = plt.figure(figsize=(10, 4.5))
    low = min(v_true.min().item(), v_hat.min().item())
    high = max(v_true.max().item(), v_hat.max().item())
    for k, (label, v) in enumerate((("true state values", v_true),
                                    ("estimated state values", v_hat))):
        ax = fig.add_subplot(1, 2, k + 1, projection="3d")
        ax.plot_surface(col.numpy(), row.numpy(), v.reshape(n_rows, n_cols).detach().numpy(),
                        cmap="viridis", vmin=low, vmax=high, edgecolor="0.3", linewidth=0.3)
        ax.set_zlim(low, high)
        ax.set_xlabel("column")
        ax.set_ylabel("row")
        ax.invert_yaxis()
        ax.set_title(label, fontsize=10)
    fig.suptitle(title)
    return fig


def curves_figure(rows: list[dict], names: list[str], x: str, title: str):
    """One panel per metric against ``x`` (a metrics.csv column), linear axes."""
    fig, axes = plt.subplots(len(names), 1, figsize=(6, 2.6 * len(names)), squeeze=False)
    xs = [r[x] for r in rows]
    for ax, name in zip(axes[:, 0], names, strict=True):
        ax.plot(xs, [r.get(name, float("nan")) for r in rows])
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(x)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
