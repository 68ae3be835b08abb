"""Dynamic programming on the grid world's model (Zhao, Chapters 2 and 4): iterative policy
evaluation, value iteration, policy iteration and truncated policy iteration.

The equations are in :mod:`mlatlas.rl.tabular.bellman`; the methods here iterate them one sweep
per step, so metrics.csv records the convergence. With q_k(s, a) = r(s, a) + gamma sum_s'
p(s'|s, a) v_k(s'):

- policy evaluation (``bellman``, eq. 2.11): v_{k+1} = r_pi + gamma P_pi v_k for a given pi,
  checked against the closed form v_pi = (I - gamma P_pi)^{-1} r_pi (eq. 2.10).
- value iteration (Algorithm 4.1): policy update pi_{k+1}(s) = argmax_a q_k(s, a), value update
  v_{k+1}(s) = max_a q_k(s, a); v_k converges to v* geometrically (contraction, Theorem 3.2).
- policy iteration (Algorithm 4.2): policy evaluation v_{pi_k} = r_{pi_k} + gamma P_{pi_k} v_{pi_k}
  solved exactly, then policy improvement pi_{k+1} = argmax_pi (r_pi + gamma P_pi v_{pi_k});
  v_{pi_k} increases monotonically to v* and the policy stops changing after finitely many steps.
- truncated policy iteration (Algorithm 4.3): the evaluation step runs only j sweeps
  v^{(j+1)} = r_{pi_k} + gamma P_{pi_k} v^{(j)}, starting from v_{k-1}; j = 1 is value
  iteration and j -> inf policy iteration (Section 4.3).

Every sweep is a gather over the next-state table and a max over actions, with no Python loop
over states. A step of every method here is one iteration (one sweep, or one evaluation and
improvement); the runs stop once the values stop moving and the policy stops changing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mlatlas.core.config import require_at_least
from mlatlas.core.run import Run, fit
from mlatlas.rl.tabular.bellman import (
    action_values,
    bellman_step,
    evaluate_closed_form,
    exact_values,
    optimal_values,
)
from mlatlas.rl.tabular.common import GridConfig, finish, make_world
from mlatlas.rl.tabular.gridworld import (
    STAY,
    TabularModel,
    deterministic_policy,
    greedy_policy,
    parse_policy,
)


def value_iteration_step(model: TabularModel, v: torch.Tensor,
                         gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of Algorithm 4.1: returns (v_{k+1}, q_k) with v_{k+1}(s) = max_a q_k(s, a)."""
    q = action_values(model, v, gamma)
    return q.max(dim=1).values, q


def policy_iteration_step(model: TabularModel, pi: torch.Tensor, v: torch.Tensor, gamma: float,
                          sweeps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate pi (exactly, or by ``sweeps`` Bellman sweeps from v), then improve it greedily.

    Returns (v_{pi_k} or its truncated estimate, pi_{k+1}).
    """
    if sweeps is None:
        v = exact_values(model, pi, gamma)
    else:
        for _ in range(sweeps):
            v = bellman_step(model, pi, v, gamma)
    return v, greedy_policy(action_values(model, v, gamma))


def truncated_policy_iteration(model: TabularModel, gamma: float, sweeps: int | None, *,
                               tol: float = 1e-10, max_iters: int = 100_000,
                               pi0: torch.Tensor | None = None):
    """Algorithm 4.3 (``sweeps=None`` gives Algorithm 4.2, policy iteration).

    The initial policy pi0 defaults to 'stay' everywhere. Stops when the value estimate moves by
    less than tol and the policy no longer changes; returns (v, pi, iterations).
    """
    n_states = model.n_states
    v = torch.zeros(n_states, dtype=model.reward.dtype)
    pi = pi0 if pi0 is not None else deterministic_policy(torch.full((n_states,), STAY))
    k = 0
    while k < max_iters:
        k += 1
        v_next, pi_next = policy_iteration_step(model, pi, v, gamma, sweeps)
        converged = (v_next - v).abs().max().item() < tol and torch.equal(pi_next, pi)
        v, pi = v_next, pi_next
        if converged:
            break
    return v, pi, k


def policy_iteration(model: TabularModel, gamma: float, **kwargs):
    """Algorithm 4.2: truncated policy iteration with exact policy evaluation."""
    return truncated_policy_iteration(model, gamma, None, **kwargs)


# Command-line methods ------------------------------------------------------------------------


@dataclass
class BellmanConfig(GridConfig):
    METHOD: ClassVar[str] = "bellman"

    policy: str = "uniform"
    """The policy to evaluate: 'uniform', or one letter (u r d l s) per cell with rows separated
    by '/', e.g. 'rd/ds' on the 2x2 grid."""
    tol: float = 1e-10
    """Stop iterating when max_s |v_{k+1}(s) - v_k(s)| falls below this."""
    steps: int = 10_000
    """Most sweeps of the iterative solution."""
    log_every: int = 50
    """Write a row of metrics.csv every this many sweeps."""
    ckpt_every: int = 500
    """Write checkpoint.safetensors every this many sweeps (and always at the end)."""

    def check_data(self) -> None:
        super().check_data()
        parse_policy(self.policy, make_world(self))


@dataclass
class ValueIterationConfig(GridConfig):
    METHOD: ClassVar[str] = "value_iteration"

    tol: float = 1e-10
    """Stop when max_s |v_{k+1}(s) - v_k(s)| falls below this."""
    steps: int = 10_000
    """Most iterations."""
    log_every: int = 1
    """Write a row of metrics.csv every this many iterations."""
    ckpt_every: int = 500
    """Write checkpoint.safetensors every this many iterations (and always at the end)."""


@dataclass
class PolicyIterationConfig(GridConfig):
    METHOD: ClassVar[str] = "policy_iteration"

    tol: float = 1e-10
    """Stop when max_s |v_{k+1}(s) - v_k(s)| falls below this."""
    steps: int = 1000
    """Most iterations (policy iteration needs a handful)."""
    log_every: int = 1
    """Write a row of metrics.csv every this many iterations."""
    ckpt_every: int = 500
    """Write checkpoint.safetensors every this many iterations (and always at the end)."""


@dataclass
class TruncatedPolicyIterationConfig(GridConfig):
    METHOD: ClassVar[str] = "truncated_policy_iteration"

    sweeps: int = 5
    """j_truncate: Bellman sweeps per policy evaluation (1 is value iteration)."""
    tol: float = 1e-10
    """Stop when max_s |v_{k+1}(s) - v_k(s)| falls below this."""
    steps: int = 10_000
    """Most iterations."""
    log_every: int = 1
    """Write a row of metrics.csv every this many iterations."""
    ckpt_every: int = 500
    """Write checkpoint.safetensors every this many iterations (and always at the end)."""

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "sweeps")


def train_bellman(cfg: BellmanConfig, run: Run | None = None,
                  progress: bool | None = None) -> Run:
    """Policy evaluation of a given policy by eq. 2.11, one sweep per step, against eq. 2.10."""
    run = run or Run.create(cfg.METHOD, cfg)
    world = make_world(cfg)
    model = world.model
    pi = parse_policy(cfg.policy, world)
    v_exact = evaluate_closed_form(model, pi, cfg.gamma)
    tables = {"v": torch.zeros(model.n_states, dtype=torch.float64)}

    def step(k: int) -> dict[str, float]:
        v_next = bellman_step(model, pi, tables["v"], cfg.gamma)
        delta = (v_next - tables["v"]).abs().max()
        tables["v"] = v_next
        return {"delta": delta, "error_vs_closed_form": (v_next - v_exact).abs().max()}

    last = fit(run, step, total_steps=cfg.steps, objects={"model": tables},
               log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress,
               until=lambda m: m["delta"] < cfg.tol)
    v = tables["v"]
    finish(run, cfg, world, values=v, policy=pi, title=f"v_pi for policy {cfg.policy!r}",
           extra={"train/iterations": last,
                  "eval/max_abs_error_vs_closed_form": (v - v_exact).abs().max().item()},
           score=False)
    return run


def _train(cfg: GridConfig, run: Run | None, progress: bool | None, sweeps: int | None) -> Run:
    """The loop shared by the three control methods; ``sweeps`` 0 means value iteration."""
    run = run or Run.create(cfg.METHOD, cfg)
    world = make_world(cfg)
    model = world.model
    v_star = optimal_values(model, cfg.gamma)
    n = model.n_states
    tables = {"v": torch.zeros(n, dtype=torch.float64),
              "pi": deterministic_policy(torch.full((n,), STAY))}

    def step(k: int) -> dict[str, float]:
        v, pi = tables["v"], tables["pi"]
        if sweeps == 0:
            v_next, q = value_iteration_step(model, v, cfg.gamma)
            pi_next = greedy_policy(q)
        else:
            v_next, pi_next = policy_iteration_step(model, pi, v, cfg.gamma, sweeps)
        changed = (pi_next.argmax(1) != pi.argmax(1)).sum()
        tables["v"], tables["pi"] = v_next, pi_next
        return {"delta": (v_next - v).abs().max(), "policy_changes": changed,
                "error_vs_optimal": (v_next - v_star).abs().max()}

    last = fit(run, step, total_steps=cfg.steps, objects={"model": tables},
               log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress,
               until=lambda m: m["delta"] < cfg.tol and m["policy_changes"] == 0)
    finish(run, cfg, world, values=tables["v"], policy=tables["pi"],
           title=f"{cfg.METHOD}, gamma={cfg.gamma}", extra={"train/iterations": last})
    return run


def train_value_iteration(cfg: ValueIterationConfig, run: Run | None = None,
                          progress: bool | None = None) -> Run:
    return _train(cfg, run, progress, sweeps=0)


def train_policy_iteration(cfg: PolicyIterationConfig, run: Run | None = None,
                           progress: bool | None = None) -> Run:
    return _train(cfg, run, progress, sweeps=None)


def train_truncated_policy_iteration(cfg: TruncatedPolicyIterationConfig, run: Run | None = None,
                                     progress: bool | None = None) -> Run:
    return _train(cfg, run, progress, sweeps=cfg.sweeps)
