"""The grid world of Zhao's "Mathematical Foundations of Reinforcement Learning" (Chapter 1).

A state is a cell s = (row, col); figures number rows and columns from 1, code indexes states
s = (row - 1) * n_cols + (col - 1). The action set is A = {up, right, down, left, stay}
(a_1..a_5 in the book). The model is deterministic, p(s'|s, a) = 1 for one s', and the reward
of a move depends on where it ends:

- off the grid: the agent stays in s and receives r_boundary;
- into (or staying in) a forbidden cell: the agent enters it and receives r_forbidden;
- into (or staying in) the target: r_target;
- anywhere else: r_other.

The target is not absorbing in the chapters on state values, dynamic programming, Monte Carlo and
function approximation. The TD chapter's path-finding examples end an episode on reaching the
target (``terminal_target=True``); the model then makes the target absorbing with zero reward, so
v(target) = 0 and dynamic programming agrees with the episodic returns.

:class:`TabularModel` holds the model as tensors: ``next_state[s, a]`` (the s' with
p(s'|s, a) = 1), ``reward[s, a]`` (r(s, a), the expected immediate reward) and ``P[s, a, s']`` on
demand. Its :meth:`TabularModel.step` advances a whole batch of states at once; sampling methods
use it to run many episodes side by side. The gymnasium environment in
:mod:`mlatlas.rl.tabular.env` wraps the same model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from mlatlas.core.config import ConfigError, closest

ACTIONS = ("up", "right", "down", "left", "stay")
# (d_row, d_col) of each action; rows grow downwards as in the book's figures.
MOVES = ((-1, 0), (0, 1), (1, 0), (0, -1), (0, 0))
STAY = ACTIONS.index("stay")

# Maps use '.' for an ordinary cell, '#' for a forbidden one and 'T' for a target; rows are
# separated by '/' (or new lines).
GRIDS = {
    # The 5x5 world used from Chapter 2 on: forbidden (2,2) (2,3) (3,3) (4,2) (4,4) (5,2),
    # target (4,3).
    "book": "...../.##../..#../.#T#./.#...",
    # The 2x2 worked examples of Chapters 2 and 4: s1 s2 / s3 s4, s2 forbidden, s4 the target.
    "2x2": ".#/.T",
}
CELL_CODES = {".": 0, "#": 1, "T": 2}


class GridError(ConfigError):
    """A grid map or policy string that cannot be read."""


@dataclass(frozen=True)
class GridWorld:
    """A rectangular grid: ``kinds[r][c]`` is 0 (ordinary), 1 (forbidden) or 2 (target)."""

    kinds: tuple[tuple[int, ...], ...]
    r_boundary: float = -1.0
    r_forbidden: float = -1.0
    r_target: float = 1.0
    r_other: float = 0.0
    terminal_target: bool = False

    @classmethod
    def parse(cls, grid: str = "book", **rewards) -> GridWorld:
        """A world from a preset name (``book``, ``2x2``) or a map such as ``'.#/.T'``."""
        text = GRIDS.get(grid, grid)
        rows = [r.strip() for r in text.replace("\n", "/").split("/") if r.strip()]
        if not rows or any(c not in CELL_CODES for r in rows for c in r):
            hint = closest(grid, GRIDS) if all(c.isalnum() or c in "-_" for c in grid) else ""
            raise GridError(f"cannot read grid {grid!r}{hint}: give a preset "
                            f"({', '.join(GRIDS)}) or rows of '.', '#', 'T' separated by '/'")
        if len({len(r) for r in rows}) != 1:
            raise GridError(f"grid {grid!r}: rows have different lengths "
                            f"{[len(r) for r in rows]}")
        return cls(tuple(tuple(CELL_CODES[c] for c in r) for r in rows), **rewards)

    @classmethod
    def from_cells(cls, n_rows: int, n_cols: int, forbidden=(), target=((1, 1),),
                   **rewards) -> GridWorld:
        """A world from lists of 1-based (row, col) cells, as the book writes them."""
        kinds = [[0] * n_cols for _ in range(n_rows)]
        for code, cells in ((1, forbidden), (2, target)):
            for row, col in cells:
                if not (1 <= row <= n_rows and 1 <= col <= n_cols):
                    raise GridError(f"cell ({row},{col}) is outside the {n_rows}x{n_cols} grid")
                kinds[row - 1][col - 1] = code
        return cls(tuple(map(tuple, kinds)), **rewards)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.kinds), len(self.kinds[0])

    @property
    def n_states(self) -> int:
        return self.shape[0] * self.shape[1]

    def state(self, row: int, col: int) -> int:
        """The state index of the 1-based cell (row, col)."""
        return (row - 1) * self.shape[1] + (col - 1)

    def cell(self, s: int) -> tuple[int, int]:
        """The 1-based (row, col) of state s."""
        row, col = divmod(int(s), self.shape[1])
        return row + 1, col + 1

    def to_map(self) -> str:
        codes = {v: k for k, v in CELL_CODES.items()}
        return "/".join("".join(codes[k] for k in row) for row in self.kinds)

    @cached_property
    def model(self) -> TabularModel:
        return TabularModel.from_grid(self)


@dataclass(frozen=True, eq=False)
class TabularModel:
    """p(s'|s, a) and r(s, a) of a deterministic finite MDP, as tensors.

    ``next_state``: (S, A) int64; ``reward``: (S, A) float64; ``terminal``: (S,) bool, the states
    at which an episode ends (absorbing, zero reward, so their value is 0).
    """

    next_state: torch.Tensor
    reward: torch.Tensor
    terminal: torch.Tensor

    @classmethod
    def from_grid(cls, world: GridWorld, dtype: torch.dtype = torch.float64) -> TabularModel:
        n_rows, n_cols = world.shape
        kinds = torch.tensor(world.kinds, dtype=torch.int64).flatten()
        row = torch.arange(n_rows).repeat_interleave(n_cols)[:, None]
        col = torch.arange(n_cols).repeat(n_rows)[:, None]
        d_row, d_col = (torch.tensor(m)[None, :] for m in zip(*MOVES, strict=True))
        new_row, new_col = row + d_row, col + d_col
        off = (new_row < 0) | (new_row >= n_rows) | (new_col < 0) | (new_col >= n_cols)
        s = (row * n_cols + col).expand_as(off)
        next_state = torch.where(off, s, new_row.clamp(0, n_rows - 1) * n_cols
                                 + new_col.clamp(0, n_cols - 1))
        by_kind = torch.tensor([world.r_other, world.r_forbidden, world.r_target], dtype=dtype)
        reward = torch.where(off, torch.tensor(world.r_boundary, dtype=dtype),
                             by_kind[kinds[next_state]])
        terminal = (kinds == 2) if world.terminal_target else torch.zeros_like(kinds, dtype=bool)
        next_state = torch.where(terminal[:, None], s, next_state)
        reward = torch.where(terminal[:, None], torch.zeros((), dtype=dtype), reward)
        return cls(next_state, reward, terminal)

    @property
    def n_states(self) -> int:
        return self.next_state.shape[0]

    @property
    def n_actions(self) -> int:
        return self.next_state.shape[1]

    @property
    def P(self) -> torch.Tensor:  # noqa: N802 (the book's symbol)
        """p(s'|s, a) as a dense (S, A, S) tensor; only for small state spaces."""
        P = torch.zeros(self.n_states, self.n_actions, self.n_states, dtype=self.reward.dtype)
        P.scatter_(2, self.next_state[..., None], 1.0)
        return P

    @cached_property
    def by_action(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(next_state, reward) transposed to (A, S): each action's row is contiguous, which is
        the layout the blocked dynamic-programming sweeps stream through."""
        return self.next_state.T.contiguous(), self.reward.T.contiguous()

    def step(self, s: torch.Tensor, a: torch.Tensor):
        """One transition for a batch: returns (s', r, terminated) for states s and actions a."""
        s_next = self.next_state[s, a]
        return s_next, self.reward[s, a], self.terminal[s_next]


# Policies ------------------------------------------------------------------------------------
# A policy is a tensor pi[s, a] = pi(a|s) whose rows sum to one.

POLICY_LETTERS = {"u": 0, "r": 1, "d": 2, "l": 3, "s": 4}


def uniform_policy(n_states: int, n_actions: int = len(ACTIONS),
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.full((n_states, n_actions), 1.0 / n_actions, dtype=dtype)


def deterministic_policy(actions: torch.Tensor, n_actions: int = len(ACTIONS),
                         dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """pi(a|s) = 1 for a = actions[s]."""
    return torch.nn.functional.one_hot(actions, n_actions).to(dtype)


def greedy_policy(q: torch.Tensor) -> torch.Tensor:
    """pi(a|s) = 1 for a = argmax_a q(s, a); ties go to the first action, as in the book."""
    return deterministic_policy(q.argmax(dim=1), q.shape[1], q.dtype)


def epsilon_greedy_policy(q: torch.Tensor, epsilon: float) -> torch.Tensor:
    """pi(a|s) = 1 - eps (|A| - 1) / |A| for the greedy action and eps / |A| for the others."""
    n_actions = q.shape[1]
    return (1 - epsilon) * greedy_policy(q) + epsilon / n_actions


def parse_policy(spec: str, world: GridWorld) -> torch.Tensor:
    """A policy from ``uniform`` or one letter per cell (u r d l s), rows separated by '/'."""
    if spec == "uniform":
        return uniform_policy(world.n_states)
    rows = [r.strip() for r in spec.replace("\n", "/").split("/") if r.strip()]
    letters = "".join(rows)
    if [len(r) for r in rows] != [world.shape[1]] * world.shape[0] or \
            any(c not in POLICY_LETTERS for c in letters):
        raise GridError(f"cannot read policy {spec!r}: give 'uniform' or {world.shape[0]} rows "
                        f"of {world.shape[1]} letters from u, r, d, l, s separated by '/'")
    return deterministic_policy(torch.tensor([POLICY_LETTERS[c] for c in letters]))


def parse_start(spec: str, world: GridWorld) -> int | None:
    """The state named by ``--start``: None for 'random', else the 1-based cell 'row,col'."""
    if spec == "random":
        return None
    try:
        row, col = (int(part) for part in spec.split(","))
    except ValueError:
        raise GridError(f"--start must be 'random' or 'row,col' (1-based), got {spec!r}") \
            from None
    n_rows, n_cols = world.shape
    if not (1 <= row <= n_rows and 1 <= col <= n_cols):
        raise GridError(f"--start {spec}: outside the {n_rows}x{n_cols} grid")
    return world.state(row, col)


def sample_actions(pi: torch.Tensor, s: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """a ~ pi(.|s) for every state of a batch."""
    return torch.multinomial(pi[s], 1, generator=generator).squeeze(1)


def greedy_path(model: TabularModel, q: torch.Tensor, s0: int, max_steps: int) -> list[int]:
    """The states visited from s0 by the greedy policy of ``q`` (S, A) (action values or a
    policy: each row's argmax), until a terminal state, a repeated state (a loop, which ends the
    path) or ``max_steps`` moves."""
    path, seen, actions = [s0], {s0}, q.argmax(dim=1)
    while len(path) <= max_steps and not model.terminal[path[-1]]:
        s_next = int(model.next_state[path[-1], actions[path[-1]]])
        path.append(s_next)
        if s_next in seen:
            break
        seen.add(s_next)
    return path
