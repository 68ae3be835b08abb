"""Figures of deep RL runs: training return against environment steps and wall-clock."""

from __future__ import annotations

import math
from collections.abc import Sequence

from mlatlas.core.plots import plt


def return_curves(rows: Sequence[dict], method: str, env: str, target: float = math.inf):
    """Mean return of the last training episodes against env steps (left) and seconds (right)."""
    rows = [r for r in rows if "episode_return" in r]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    for ax, key, label in zip(axes, ("env_steps", "wall_s"), ("environment steps",
                                                              "wall-clock (s)"), strict=True):
        ax.plot([r[key] for r in rows], [r["episode_return"] for r in rows], color="C0")
        if math.isfinite(target):
            ax.axhline(target, color="C3", linestyle="--", linewidth=1, label="target")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("return (last 10 episodes)")
    fig.suptitle(f"{method} on {env}")
    fig.tight_layout()
    return fig
