"""Training curves of the language-model methods: reward, held-out accuracy, KL, loss."""

from __future__ import annotations

from collections.abc import Sequence

from mlatlas.core.plots import panel_curves

PANELS = (("reward", "mean reward of rollouts"), ("accuracy", "held-out greedy accuracy"),
          ("sampled_accuracy", "held-out sampled accuracy (T = 1)"),
          ("kl", "KL(pi || pi_ref) per completion"), ("length", "mean completion tokens"),
          ("loss", "loss"))


def curves_figure(rows: Sequence[dict], title: str = ""):
    """One panel per metric that the rows hold, against step."""
    return panel_curves(rows, PANELS, title)
