"""Grid-world pictures as the book draws them: policy arrows, state values, trajectories, value
surfaces and learning curves.

Forbidden cells are orange and the target blue (the book's colours); a policy is drawn as one
arrow per action with pi(a|s) >= 0.01, its length growing with the probability, and a circle for
"stay". Values are a heat map with the number written in each cell, to one decimal.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mlatlas.core.plots import plt
from mlatlas.rl.tabular.gridworld import MOVES, GridWorld

FORBIDDEN = (0.929, 0.694, 0.125)
TARGET = (0.301, 0.745, 0.933)
POLICY = (0.20, 0.55, 0.15)
PATH_COLORS = plt.get_cmap("tab10")


def _draw_cells(ax, world: GridWorld, fill: bool = True) -> None:
    n_rows, n_cols = world.shape
    for r in range(n_rows):
        for c in range(n_cols):
            kind = world.kinds[r][c]
            if kind:
                color = FORBIDDEN if kind == 1 else TARGET
                ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, facecolor=color if fill
                                           else "none", edgecolor=color,
                                           linewidth=0 if fill else 2.5))
    ax.set_xlim(-0.5, n_cols - 0.5)
    ax.set_ylim(n_rows - 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_xticks(np.arange(-0.5, n_cols, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n_rows, 1), minor=True)
    ax.grid(which="minor", color="0.6", linewidth=0.8)
    ax.set_xticks(range(n_cols), [str(c + 1) for c in range(n_cols)])
    ax.set_yticks(range(n_rows), [str(r + 1) for r in range(n_rows)])
    ax.tick_params(which="both", length=0, labeltop=True, labelbottom=False)


def draw_policy(ax, world: GridWorld, pi: torch.Tensor) -> None:
    _draw_cells(ax, world)
    n_cols = world.shape[1]
    # Actions below 1% are left out, or every cell of a soft policy would show every arrow.
    s, a = torch.nonzero(pi >= 0.01, as_tuple=True)
    p = pi[s, a].double().numpy()
    row, col = (s // n_cols).numpy(), (s % n_cols).numpy()
    moves = np.array(MOVES)[a.numpy()]
    stay = a.numpy() == len(MOVES) - 1
    length = 0.12 + 0.3 * p
    ax.quiver(col[~stay], row[~stay], moves[~stay, 1] * length[~stay],
              moves[~stay, 0] * length[~stay], angles="xy", scale_units="xy", scale=1,
              color=POLICY, width=0.012)
    ax.scatter(col[stay], row[stay], s=120 * (0.4 + p[stay]), facecolors="none",
               edgecolors=POLICY, linewidths=1.5)


def draw_values(ax, world: GridWorld, values: torch.Tensor) -> None:
    grid = values.reshape(world.shape).double().numpy()
    ax.imshow(grid, cmap="RdYlGn", interpolation="nearest")
    _draw_cells(ax, world, fill=False)
    span = float(np.abs(grid).max()) or 1.0
    for (r, c), v in np.ndenumerate(grid):
        ax.text(c, r, f"{v:.1f}", ha="center", va="center",
                fontsize=max(5, 11 - world.shape[1] // 3), color="black" if abs(v) < 0.8 * span
                else "white")


def grid_figure(world: GridWorld, values: torch.Tensor | None = None,
                pi: torch.Tensor | None = None, title: str = ""):
    """Policy on the left, state values on the right (either may be omitted)."""
    panels = [p for p in (("policy", pi), ("state values", values)) if p[1] is not None]
    size = max(3.5, 0.7 * max(world.shape))
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False)
    for ax, (name, data) in zip(axes[0], panels, strict=True):
        (draw_policy if name == "policy" else draw_values)(ax, world, data)
        ax.set_title(name, fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def trajectory_figure(world: GridWorld, episodes: Sequence[Sequence[int]], title: str = ""):
    """Paths through the grid, one colour per episode, jittered so repeated moves show."""
    size = max(3.5, 0.7 * max(world.shape))
    fig, ax = plt.subplots(figsize=(size, size))
    _draw_cells(ax, world)
    rng = np.random.default_rng(0)
    for k, states in enumerate(episodes):
        s = np.asarray(states)
        row, col = s // world.shape[1], s % world.shape[1]
        jitter = rng.normal(0.0, 0.08, size=(2, len(s)))
        ax.plot(col + jitter[1], row + jitter[0], "-", color=PATH_COLORS(k % 10), linewidth=1,
                alpha=0.8)
        ax.plot(col[0], row[0], "o", color=PATH_COLORS(k % 10), markersize=6)
    ax.set_title(title, fontsize=10)
    return fig


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
    """One panel per metric against ``x`` (a metrics.csv column such as ``episodes``), linear
    axes, stacked (``core.plots.metric_curves`` draws against ``step`` only)."""
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
