"""State values, action values and the Bellman equation (Zhao, Chapter 2).

For a policy pi, the state value v_pi(s) = E[G_t | S_t = s] satisfies the Bellman equation

    v_pi(s) = sum_a pi(a|s) [ r(s, a) + gamma sum_s' p(s'|s, a) v_pi(s') ],

in matrix-vector form (eq. 2.9) v_pi = r_pi + gamma P_pi v_pi with
r_pi(s) = sum_a pi(a|s) r(s, a) and [P_pi]_{s s'} = sum_a pi(a|s) p(s'|s, a). Its solution is

    closed form (eq. 2.10):   v_pi = (I - gamma P_pi)^{-1} r_pi,
    iterative (eq. 2.11):     v_{k+1} = r_pi + gamma P_pi v_k,  v_k -> v_pi as k -> inf,

the iteration converging because ||v_{k+1} - v_pi|| <= gamma ||v_k - v_pi||. Action values
follow from state values (eq. 2.14): q_pi(s, a) = r(s, a) + gamma sum_s' p(s'|s, a) v_pi(s').

``mlatlas train bellman --policy uniform`` evaluates a policy (``uniform`` or one letter per
cell) both ways and writes its values and figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlatlas.core.run import Run, fit
from mlatlas.rl.tabular.common import GridConfig, finish, make_world
from mlatlas.rl.tabular.gridworld import TabularModel, parse_policy


def reward_pi(model: TabularModel, pi: torch.Tensor) -> torch.Tensor:
    """r_pi(s) = sum_a pi(a|s) r(s, a)."""
    return (pi * model.reward).sum(dim=1)


def transition_pi(model: TabularModel, pi: torch.Tensor) -> torch.Tensor:
    """[P_pi]_{s s'} = sum_a pi(a|s) p(s'|s, a), dense (S, S)."""
    P_pi = torch.zeros(model.n_states, model.n_states, dtype=pi.dtype)
    return P_pi.scatter_add_(1, model.next_state, pi)


def expected_next_value(model: TabularModel, pi: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(P_pi v)(s) = sum_a pi(a|s) v(s'(s, a)) without forming P_pi: one gather per sweep."""
    return (pi * v[model.next_state]).sum(dim=1)


def action_values(model: TabularModel, v: torch.Tensor, gamma: float) -> torch.Tensor:
    """q(s, a) = r(s, a) + gamma v(s'(s, a)) (eq. 2.14)."""
    return model.reward + gamma * v[model.next_state]


def evaluate_closed_form(model: TabularModel, pi: torch.Tensor, gamma: float) -> torch.Tensor:
    """v_pi = (I - gamma P_pi)^{-1} r_pi, by a linear solve (eq. 2.10)."""
    identity = torch.eye(model.n_states, dtype=pi.dtype)
    return torch.linalg.solve(identity - gamma * transition_pi(model, pi), reward_pi(model, pi))


def bellman_step(model: TabularModel, pi: torch.Tensor, v: torch.Tensor,
                 gamma: float) -> torch.Tensor:
    """One sweep of eq. 2.11: v_{k+1} = r_pi + gamma P_pi v_k."""
    return reward_pi(model, pi) + gamma * expected_next_value(model, pi, v)


def evaluate_iterative(model: TabularModel, pi: torch.Tensor, gamma: float, *,
                       tol: float = 1e-10, max_iters: int = 100_000,
                       v0: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Iterate eq. 2.11 from v0 (zeros) until max_s |v_{k+1} - v_k| < tol; returns (v, k)."""
    v = torch.zeros(model.n_states, dtype=pi.dtype) if v0 is None else v0.clone()
    for k in range(1, max_iters + 1):
        v_next = bellman_step(model, pi, v, gamma)
        delta = (v_next - v).abs().max().item()
        v = v_next
        if delta < tol:
            return v, k
    return v, max_iters


@dataclass
class Config(GridConfig):
    policy: str = "uniform"
    """The policy to evaluate: 'uniform', or one letter (u r d l s) per cell with rows separated
    by '/', e.g. 'rd/ds' on the 2x2 grid."""
    tol: float = 1e-10
    """Stop iterating when max_s |v_{k+1}(s) - v_k(s)| falls below this."""
    steps: int = 10_000
    """Most sweeps of the iterative solution."""

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_policy(self.policy, make_world(self))


def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    run = run or Run.create("bellman", cfg)
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

    fit(run, step, total_steps=cfg.steps, objects={"tables": tables}, log_every=cfg.log_every,
        ckpt_every=cfg.ckpt_every, progress=progress, until=lambda m: m["delta"] < cfg.tol)
    v = tables["v"]
    finish(run, cfg, world, values=v, policy=pi, title=f"v_pi for policy {cfg.policy!r}",
           extra={"max_abs_error_vs_closed_form": (v - v_exact).abs().max().item()}, score=False)
    return run
