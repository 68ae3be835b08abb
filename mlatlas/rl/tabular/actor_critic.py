"""Actor-critic methods (Zhao, Chapter 10): QAC, A2C, off-policy actor-critic and DPG.

An actor-critic method is a policy gradient method whose action values come from TD learning. The
gradient ascent step on J(theta) (eq. 10.1) is

    theta_{t+1} = theta_t + alpha_theta E_{S~eta, A~pi}[grad_theta ln pi(A|S, theta_t) q_pi(S, A)],

and its stochastic version (eq. 10.2) replaces the expectation by one sample (s_t, a_t) and q_pi by
the critic's estimate. On the grid world the actor is the tabular softmax policy (eq. 9.12) with
preferences h(s, a, theta) = theta[s, a]:

    pi(a|s, theta) = exp(theta[s, a]) / sum_a' exp(theta[s, a']),
    grad_{theta[s, :]} ln pi(a|s, theta) = e_a - pi(.|s, theta)   (zero outside row s),

and the critic is a table (linear function approximation with one-hot features, so
grad_w v(s, w) = e_s and grad_w q(s, a, w) = e_{s,a}).

- QAC, Algorithm 10.1. Critic: Sarsa, w += alpha_w [r + gamma q(s', a') - q(s, a)] grad_w q(s, a)
  with a' ~ pi(.|s', theta_t). Actor: theta += alpha_theta grad ln pi(a|s) q(s, a, w).
- A2C or TD actor-critic, Algorithm 10.2. The baseline v_pi(s) leaves the gradient unchanged
  (eq. 10.3) and the advantage q_pi(s, a) - v_pi(s) is estimated by the TD error
  delta_t = r_{t+1} + gamma v(s_{t+1}, w) - v(s_t, w). Actor: theta += alpha_theta delta_t grad ln
  pi(a_t|s_t); critic: w += alpha_w delta_t grad_w v(s_t, w).
- Off-policy actor-critic, Algorithm 10.3. A behaviour policy beta (here uniform) acts; the
  importance weight rho_t = pi(a_t|s_t, theta) / beta(a_t|s_t) (eq. 10.10) multiplies both
  updates: theta += alpha_theta rho_t delta_t grad ln pi(a_t|s_t), w += alpha_w rho_t delta_t
  grad_w v(s_t, w). Theorem 10.1 makes its expected actor step the on-policy one.
- Deterministic actor-critic (DPG), Algorithm 10.4, with a = mu(s, theta):

      delta_t = r_{t+1} + gamma q(s_{t+1}, mu(s_{t+1}), w) - q(s_t, a_t, w),
      theta += alpha_theta grad_theta mu(s_t) (grad_a q(s_t, a, w))|_{a = mu(s_t)},
      w += alpha_w delta_t grad_w q(s_t, a_t, w),

  the actor following Theorem 10.2, grad J = E_{S~eta}[grad_theta mu(S) grad_a q_mu(S, a)|a=mu(S)].
  DPG needs continuous actions and the grid world has five, so it runs on the continuous-action
  task where the theorem is exact and the answer known: a linear-quadratic regulator. A point
  s in R^n moves by its action, s' = s + a, with reward r = -(|s|^2 + c |a|^2). The policy is
  linear, mu(s, theta) = theta s, the critic quadratic, q(s, a, w) = z^T W z with z = (s, a)
  (linear in the features z z^T, as in the book's q = phi^T w), which holds q_mu exactly. The
  optimal policy is mu*(s) = -K s from the discounted Riccati equation, and J(theta) =
  E_{s0 ~ U[-1, 1]^n}[v_mu(s0)] has a closed form, so learning is checked against both. The
  behaviour policy adds Gaussian noise to mu; the critic evaluates mu itself (a_{t+1} = mu(s_{t+1})
  in the TD target), so it is off-policy without importance weights, as Section 10.4.2 explains.

Many agents run side by side with shared parameters: every step each of ``num_envs`` episodes
takes one transition and the batch of updates is applied at once, averaged where several agents
update the same table entry (so the step size stays alpha however large the batch). Episodes start
in uniformly random states (so every state is visited) and restart after ``episode_length`` steps
or at a terminal state.

The grid methods default to the book's world with episodes ending at the target (the
path-finding variant of Chapter 7; ``--no-terminal-target`` gives the continuing world). In the
continuing world the optimal path from the top row crosses the forbidden cells (2,3) and (3,3),
while under the early, nearly uniform policies those cells are worth little; the softmax policy
learns to avoid them, and since grad ln pi(a|s) = e_a - pi(.|s) shrinks with pi(a|s), it takes
tens of thousands of steps to come back. Exact gradient ascent on J(theta) (no sampling at all)
shows the same plateau, so this is the method, not the implementation; docs/methods has the
numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from mlatlas.core.config import (
    BaseConfig,
    ConfigError,
    config_from_dict,
    flag,
    require_at_least,
)
from mlatlas.core.io import load_tensors
from mlatlas.core.run import CHECKPOINT, Run, fit
from mlatlas.core.runtime import seed_everything
from mlatlas.rl.tabular.bellman import exact_values, optimal_values
from mlatlas.rl.tabular.common import GridConfig, finish, greedy_value_gap, make_world
from mlatlas.rl.tabular.episodes import rollout, scatter_mean_update
from mlatlas.rl.tabular.gridworld import (
    GridWorld,
    TabularModel,
    sample_actions,
    uniform_policy,
)
from mlatlas.rl.tabular.plots import trajectory_figure
from mlatlas.rl.tabular.policy_gradient import grad_log_softmax, softmax_policy
from mlatlas.rl.tabular.td import td_target

# The softmax actor and the tabular critic -----------------------------------------------------


def log_softmax_policy(theta: torch.Tensor, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """ln pi(a|s, theta) for a batch of states s and actions a, (B,)."""
    return torch.log_softmax(theta[s], dim=-1).gather(1, a[:, None]).squeeze(1)


def td_error(r: torch.Tensor, value_next: torch.Tensor, value: torch.Tensor, gamma: float,
             terminated: torch.Tensor | None = None) -> torch.Tensor:
    """delta = r + gamma value(s') - value(s); value(s') counts as 0 where the episode ended.

    ``value`` is v(s, w) (A2C, Algorithms 10.2-10.3) or q(s, a, w) (QAC's Sarsa critic, where
    ``value_next`` is q(s', a', w)).
    """
    return td_target(r, value_next, gamma, terminated) - value


def importance_weight(pi_a: torch.Tensor, beta_a: torch.Tensor) -> torch.Tensor:
    """rho = pi(a|s) / beta(a|s) (eq. 10.10); beta must be positive wherever pi is."""
    return pi_a / beta_a


def actor_update(theta: torch.Tensor, s: torch.Tensor, a: torch.Tensor, weight: torch.Tensor,
                 alpha_theta: float) -> torch.Tensor:
    """theta[s, :] += alpha_theta * weight * (e_a - pi(.|s, theta)), in place.

    ``weight`` is q(s, a, w) for QAC, delta for A2C and rho * delta for the off-policy actor.
    Samples that share a state are averaged, so a row moves by at most one step per batch.
    """
    g = weight[:, None] * grad_log_softmax(softmax_policy(theta[s]), a)
    total = torch.zeros_like(theta).index_add_(0, s, g)
    count = torch.bincount(s, minlength=theta.shape[0]).clamp(min=1).to(theta.dtype)
    return theta.add_(alpha_theta * total / count[:, None])


def critic_update(w: torch.Tensor, index: tuple[torch.Tensor, ...], delta: torch.Tensor,
                  alpha_w: float) -> torch.Tensor:
    """w[index] += alpha_w * delta (tabular grad_w is one-hot), collisions averaged, in place.

    ``index`` is (s,) for v(s, w) and (s, a) for q(s, a, w); pass rho * delta for Algorithm 10.3.
    """
    return scatter_mean_update(w, index, delta, alpha_w)


def optimal_baseline(pi_s: torch.Tensor, q_s: torch.Tensor) -> torch.Tensor:
    """b*(s) = E_A[|grad ln pi(A|s)|^2 q(s, A)] / E_A[|grad ln pi(A|s)|^2] (eq. 10.5), (S,).

    For the tabular softmax |grad ln pi(a|s)|^2 = |e_a - pi(.|s)|^2 = 1 - 2 pi(a|s) + |pi(.|s)|^2.
    """
    norm2 = 1 - 2 * pi_s + (pi_s ** 2).sum(-1, keepdim=True)
    return (pi_s * norm2 * q_s).sum(-1) / (pi_s * norm2).sum(-1)


# The grid-world methods -------------------------------------------------------------------------


def _check_actor_critic(cfg: GridConfig | DeterministicACConfig) -> None:
    """The checks the actor-critic configs share."""
    require_at_least(cfg, 1, "num_envs", "episode_length")
    for name in ("alpha_theta", "alpha_w"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"--{flag(name)} must be positive, got {getattr(cfg, name)}")


@dataclass
class QACConfig(GridConfig):
    """Algorithm 10.1: more episodes and a slower actor than A2C (see the field notes)."""

    METHOD: ClassVar[str] = "qac_tabular"

    terminal_target: bool = True
    """End episodes at the target (the book's path-finding variant, the default here: with a
    non-terminal target the softmax policy gradient has a long plateau; see the module doc)."""
    num_envs: int = 256
    """Episodes run side by side, sharing theta and w (QAC's actor is weighted by q itself, with
    no baseline, so it needs more samples per step to average out its variance)."""
    episode_length: int = 100
    """Steps before an episode restarts from a new uniformly random state."""
    alpha_theta: float = 0.1
    """alpha_theta: the actor's step size (small beside alpha_w: q must be learned along the long
    paths before the actor commits to the short ones)."""
    alpha_w: float = 0.5
    """alpha_w: the critic's (Sarsa's) step size."""
    steps: int = 4000
    """Time steps of the num_envs episodes (each is one batched actor and critic update)."""
    log_every: int = 50
    """Write a row of metrics.csv (with the exact-value metrics) every this many time
    steps."""
    ckpt_every: int = 500
    """Write checkpoint.safetensors every this many time steps (and always at the end)."""

    def check(self) -> None:
        super().check()
        _check_actor_critic(self)


@dataclass
class A2CConfig(GridConfig):
    """Algorithm 10.2: alpha_theta 1, alpha_w 0.1, 128 episodes."""

    METHOD: ClassVar[str] = "a2c_tabular"

    terminal_target: bool = True
    """End episodes at the target (the book's path-finding variant, the default here: with a
    non-terminal target the softmax policy gradient has a long plateau; see the module doc)."""
    num_envs: int = 128
    """Episodes run side by side, sharing theta and w; each step is one transition of each."""
    episode_length: int = 100
    """Steps before an episode restarts from a new uniformly random state."""
    alpha_theta: float = 1.0
    """alpha_theta: the actor's step size."""
    alpha_w: float = 0.1
    """alpha_w: the critic's step size."""
    steps: int = 1000
    """Time steps of the num_envs episodes (each is one batched actor and critic update)."""
    log_every: int = 50
    """Write a row of metrics.csv (with the exact-value metrics) every this many time
    steps."""
    ckpt_every: int = 500
    """Write checkpoint.safetensors every this many time steps (and always at the end)."""

    def check(self) -> None:
        super().check()
        _check_actor_critic(self)


@dataclass
class OffPolicyACConfig(GridConfig):
    """Algorithm 10.3 with a uniform behaviour policy: A2C's defaults."""

    METHOD: ClassVar[str] = "off_policy_ac_tabular"

    terminal_target: bool = True
    """End episodes at the target (the book's path-finding variant, the default here: with a
    non-terminal target the softmax policy gradient has a long plateau; see the module doc)."""
    num_envs: int = 128
    """Episodes run side by side, sharing theta and w; each step is one transition of each."""
    episode_length: int = 100
    """Steps before an episode restarts from a new uniformly random state."""
    alpha_theta: float = 1.0
    """alpha_theta: the actor's step size."""
    alpha_w: float = 0.1
    """alpha_w: the critic's step size."""
    steps: int = 1000
    """Time steps of the num_envs episodes (each is one batched actor and critic update)."""
    log_every: int = 50
    """Write a row of metrics.csv (with the exact-value metrics) every this many time
    steps."""
    ckpt_every: int = 500
    """Write checkpoint.safetensors every this many time steps (and always at the end)."""

    def check(self) -> None:
        super().check()
        _check_actor_critic(self)


GridACConfig = QACConfig | A2CConfig | OffPolicyACConfig


class _Agents:
    """The batch of episodes: current states ``s`` and step counts ``t`` live in the dict
    ``state``, checkpointed as the run's ``agents`` group."""

    def __init__(self, cfg: GridACConfig, model: TabularModel, generator: torch.Generator):
        self.cfg, self.model, self.generator = cfg, model, generator
        # Episodes start anywhere but at a terminal state, uniformly, so every state is visited.
        self.starts = torch.nonzero(~model.terminal).squeeze(1)
        self.state = {"s": self._random_states(),
                      "t": torch.zeros(cfg.num_envs, dtype=torch.int64)}

    @property
    def s(self) -> torch.Tensor:
        return self.state["s"]

    def _random_states(self) -> torch.Tensor:
        k = torch.randint(len(self.starts), (self.cfg.num_envs,), generator=self.generator)
        return self.starts[k]

    def advance(self, s_next: torch.Tensor, terminated: torch.Tensor) -> None:
        """Move to s' and restart the episodes that ended or ran out of time."""
        t = self.state["t"] + 1
        done = terminated | (t >= self.cfg.episode_length)
        # New start states are drawn for every agent so the generator advances the same way
        # whichever episodes end.
        fresh = self._random_states()
        self.state["s"] = torch.where(done, fresh, s_next)
        self.state["t"] = torch.where(done, torch.zeros_like(t), t)


def _grid_metrics(model: TabularModel, gamma: float, theta: torch.Tensor, v: torch.Tensor,
                  v_star: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exact scores of the current actor and critic (run every log_every steps)."""
    v_pi = exact_values(model, softmax_policy(theta), gamma)
    return {"value_error": (v - v_pi).abs().max(), "mean_value": v_pi.mean(),
            "greedy_gap": greedy_value_gap(model, theta, v_star, gamma)}


def _train_grid(cfg: GridACConfig, run: Run | None, progress: bool | None, critic: str,
                make_step) -> Run:
    """Set-up and finish shared by the three grid methods; ``make_step`` builds the algorithm's
    step function from (model, tables, agents, generator)."""
    run = run or Run.create(cfg.METHOD, cfg)
    generator = seed_everything(cfg.seed)
    world = make_world(cfg)
    model = world.model
    n_states, n_actions = model.n_states, model.n_actions
    v_star = optimal_values(model, cfg.gamma)
    tables: dict[str, torch.Tensor] = {
        # theta = 0 is the uniform policy; a zero critic is the book's usual start.
        "theta": torch.zeros(n_states, n_actions, dtype=torch.float64),
        critic: torch.zeros((n_states,) if critic == "v" else (n_states, n_actions),
                            dtype=torch.float64),
    }
    agents = _Agents(cfg, model, generator)
    algorithm_step = make_step(model, tables, agents, generator)

    def step(k: int) -> dict[str, Any]:
        metrics = algorithm_step()
        if k % cfg.log_every == 0 or k == cfg.steps:
            metrics.update(_grid_metrics(model, cfg.gamma, tables["theta"],
                                         _state_values(tables), v_star))
        return metrics

    fit(run, step, total_steps=cfg.steps,
        objects={"model": tables, "agents": agents.state, "rng": generator},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress)
    pi = softmax_policy(tables["theta"])
    v_pi = exact_values(model, pi, cfg.gamma)
    finish(run, cfg, world, values=_state_values(tables), policy=pi,
           title=f"{cfg.METHOD}, gamma={cfg.gamma}",
           extra={"train/steps": cfg.steps, "train/transitions": cfg.steps * cfg.num_envs,
                  "eval/critic_value_error": (_state_values(tables) - v_pi).abs().max().item(),
                  "eval/mean_value_pi": v_pi.mean().item(),
                  "eval/mean_value_optimal": v_star.mean().item()})
    run.save_figure(_trajectories(world, pi, cfg), "trajectories.png")
    return run


def _state_values(tables: dict[str, torch.Tensor]) -> torch.Tensor:
    """v(s) from the critic: v itself, or sum_a pi(a|s) q(s, a) for QAC's q critic."""
    if "v" in tables:
        return tables["v"]
    return (softmax_policy(tables["theta"]) * tables["q"]).sum(dim=1)


def _trajectories(world: GridWorld, pi: torch.Tensor, cfg: GridACConfig):
    """Episodes of the learned (stochastic) policy from the four corners."""
    n_rows, n_cols = world.shape
    corners = torch.tensor(sorted({0, n_cols - 1, (n_rows - 1) * n_cols, n_rows * n_cols - 1}))
    generator = torch.Generator().manual_seed(cfg.seed)
    episodes = rollout(world.model, pi, corners, 2 * (n_rows + n_cols), generator)
    paths = [episodes.states[:, b].tolist() for b in range(len(corners))]
    return trajectory_figure(world, paths, "learned policy pi(a|s, theta) from the corners")


def train_qac_tabular(cfg: QACConfig, run: Run | None = None,
                      progress: bool | None = None) -> Run:
    """Q actor-critic (Algorithm 10.1): Sarsa critic q(s, a, w), actor weighted by q."""

    def make_step(model, tables, agents, generator):
        def step() -> dict[str, Any]:
            theta, q, s = tables["theta"], tables["q"], agents.s
            pi = softmax_policy(theta)
            a = sample_actions(pi, s, generator)
            s_next, r, terminated = model.step(s, a)
            # a_{t+1} ~ pi(.|s_{t+1}, theta_t), drawn before the actor moves theta.
            a_next = sample_actions(pi, s_next, generator)
            q_sa = q[s, a]
            delta = td_error(r, q[s_next, a_next], q_sa, cfg.gamma, terminated)
            actor_update(theta, s, a, q_sa, cfg.alpha_theta)
            critic_update(q, (s, a), delta, cfg.alpha_w)
            agents.advance(s_next, terminated)
            return {"reward": r.mean(), "td_error": delta.abs().mean()}
        return step

    return _train_grid(cfg, run, progress, "q", make_step)


def train_a2c_tabular(cfg: A2CConfig, run: Run | None = None,
                      progress: bool | None = None) -> Run:
    """Advantage (TD) actor-critic (Algorithm 10.2): TD(0) critic v(s, w), actor weighted by
    the TD error delta_t."""

    def make_step(model, tables, agents, generator):
        def step() -> dict[str, Any]:
            theta, v, s = tables["theta"], tables["v"], agents.s
            a = sample_actions(softmax_policy(theta), s, generator)
            s_next, r, terminated = model.step(s, a)
            delta = td_error(r, v[s_next], v[s], cfg.gamma, terminated)
            actor_update(theta, s, a, delta, cfg.alpha_theta)
            critic_update(v, (s,), delta, cfg.alpha_w)
            agents.advance(s_next, terminated)
            return {"reward": r.mean(), "td_error": delta.abs().mean()}
        return step

    return _train_grid(cfg, run, progress, "v", make_step)


def train_off_policy_ac_tabular(cfg: OffPolicyACConfig, run: Run | None = None,
                                progress: bool | None = None) -> Run:
    """Off-policy actor-critic (Algorithm 10.3): a uniform behaviour policy beta acts, the
    importance weight pi/beta corrects both the actor and the critic."""

    def make_step(model, tables, agents, generator):
        beta = uniform_policy(model.n_states, model.n_actions)

        def step() -> dict[str, Any]:
            theta, v, s = tables["theta"], tables["v"], agents.s
            a = sample_actions(beta, s, generator)
            s_next, r, terminated = model.step(s, a)
            rho = importance_weight(softmax_policy(theta)[s, a], beta[s, a])
            delta = td_error(r, v[s_next], v[s], cfg.gamma, terminated)
            actor_update(theta, s, a, rho * delta, cfg.alpha_theta)
            critic_update(v, (s,), rho * delta, cfg.alpha_w)
            agents.advance(s_next, terminated)
            return {"td_error": delta.abs().mean(), "importance_weight": rho.mean()}
        return step

    return _train_grid(cfg, run, progress, "v", make_step)


# Deterministic actor-critic on a linear-quadratic regulator ------------------------------------
# States and actions are (B, n) batches; theta is the (n, n) gain of mu(s, theta) = theta s, W the
# symmetric (2n, 2n) critic matrix of q(s, a, W) = z^T W z with z = (s, a). The reward is
# r = -(|s|^2 + c |a|^2) with c the action cost, the dynamics s' = s + a, and episodes start at
# s0 ~ U[-1, 1]^n, so E[s0 s0^T] = I / 3.

START_SECOND_MOMENT = 1.0 / 3.0


def linear_policy(theta: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """mu(s, theta) = theta s for a batch of states, (B, n)."""
    return s @ theta.T


def lqr_step(s: torch.Tensor, a: torch.Tensor, action_cost: float):
    """One transition of the regulator: returns (s' = s + a, r = -(|s|^2 + c |a|^2))."""
    return s + a, -((s ** 2).sum(-1) + action_cost * (a ** 2).sum(-1))


def quadratic_q(W: torch.Tensor, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:  # noqa: N803
    """q(s, a, W) = z^T W z with z = (s, a): linear in the features z z^T, (B,)."""
    z = torch.cat([s, a], dim=-1)
    return ((z @ W) * z).sum(-1)


def grad_a_quadratic_q(W: torch.Tensor, s: torch.Tensor,  # noqa: N803
                       a: torch.Tensor) -> torch.Tensor:
    """grad_a q(s, a, W) = [2 W z]_a, the action block of the gradient (W symmetric), (B, n)."""
    z = torch.cat([s, a], dim=-1)
    return 2 * (z @ W)[:, s.shape[-1]:]


def dpg_actor_update(theta: torch.Tensor, s: torch.Tensor, grad_a_q: torch.Tensor,
                     alpha_theta: float) -> torch.Tensor:
    """theta += alpha_theta * mean_b grad_theta mu(s_b) grad_a q(s_b, a)|_{a=mu(s_b)}, in place.

    For mu = theta s, d mu_i / d theta_ij = s_j, so each sample contributes grad_a_q s^T.
    """
    return theta.add_(alpha_theta * grad_a_q.T @ s / s.shape[0])


def dpg_critic_update(W: torch.Tensor, s: torch.Tensor, a: torch.Tensor,  # noqa: N803
                      delta: torch.Tensor, alpha_w: float) -> torch.Tensor:
    """W += alpha_w * mean_b delta_b grad_W q(s_b, a_b, W) = alpha_w mean_b delta_b z z^T."""
    z = torch.cat([s, a], dim=-1)
    return W.add_(alpha_w * (z * delta[:, None]).T @ z / s.shape[0])


def _discounted_lyapunov(A: torch.Tensor, C: torch.Tensor, gamma: float,  # noqa: N803
                         transpose: bool) -> torch.Tensor:
    """X = C + gamma A^T X A (``transpose``) or X = C + gamma A X A^T, by one linear solve.

    Row-major vec(L X R) = (L kron R^T) vec(X). Differentiable in A and C.
    """
    n = A.shape[0]
    K = torch.kron(A.T, A.T) if transpose else torch.kron(A, A)  # noqa: N806
    identity = torch.eye(n * n, dtype=A.dtype)
    return torch.linalg.solve(identity - gamma * K, C.reshape(-1)).reshape(n, n)


def lqr_stable(theta: torch.Tensor, gamma: float) -> bool:
    """Whether v_mu is finite: sqrt(gamma) times the spectral radius of I + theta is below 1."""
    closed_loop = torch.eye(theta.shape[0], dtype=theta.dtype) + theta.detach()
    return gamma ** 0.5 * torch.linalg.eigvals(closed_loop).abs().max().item() < 1


def lqr_value_matrix(theta: torch.Tensor, gamma: float, action_cost: float) -> torch.Tensor:
    """P_theta with v_mu(s) = -s^T P s: P = I + c theta^T theta + gamma (I+theta)^T P (I+theta)."""
    identity = torch.eye(theta.shape[0], dtype=theta.dtype)
    return _discounted_lyapunov(identity + theta, identity + action_cost * theta.T @ theta, gamma,
                                transpose=True)


def lqr_objective(theta: torch.Tensor, gamma: float, action_cost: float) -> torch.Tensor:
    """J(theta) = E_{s0~U[-1,1]^n}[v_mu(s0)] = -tr(P_theta) / 3 (eq. 10.15, d0 uniform)."""
    return -START_SECOND_MOMENT * torch.trace(lqr_value_matrix(theta, gamma, action_cost))


def lqr_q_matrix(theta: torch.Tensor, gamma: float, action_cost: float) -> torch.Tensor:
    """W_mu with q_mu(s, a) = z^T W_mu z exactly:
    q_mu(s, a) = -(|s|^2 + c |a|^2) - gamma (s + a)^T P_theta (s + a)."""
    n = theta.shape[0]
    identity = torch.eye(n, dtype=theta.dtype)
    gP = gamma * lqr_value_matrix(theta, gamma, action_cost)  # noqa: N806
    return -torch.cat([torch.cat([identity + gP, gP], 1),
                       torch.cat([gP, action_cost * identity + gP], 1)], 0)


def lqr_optimal(dim: int, gamma: float, action_cost: float,
                tol: float = 1e-13) -> tuple[torch.Tensor, torch.Tensor]:
    """(theta*, P*) from the discounted Riccati equation
    P = I + gamma P - gamma^2 P (c I + gamma P)^{-1} P, theta* = -gamma (c I + gamma P)^{-1} P."""
    identity = torch.eye(dim, dtype=torch.float64)
    P = identity.clone()  # noqa: N806
    for _ in range(100_000):
        gain = gamma * torch.linalg.solve(action_cost * identity + gamma * P, P)
        P_next = identity + gamma * P - gamma * P @ gain  # noqa: N806
        if (P_next - P).abs().max().item() < tol:
            P = P_next  # noqa: N806
            break
        P = P_next  # noqa: N806
    return -gamma * torch.linalg.solve(action_cost * identity + gamma * P, P), P


def lqr_policy_gradient(theta: torch.Tensor, gamma: float, action_cost: float) -> torch.Tensor:
    """grad J(theta) by Theorem 10.3: E_{S~rho_mu}[grad_a q_mu(S, a)|_{a=mu(S)} S^T].

    grad_a q_mu(s, a) = -2 c a - 2 gamma P (s + a) is linear in s at a = theta s, so the
    expectation needs only the discounted second moment Sigma_rho = sum_k gamma^k E[s_k s_k^T],
    which solves Sigma_rho = Sigma_0 + gamma (I+theta) Sigma_rho (I+theta)^T.
    """
    n = theta.shape[0]
    identity = torch.eye(n, dtype=theta.dtype)
    closed_loop = identity + theta
    P = lqr_value_matrix(theta, gamma, action_cost)  # noqa: N806
    sigma_rho = _discounted_lyapunov(closed_loop, START_SECOND_MOMENT * identity, gamma,
                                     transpose=False)
    return (-2 * action_cost * theta - 2 * gamma * P @ closed_loop) @ sigma_rho


@dataclass
class DeterministicACConfig(BaseConfig):
    METHOD: ClassVar[str] = "deterministic_ac"

    dim: int = 2
    """n: the state s in R^n is a point that moves by its action, s' = s + a (2: a point in the
    plane steered to the origin, the continuous cousin of the grid world's target)."""
    gamma: float = 0.9
    """Discount rate."""
    action_cost: float = 1.0
    """c in the reward r = -(|s|^2 + c |a|^2)."""
    sigma: float = 0.3
    """Standard deviation of the Gaussian exploration noise of the behaviour policy
    beta: a = mu(s) + sigma eps."""
    num_envs: int = 64
    """Episodes run side by side, sharing theta and W; each step is one transition of each."""
    episode_length: int = 20
    """Steps before an episode restarts from a new s0 ~ U[-1, 1]^n."""
    alpha_theta: float = 0.05
    """alpha_theta: the actor's step size."""
    alpha_w: float = 0.1
    """alpha_w: the critic's step size."""
    steps: int = 3000
    """Time steps of the num_envs episodes (each is one batched actor and critic update)."""
    log_every: int = 50
    """Write a row of metrics.csv (with the exact objective) every this many time steps."""
    ckpt_every: int = 500
    """Write checkpoint.safetensors every this many time steps (and always at the end)."""

    def check(self) -> None:
        super().check()
        if not 0.0 <= self.gamma < 1.0:
            raise ConfigError(f"--gamma must be in [0, 1), got {self.gamma}")
        require_at_least(self, 1, "dim")
        _check_actor_critic(self)
        if not self.action_cost > 0:
            raise ConfigError(f"--action-cost must be positive, got {self.action_cost}")
        if self.sigma < 0:
            raise ConfigError(f"--sigma must be non-negative, got {self.sigma}")


def _lqr_scores(theta: torch.Tensor, cfg: DeterministicACConfig,
                theta_star: torch.Tensor, j_star: float) -> dict[str, float]:
    """J gap and distance to theta*; an unstable policy has J = -inf, which stops the run."""
    j = lqr_objective(theta, cfg.gamma, cfg.action_cost).item() \
        if lqr_stable(theta, cfg.gamma) else float("-inf")
    return {"objective_gap": j_star - j, "theta_error": (theta - theta_star).abs().max().item()}


def train_deterministic_ac(cfg: DeterministicACConfig, run: Run | None = None,
                           progress: bool | None = None) -> Run:
    """Deterministic actor-critic (Algorithm 10.4) on the linear-quadratic regulator."""
    run = run or Run.create(cfg.METHOD, cfg)
    generator = seed_everything(cfg.seed)
    n, batch = cfg.dim, cfg.num_envs
    theta_star, P_star = lqr_optimal(n, cfg.gamma, cfg.action_cost)  # noqa: N806
    j_star = -START_SECOND_MOMENT * torch.trace(P_star).item()

    def start_states() -> torch.Tensor:
        return 2 * torch.rand(batch, n, generator=generator, dtype=torch.float64) - 1

    tables = {"theta": torch.zeros(n, n, dtype=torch.float64),
              "W": torch.zeros(2 * n, 2 * n, dtype=torch.float64)}
    agents = {"s": start_states(), "t": torch.zeros(batch, dtype=torch.int64)}

    def step(k: int) -> dict[str, Any]:
        theta, W, s = tables["theta"], tables["W"], agents["s"]  # noqa: N806
        noise = torch.randn(batch, n, generator=generator, dtype=torch.float64)
        a = linear_policy(theta, s) + cfg.sigma * noise  # a ~ beta(.|s)
        s_next, r = lqr_step(s, a, cfg.action_cost)
        # The critic evaluates mu: the next action in the target is mu(s'), not a sample of beta.
        delta = td_error(r, quadratic_q(W, s_next, linear_policy(theta, s_next)),
                         quadratic_q(W, s, a), cfg.gamma)
        grad_a_q = grad_a_quadratic_q(W, s, linear_policy(theta, s))
        dpg_actor_update(theta, s, grad_a_q, cfg.alpha_theta)
        dpg_critic_update(W, s, a, delta, cfg.alpha_w)
        t = agents["t"] + 1
        done = t >= cfg.episode_length
        agents["s"] = torch.where(done[:, None], start_states(), s_next)
        agents["t"] = torch.where(done, torch.zeros_like(t), t)
        metrics = {"reward": r.mean(), "td_error": delta.abs().mean()}
        if k % cfg.log_every == 0 or k == cfg.steps:
            metrics.update(_lqr_scores(theta, cfg, theta_star, j_star))
        return metrics

    fit(run, step, total_steps=cfg.steps,
        objects={"model": tables, "agents": agents, "rng": generator},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress)
    theta = tables["theta"]
    scores = _lqr_scores(theta, cfg, theta_star, j_star)
    W_mu = lqr_q_matrix(theta, cfg.gamma, cfg.action_cost) \
        if lqr_stable(theta, cfg.gamma) else torch.full_like(tables["W"], float("nan"))  # noqa: N806
    run.save_figure(_lqr_figure(run, theta, theta_star), "policy.png")
    run.write_summary({**{f"eval/{k}": v for k, v in scores.items()},
                       "eval/objective": j_star - scores["objective_gap"],
                       "eval/objective_optimal": j_star, "eval/theta_optimal": theta_star.tolist(),
                       "eval/critic_error": (tables["W"] - W_mu).abs().max().item(),
                       "train/theta": theta.tolist(), "train/steps": cfg.steps,
                       "train/transitions": cfg.steps * batch})
    return run


def _lqr_figure(run: Run, theta: torch.Tensor, theta_star: torch.Tensor):
    """Learning curves beside the learned policy mu(s) and the optimal one."""
    from mlatlas.core.plots import plt

    rows = [r for r in run.metrics if "objective_gap" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    steps = [r["step"] for r in rows]
    left.semilogy(steps, [max(r["objective_gap"], 1e-12) for r in rows],
                  label="J(theta*) - J(theta)")
    left.semilogy(steps, [max(r["theta_error"], 1e-12) for r in rows],
                  label="max |theta - theta*|")
    left.set_xlabel("step")
    left.legend()
    left.set_title("deterministic actor-critic on the LQR")
    grid = torch.linspace(-1, 1, 7, dtype=torch.float64)
    if theta.shape[0] == 1:
        for gain, style, name in ((theta, "-", "learned mu(s)"), (theta_star, "--", "optimal")):
            right.plot(grid, (grid * gain[0, 0]).numpy(), style, label=name)
        right.set_xlabel("s")
        right.set_ylabel("a")
        right.legend()
    else:
        # The first two coordinates of mu(s), s in the plane of the first two axes.
        x, y = torch.meshgrid(grid, grid, indexing="xy")
        s = torch.zeros(x.numel(), theta.shape[0], dtype=torch.float64)
        s[:, 0], s[:, 1] = x.reshape(-1), y.reshape(-1)
        # The optimal field is drawn wide and pale underneath, so the learned one shows on it.
        for gain, color, width, name in ((theta_star, "0.75", 0.016, "optimal"),
                                         (theta, "C0", 0.005, "learned")):
            a = linear_policy(gain, s)
            right.quiver(s[:, 0], s[:, 1], a[:, 0], a[:, 1], angles="xy", scale_units="xy",
                         scale=2, color=color, width=width, label=name)
        right.set_aspect("equal")
        right.legend(loc="upper right")
        right.set_xlabel("s_1 (arrows: a / 2)")
        right.set_ylabel("s_2")
    right.set_title("policy a = mu(s, theta)")
    fig.tight_layout()
    return fig


def evaluate_deterministic_ac(run: Run, n: int | None = None, seed: int = 0,
                              progress: bool | None = None) -> dict[str, Any]:
    """Score the theta of a deterministic_ac run's checkpoint exactly.

    The evaluation is exact: J(theta) in closed form against the Riccati optimum, so nothing is
    sampled and ``n`` and ``seed`` (accepted, as every method's ``evaluate`` accepts them) change
    nothing. Returns objective_gap and theta_error and writes them to summary.json under
    ``eval/``.
    """
    cfg = config_from_dict(DeterministicACConfig, run.config)
    theta = load_tensors(run.path(CHECKPOINT))["model.theta"]
    theta_star, P_star = lqr_optimal(cfg.dim, cfg.gamma, cfg.action_cost)  # noqa: N806
    scores = _lqr_scores(theta, cfg, theta_star,
                         -START_SECOND_MOMENT * torch.trace(P_star).item())
    run.write_summary({f"eval/{k}": v for k, v in scores.items()})
    return scores
