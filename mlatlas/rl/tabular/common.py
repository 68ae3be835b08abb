"""What every tabular method shares: the world's config fields and the files a run writes.

Every grid-world run writes ``values.csv`` (state values, one grid row per line, rows top to
bottom), ``policy.csv`` (the greedy action per cell), ``values.png`` (policy arrows beside a value
heat map) and ``summary.json``. The summary of a control method scores its policy against the
optimal one computed by value iteration on the same world:

- ``greedy_value_gap``: max_s v*(s) - v_greedy(s), where v_greedy is the exact value of the greedy
  policy derived from the method's result; 0 means the greedy policy is optimal;
- ``policy_optimal``: whether that gap is below 1e-6 (optimal policies need not be unique, so the
  comparison is by value, not by action).
"""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass
from typing import Any

import torch

from mlatlas.core.config import BaseConfig, ConfigError
from mlatlas.core.io import write_text
from mlatlas.core.run import Run
from mlatlas.rl.tabular.gridworld import (
    ACTIONS,
    GridWorld,
    TabularModel,
    deterministic_policy,
    greedy_policy,
)
from mlatlas.rl.tabular.plots import grid_figure

OPTIMAL_TOL = 1e-6


@dataclass
class GridConfig(BaseConfig):
    """The grid world's fields, shared by every tabular method."""

    grid: str = "book"
    """'book' (the 5x5 world of the book), '2x2', or a map: rows of '.' (ordinary), '#'
    (forbidden) and 'T' (target) separated by '/'."""
    gamma: float = 0.9
    """Discount rate."""
    r_boundary: float = -1.0
    """Reward for trying to leave the grid (the agent stays where it is)."""
    r_forbidden: float = -1.0
    """Reward for entering or staying in a forbidden cell."""
    r_target: float = 1.0
    """Reward for entering or staying in the target."""
    r_other: float = 0.0
    """Reward for any other move."""
    terminal_target: bool = False
    """End episodes at the target (the TD chapter's path-finding variant)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.gamma < 1.0:
            raise ConfigError(f"--gamma must be in [0, 1), got {self.gamma}")
        make_world(self)


def make_world(cfg: GridConfig) -> GridWorld:
    return GridWorld.parse(cfg.grid, r_boundary=cfg.r_boundary, r_forbidden=cfg.r_forbidden,
                           r_target=cfg.r_target, r_other=cfg.r_other,
                           terminal_target=cfg.terminal_target)


def exact_values(model: TabularModel, pi: torch.Tensor, gamma: float) -> torch.Tensor:
    """v_pi exactly: a linear solve on small grids, iteration to 1e-12 on large ones."""
    from mlatlas.rl.tabular.bellman import evaluate_closed_form, evaluate_iterative

    if model.n_states <= 2500:
        return evaluate_closed_form(model, pi, gamma)
    return evaluate_iterative(model, pi, gamma, tol=1e-12)[0]


def optimal_values(model: TabularModel, gamma: float) -> torch.Tensor:
    """v* by value iteration to 1e-12; a copy, so callers may change it."""
    return _optimal_values(model, gamma).clone()


@functools.lru_cache(maxsize=8)
def _optimal_values(model: TabularModel, gamma: float) -> torch.Tensor:
    # A run asks for v* when it starts (to log its error) and again when it scores its policy.
    from mlatlas.rl.tabular.dp import value_iteration

    return value_iteration(model, gamma, tol=1e-12)[0]


def policy_score(world: GridWorld, pi: torch.Tensor, gamma: float) -> dict[str, Any]:
    """How far the greedy version of ``pi`` is from optimal, by exact state values."""
    model = world.model
    greedy = greedy_policy(pi.double())
    # Clamped at 0: an optimal policy's gap is a rounding error of either sign.
    gap = max(0.0, (optimal_values(model, gamma) - exact_values(model, greedy, gamma)).max().item())
    return {"greedy_value_gap": gap, "policy_optimal": gap < OPTIMAL_TOL}


def grid_csv(world: GridWorld, cells: list[Any]) -> str:
    n_cols = world.shape[1]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(
        cells[i:i + n_cols] for i in range(0, len(cells), n_cols))
    return buffer.getvalue()


def finish(run: Run, cfg: GridConfig, world: GridWorld, *, values: torch.Tensor,
           policy: torch.Tensor, title: str, extra: dict[str, Any] | None = None,
           score: bool = True) -> None:
    """Write values.csv, policy.csv, values.png and summary.json for a grid-world run.

    ``values`` are the method's state-value estimates; ``policy`` its pi(a|s) (the greedy action
    of each row goes to policy.csv). Prediction methods, which evaluate a given policy rather
    than improve one, pass ``score=False``: the greedy version of, say, the uniform policy says
    nothing about them.
    """
    values = values.detach().double().cpu()
    policy = policy.detach().double().cpu()
    write_text(run.path("values.csv"), grid_csv(world, [f"{v:.6f}" for v in values.tolist()]))
    actions = [ACTIONS[a] for a in policy.argmax(dim=1).tolist()]
    write_text(run.path("policy.csv"), grid_csv(world, actions))
    run.save_figure(grid_figure(world, values, policy, title), "values.png")
    run.write_summary({**(policy_score(world, policy, cfg.gamma) if score else {}),
                       **(extra or {})})


def read_policy(run: Run, world: GridWorld) -> torch.Tensor:
    """The greedy policy a finished run wrote to policy.csv."""
    path = run.path("policy.csv")
    if not path.is_file():
        raise ConfigError(f"{run.dir} has no policy.csv; has the run finished?")
    with path.open(newline="") as f:
        names = [name for row in csv.reader(f) for name in row]
    if len(names) != world.n_states or any(n not in ACTIONS for n in names):
        raise ConfigError(f"{path} does not describe a policy on the {world.shape} grid")
    return deterministic_policy(torch.tensor([ACTIONS.index(n) for n in names]))


def evaluate(run: Run, n: int, seed: int, progress: bool | None = None) -> dict[str, Any]:
    """Score a finished run's greedy policy exactly (``n`` and ``seed`` are not needed)."""
    from mlatlas.core.config import config_from_dict
    from mlatlas.registry import get_method

    cfg = config_from_dict(get_method(run.method).config_cls, run.config)
    world = make_world(cfg)
    pi = read_policy(run, world)
    v = exact_values(world.model, pi, cfg.gamma)
    return {**policy_score(world, pi, cfg.gamma), "mean_state_value": v.mean().item()}
