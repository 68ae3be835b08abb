"""The grid world as a gymnasium environment, registered as ``mlatlas/GridWorld-v0``.

    import gymnasium as gym
    import mlatlas.rl  # registers the environment
    env = gym.make("mlatlas/GridWorld-v0", grid="book", terminal_target=True)
    state, info = env.reset(seed=0)            # state: the index (row - 1) * n_cols + (col - 1)
    state, reward, terminated, truncated, info = env.step(1)   # 0 up, 1 right, 2 down, ...

Transitions and rewards are read from the same :class:`~mlatlas.rl.tabular.gridworld.
TabularModel` the dynamic-programming methods use, so both see one world. Episodes start in a
cell drawn uniformly from the non-terminal cells unless ``start`` (a 1-based (row, col)) is given,
to the constructor or as ``reset(options={"start": (row, col)})``. ``terminated`` is True only in
the path-finding variant (``terminal_target=True``); the registered id truncates episodes after
100 steps (``max_episode_steps`` changes it).
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np

from mlatlas.rl.tabular.gridworld import GridError, GridWorld

ENV_ID = "mlatlas/GridWorld-v0"
CELL_PIXELS = 32
COLORS = {0: (255, 255, 255), 1: (237, 177, 32), 2: (77, 190, 238)}  # the book's palette
AGENT = (20, 60, 200)
LINES = (150, 150, 150)


class GridWorldEnv(gymnasium.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, grid: str = "book", r_boundary: float = -1.0, r_forbidden: float = -1.0,
                 r_target: float = 1.0, r_other: float = 0.0, terminal_target: bool = False,
                 start: tuple[int, int] | None = None, render_mode: str | None = None):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.world = GridWorld.parse(grid, r_boundary=r_boundary, r_forbidden=r_forbidden,
                                     r_target=r_target, r_other=r_other,
                                     terminal_target=terminal_target)
        model = self.world.model
        self._next_state = model.next_state.numpy()
        self._reward = model.reward.numpy()
        self._terminal = model.terminal.numpy()
        self.observation_space = gymnasium.spaces.Discrete(model.n_states)
        self.action_space = gymnasium.spaces.Discrete(model.n_actions)
        self.render_mode = render_mode
        self.start = None if start is None else self._start_state(start)
        self.state = 0

    def _start_state(self, cell) -> int:
        n_rows, n_cols = self.world.shape
        row, col = cell
        if not (1 <= row <= n_rows and 1 <= col <= n_cols):
            raise GridError(f"start {cell} is outside the {n_rows}x{n_cols} grid")
        return self.world.state(row, col)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        start = (options or {}).get("start")
        if start is not None:
            self.state = self._start_state(start)
        elif self.start is not None:
            self.state = self.start
        else:
            self.state = int(self.np_random.choice(np.flatnonzero(~self._terminal)))
        return self.state, {"cell": self.world.cell(self.state)}

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"action must be an integer in 0..4 (up, right, down, left, "
                             f"stay), got {action!r}")
        reward = float(self._reward[self.state, action])
        self.state = int(self._next_state[self.state, action])
        terminated = bool(self._terminal[self.state])
        return self.state, reward, terminated, False, {"cell": self.world.cell(self.state)}

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        n_rows, n_cols = self.world.shape
        kinds = np.array(self.world.kinds)
        palette = np.array([COLORS[k] for k in range(3)], dtype=np.uint8)
        image = palette[kinds].repeat(CELL_PIXELS, axis=0).repeat(CELL_PIXELS, axis=1)
        image[::CELL_PIXELS, :] = LINES
        image[:, ::CELL_PIXELS] = LINES
        row, col = divmod(self.state, n_cols)
        yy, xx = np.mgrid[0:CELL_PIXELS, 0:CELL_PIXELS] - (CELL_PIXELS - 1) / 2
        disc = yy**2 + xx**2 <= (0.3 * CELL_PIXELS) ** 2
        cell = image[row * CELL_PIXELS:(row + 1) * CELL_PIXELS,
                     col * CELL_PIXELS:(col + 1) * CELL_PIXELS]
        cell[disc] = AGENT
        return image


def register() -> None:
    """Register ``mlatlas/GridWorld-v0`` with gymnasium (idempotent)."""
    if ENV_ID not in gymnasium.registry:
        gymnasium.register(ENV_ID, entry_point="mlatlas.rl.tabular.env:GridWorldEnv",
                           max_episode_steps=100)
