"""The Bellman equation and the Bellman optimality equation, solved exactly (Zhao, Ch. 2-3).

For a policy pi, the state value v_pi(s) = E[G_t | S_t = s] satisfies the Bellman equation

    v_pi(s) = sum_a pi(a|s) [ r(s, a) + gamma sum_s' p(s'|s, a) v_pi(s') ],

in matrix-vector form (eq. 2.9) v_pi = r_pi + gamma P_pi v_pi with
r_pi(s) = sum_a pi(a|s) r(s, a) and [P_pi]_{s s'} = sum_a pi(a|s) p(s'|s, a). Its solution is

    closed form (eq. 2.10):   v_pi = (I - gamma P_pi)^{-1} r_pi,
    iterative (eq. 2.11):     v_{k+1} = r_pi + gamma P_pi v_k,  v_k -> v_pi as k -> inf,

the iteration converging because ||v_{k+1} - v_pi|| <= gamma ||v_k - v_pi||. Action values
follow from state values (eq. 2.14): q_pi(s, a) = r(s, a) + gamma sum_s' p(s'|s, a) v_pi(s').

The optimal state values v* solve the Bellman optimality equation (eq. 3.2)

    v = max_pi (r_pi + gamma P_pi v),   i.e.   v(s) = max_a q(s, a),  q = r + gamma P v,

whose right-hand side is a gamma-contraction, so v_{k+1} = max_a [r + gamma P v_k] converges to
v* from any v_0 (Theorem 3.2); Chapter 4 calls that iteration value iteration (Algorithm 4.1).

This module holds no method: every tabular method scores itself against :func:`exact_values`
and :func:`optimal_values`, and the command-line methods that iterate these equations step by
step (``bellman``, ``value_iteration``, ...) are in :mod:`mlatlas.rl.tabular.dp`.
:func:`bellman_optimality_backup` streams through the states in blocks that fit in the cache, one
action at a time, so q is never written to memory: a sweep moves little more than the model's
tables once, and a 1000x1000 grid (a million states) sweeps in about 10 ms on one core
(``benchmarks/value_iteration_bandwidth.py`` compares it with the machine's copy bandwidth).
"""

from __future__ import annotations

import functools

import torch

from mlatlas.rl.tabular.gridworld import TabularModel, greedy_policy

# The Bellman equation (Chapter 2) ------------------------------------------------------------


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


def exact_values(model: TabularModel, pi: torch.Tensor, gamma: float) -> torch.Tensor:
    """v_pi exactly: a linear solve on small grids, iteration to 1e-12 on large ones."""
    if model.n_states <= 2500:
        return evaluate_closed_form(model, pi, gamma)
    return evaluate_iterative(model, pi, gamma, tol=1e-12)[0]


# The Bellman optimality equation (Chapter 3) -------------------------------------------------

BLOCK = 131_072  # states per block: a few (A, block) slices stay within a 2 MB cache


def bellman_optimality_backup(model: TabularModel, v: torch.Tensor, gamma: float,
                              out: torch.Tensor | None = None) -> torch.Tensor:
    """v_{k+1}(s) = max_a [r(s, a) + gamma v_k(s'(s, a))] without materialising q.

    The same numbers as ``action_values(model, v, gamma).max(dim=1).values``; blocks of states
    and one action at a time keep the intermediate in cache, which makes large sweeps about 4x
    faster.
    """
    next_state, reward = model.by_action
    out = torch.empty_like(v) if out is None else out
    buffer = torch.empty(min(BLOCK, v.shape[0]), dtype=v.dtype)
    for i in range(0, v.shape[0], BLOCK):
        j = min(i + BLOCK, v.shape[0])
        best, q_a = out[i:j], buffer[:j - i]
        for a in range(model.n_actions):
            torch.index_select(v, 0, next_state[a, i:j], out=q_a)
            torch.add(reward[a, i:j], q_a, alpha=gamma, out=best if a == 0 else q_a)
            if a:
                torch.maximum(best, q_a, out=best)
    return out


def value_iteration(model: TabularModel, gamma: float, *, tol: float = 1e-10,
                    max_iters: int = 100_000, v0: torch.Tensor | None = None):
    """Iterate the contraction of eq. 3.2 (Algorithm 4.1) until max_s |v_{k+1} - v_k| < tol;
    returns (v, pi, iterations) with pi greedy in the final q."""
    v = torch.zeros(model.n_states, dtype=model.reward.dtype) if v0 is None else v0.clone()
    v_next = torch.empty_like(v)
    k = 0
    while k < max_iters:
        k += 1
        bellman_optimality_backup(model, v, gamma, out=v_next)
        delta = (v_next - v).abs().max().item()
        v, v_next = v_next, v
        if delta < tol:
            break
    return v, greedy_policy(action_values(model, v, gamma)), k


def optimal_values(model: TabularModel, gamma: float) -> torch.Tensor:
    """v* by value iteration to 1e-12; a copy, so callers may change it."""
    return _optimal_values(model, gamma).clone()


@functools.lru_cache(maxsize=8)
def _optimal_values(model: TabularModel, gamma: float) -> torch.Tensor:
    # A run asks for v* when it starts (to log its error) and again when it scores its policy.
    return value_iteration(model, gamma, tol=1e-12)[0]
