"""Training curves of the language-model methods: reward, held-out accuracy, KL, loss."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("reward", "mean reward of rollouts"), ("accuracy", "held-out greedy accuracy"),
          ("sampled_accuracy", "held-out sampled accuracy (T = 1)"),
          ("kl", "KL(pi || pi_ref) per completion"), ("length", "mean completion tokens"),
          ("loss", "loss"))


def curves_figure(rows: Sequence[dict], title: str = ""):
    """One panel per metric that the rows hold, against step (gaps where a row lacks it)."""
    panels = [(k, label) for k, label in PANELS if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.2 * max(len(panels), 1), 3.2),
                             squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=False):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30
                else None)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
