"""What every grid-world method shares: the world's config fields, the exact scores of a policy
and the files a run writes. It imports no method module (only the world and the exact solutions
of :mod:`mlatlas.rl.tabular.bellman`), so every method can import it.

Every grid-world run writes ``values.csv`` (state values, one grid row per line, rows top to
bottom), ``policy.csv`` (the greedy action per cell), ``values.png`` (policy arrows beside a value
heat map) and ``summary.json``. A control method's summary scores its policy against the optimal
one computed by value iteration on the same world:

- ``eval/greedy_value_gap``: max_s v*(s) - v_greedy(s), where v_greedy is the exact value of the
  greedy policy derived from the method's result; 0 means the greedy policy is optimal;
- ``eval/policy_optimal``: whether that gap is below 1e-6 (optimal policies need not be unique, so
  the comparison is by value, not by action).

The other keys carry ``train/`` (what training did: iterations, episodes, ...) or ``eval/`` (the
scores of the trained values and policy).
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mlatlas.core.config import BaseConfig, ConfigError
from mlatlas.core.io import write_text
from mlatlas.core.run import Run
from mlatlas.rl.tabular.bellman import exact_values, optimal_values
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
    """The grid world's fields, shared by every tabular method.

    The grid map is the config's own string, so reading it costs nothing: :meth:`check` calls
    :meth:`check_data`, and a Python caller hears of a bad map, start cell or policy when the
    config is made, as the command line does before it makes a run folder. Methods extend
    :meth:`check_data` with the cells and policies they name, checked against the world.
    """

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

    def check(self) -> None:
        super().check()
        if not 0.0 <= self.gamma < 1.0:
            raise ConfigError(f"--gamma must be in [0, 1), got {self.gamma}")
        self.check_data()

    def check_data(self) -> None:
        """The grid map can be read (a GridError, naming the closest preset, if not)."""
        super().check_data()
        make_world(self)


GRID_FIELDS = tuple(f.name for f in dataclasses.fields(GridConfig)
                    if f.name not in {g.name for g in dataclasses.fields(BaseConfig)})


def make_world(cfg: GridConfig) -> GridWorld:
    return GridWorld.parse(cfg.grid, r_boundary=cfg.r_boundary, r_forbidden=cfg.r_forbidden,
                           r_target=cfg.r_target, r_other=cfg.r_other,
                           terminal_target=cfg.terminal_target)


def grid_config(config: Mapping[str, Any]) -> GridConfig:
    """The world's fields of a run's ``config.json`` (any tabular method's) as a GridConfig."""
    return GridConfig(**{name: config[name] for name in GRID_FIELDS})


# Exact scores -------------------------------------------------------------------------------


def greedy_value_gap(model: TabularModel, q: torch.Tensor, v_star: torch.Tensor,
                     gamma: float) -> torch.Tensor:
    """max_s v*(s) - v_greedy(s) for the greedy policy of q (0 when it is optimal).

    ``q`` is (S, A): action values, a policy pi(a|s) or softmax preferences; the greedy policy
    takes each row's argmax (the first on ties). The gap is clamped at 0: an optimal policy's
    gap is a rounding error of either sign.
    """
    return (v_star - exact_values(model, greedy_policy(q), gamma)).max().clamp(min=0)


def policy_score(world: GridWorld, pi: torch.Tensor, gamma: float) -> dict[str, Any]:
    """How far the greedy version of ``pi`` is from optimal, by exact state values."""
    model = world.model
    gap = greedy_value_gap(model, pi.double(), optimal_values(model, gamma), gamma).item()
    return {"greedy_value_gap": gap, "policy_optimal": gap < OPTIMAL_TOL}


def rmse(estimate: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """sqrt(mean_s (estimate(s) - truth(s))^2), the book's "state value error (RMSE)"."""
    return (estimate - truth).square().mean().sqrt()


# The run's files ----------------------------------------------------------------------------


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
    of each row goes to policy.csv). ``extra`` holds the method's own summary keys, each with its
    ``train/`` or ``eval/`` prefix. Prediction methods, which evaluate a given policy rather than
    improve one, pass ``score=False``: the greedy version of, say, the uniform policy says
    nothing about them.
    """
    values = values.detach().double().cpu()
    policy = policy.detach().double().cpu()
    write_text(run.path("values.csv"), grid_csv(world, [f"{v:.6f}" for v in values.tolist()]))
    actions = [ACTIONS[a] for a in policy.argmax(dim=1).tolist()]
    write_text(run.path("policy.csv"), grid_csv(world, actions))
    run.save_figure(grid_figure(world, values, policy, title), "values.png")
    scores = policy_score(world, policy, cfg.gamma) if score else {}
    run.write_summary({**{f"eval/{k}": v for k, v in scores.items()}, **(extra or {})})


def read_policy(run: Run, world: GridWorld) -> torch.Tensor:
    """The greedy policy a finished run wrote to policy.csv."""
    path = run.path("policy.csv")
    if not path.is_file():
        raise ConfigError(f"{run.dir} has no policy.csv; has the run finished?")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            names = [name for row in csv.reader(f) for name in row]
    except (UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"{path} is damaged: {err}") from None
    if len(names) != world.n_states or any(n not in ACTIONS for n in names):
        raise ConfigError(f"{path} does not describe a policy on the {world.shape} grid")
    return deterministic_policy(torch.tensor([ACTIONS.index(n) for n in names]))


def evaluate(run: Run, n: int | None = None, seed: int = 0,
             progress: bool | None = None) -> dict[str, Any]:
    """Score a finished run's greedy policy (its policy.csv) exactly.

    The evaluation is exact: the policy's state values come from the closed form and v* from
    value iteration, so nothing is sampled and ``n`` and ``seed`` (accepted, as every method's
    ``evaluate`` accepts them) change nothing. Returns greedy_value_gap, policy_optimal and
    mean_state_value (the mean over states of v_greedy) and writes them to summary.json under
    ``eval/``.
    """
    cfg = grid_config(run.config)
    world = make_world(cfg)
    pi = read_policy(run, world)
    v = exact_values(world.model, pi, cfg.gamma)
    metrics = {**policy_score(world, pi, cfg.gamma), "mean_state_value": v.mean().item()}
    run.write_summary({f"eval/{k}": value for k, value in metrics.items()})
    return metrics
