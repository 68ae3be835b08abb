"""Figures every run writes: sample grids, 2D scatter plots and metric curves (PNG, Agg)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def tile(images: torch.Tensor, ncols: int) -> torch.Tensor:
    """(N, C, H, W) images with values in [0, 1] tiled ``ncols`` to a row on a white canvas of
    shape (C, rows (H + 1) + 1, ncols (W + 1) + 1), one pixel of white around each image."""
    images = images.detach().cpu().clamp(0, 1)
    n, c, h, w = images.shape
    rows = math.ceil(n / ncols)
    cells = torch.ones(rows * ncols, c, h + 1, w + 1)
    cells[:n, :, 1:, 1:] = images
    canvas = cells.reshape(rows, ncols, c, h + 1, w + 1).permute(2, 0, 3, 1, 4)
    return torch.nn.functional.pad(canvas.reshape(c, rows * (h + 1), ncols * (w + 1)),
                                   (0, 1, 0, 1), value=1.0)


def show_images(ax, images: torch.Tensor, ncols: int) -> None:
    """Draw ``tile(images, ncols)`` on ``ax`` (grey for one channel), without axes."""
    canvas = tile(images, ncols)
    if canvas.shape[0] == 1:
        ax.imshow(canvas[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(canvas.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_axis_off()


def image_grid(images: torch.Tensor, title: str = "", ncols: int | None = None):
    """A figure tiling (N, C, H, W) images with values in [0, 1]."""
    n, _, h, w = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / ncols)
    size = min(12.0, max(3.0, 0.5 * ncols * max(1.0, w / 8)))
    fig, ax = plt.subplots(figsize=(size, size * (rows * (h + 1) + 1) / (ncols * (w + 1) + 1)))
    show_images(ax, images, ncols)
    if title:
        ax.set_title(title)
    return fig


def scatter_2d(samples: torch.Tensor, reference: torch.Tensor | None = None, title: str = ""):
    """Samples over reference data (grey), equal axes."""
    fig, ax = plt.subplots(figsize=(5, 5))
    if reference is not None:
        ref = reference.detach().cpu()
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.7", label="data")
    pts = samples.detach().cpu()
    ax.scatter(pts[:, 0], pts[:, 1], s=2, c="tab:blue", label="samples")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=4)
    if title:
        ax.set_title(title)
    return fig


def panel_curves(rows: Sequence[dict], panels: Sequence[tuple[str, str]], title: str = ""):
    """One panel per (metric, label) of ``panels`` that the rows hold, against step; a metric
    logged on some rows only (a periodic evaluation) is drawn through those rows."""
    panels = [(k, label) for k, label in panels if any(k in r for r in rows)]
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


def metric_curves(rows: Sequence[dict], names: Sequence[str], title: str = "", log: bool = True):
    """One panel per metric against step, from metrics.csv rows."""
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, name in zip(axes[0], names, strict=True):
        ax.plot(steps, [r.get(name, float("nan")) for r in rows])
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def samples_figure(samples: torch.Tensor, title: str = "", reference: torch.Tensor | None = None):
    """A grid of the first 100 images, or a scatter plot of 2D points over ``reference``."""
    if samples.ndim == 4:
        return image_grid(samples[:100], title=title)
    if samples.ndim == 2 and samples.shape[1] == 2:
        return scatter_2d(samples, reference, title=title)
    raise ValueError(f"no figure for samples of shape {tuple(samples.shape)}")


def density_grid(points: torch.Tensor, size: int = 200,
                 margin: float = 0.5) -> tuple[torch.Tensor, float]:
    """A (size * size, 2) grid of cells covering ``points`` plus ``margin``, row by row from the
    top, and the area of one cell (for integrating a density over the grid)."""
    low, high = points.min(0).values - margin, points.max(0).values + margin
    xs = torch.linspace(float(low[0]), float(high[0]), size)
    ys = torch.linspace(float(high[1]), float(low[1]), size)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], -1).reshape(-1, 2)
    return grid, float((xs[1] - xs[0]) * (ys[0] - ys[1]))


def density_figure(log_prob, reference: torch.Tensor, title: str = "", size: int = 200):
    """A heat map of a 2D density p(x) = exp(log_prob(x)) over the region of ``reference``,
    beside the data; ``log_prob`` maps (M, 2) points to (M,) log-densities."""
    grid, _ = density_grid(reference, size)
    with torch.no_grad():
        p = torch.exp(log_prob(grid)).reshape(size, size).cpu()
    extent = (float(grid[:, 0].min()), float(grid[:, 0].max()), float(grid[:, 1].min()),
              float(grid[:, 1].max()))
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
    axes[0].imshow(p, extent=extent, cmap="magma")
    axes[0].set_title("model density p(x)")
    ref = reference.detach().cpu()
    axes[1].scatter(ref[:, 0], ref[:, 1], s=1, c="0.3")
    axes[1].set_xlim(extent[:2])
    axes[1].set_ylim(extent[2:])
    axes[1].set_title("held-out data")
    for ax in axes:
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
