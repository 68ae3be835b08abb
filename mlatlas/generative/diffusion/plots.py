"""Figures of diffusion and flow-matching runs: the sampling trajectory and 2D denoising fields."""

from __future__ import annotations

import torch

from mlatlas.core.plots import image_grid, plt, show_images
from mlatlas.data import Dataset

# One entry per sampler step: (noise level, x_i as displayed, D(x_i)), a few samples each.
Frames = list[tuple[float, torch.Tensor, torch.Tensor]]


def trajectory_figure(frames: Frames, data: Dataset, title: str = "", columns: int = 10):
    """Images: for 4 samples, a row of x_i and a row of the denoised estimate D(x_i) at
    ``columns`` steps from noise to data. Points: the paths of x_i from noise to the samples."""
    picks = sorted({round(k * (len(frames) - 1) / max(columns - 1, 1)) for k in range(columns)})
    if data.kind == "image":
        rows = []
        for j in range(min(4, len(frames[0][1]))):
            rows += [frames[k][1][j] for k in picks] + [frames[k][2][j] for k in picks]
        fig = image_grid(((torch.stack(rows) + 1) / 2).clamp(0, 1), ncols=len(picks))
        fig.axes[0].set_title(f"{title}\nrows: x_i, then D(x_i), for 4 samples; columns: "
                              f"sigma = {frames[picks[0]][0]:.3g} ... {frames[picks[-1]][0]:.3g}",
                              fontsize=9)
        return fig
    paths = torch.stack([x for _, x, _ in frames] + [frames[-1][2]])  # (steps + 1, k, 2)
    fig, ax = plt.subplots(figsize=(5, 5))
    ref = data.x_test[:2000]
    ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.8", label="data")
    for k in range(paths.shape[1]):
        ax.plot(paths[:, k, 0], paths[:, k, 1], lw=0.5, c="tab:blue", alpha=0.4)
    ax.scatter(paths[0, :, 0], paths[0, :, 1], s=6, c="tab:red", label="start (scaled noise)")
    ax.scatter(paths[-1, :, 0], paths[-1, :, 1], s=6, c="k", label="sample")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=2, fontsize=8)
    ax.set_title(title, fontsize=9)
    return fig


@torch.no_grad()
def vector_field_figure(formulation, model: torch.nn.Module, data: Dataset,
                        sigmas: tuple[float, ...] = (2.0, 1.0, 0.5, 0.1), grid: int = 21):
    """For 2D data: at each noise level, arrows along D(x; sigma) - x on a grid of noisy points x,
    i.e. sigma^2 times the learned score, coloured by length and drawn at a common scale."""
    denoiser = formulation.denoiser(model)
    low, high = data.x_test.min(0).values * 1.2, data.x_test.max(0).values * 1.2
    gx, gy = torch.meshgrid(torch.linspace(float(low[0]), float(high[0]), grid),
                            torch.linspace(float(low[1]), float(high[1]), grid), indexing="xy")
    points = torch.stack([gx.flatten(), gy.flatten()], 1)
    device = next(model.parameters()).device
    fig, axes = plt.subplots(1, len(sigmas), figsize=(4 * len(sigmas), 4))
    for ax, sigma in zip(axes, sigmas, strict=True):
        arrow = denoiser(points.to(device), sigma).cpu() - points
        length = arrow.norm(dim=1)
        ax.scatter(data.x_test[:2000, 0], data.x_test[:2000, 1], s=1, c="0.8")
        ax.quiver(points[:, 0], points[:, 1], arrow[:, 0], arrow[:, 1], length, angles="xy",
                  width=0.004, cmap="viridis")
        ax.set_aspect("equal")
        ax.set_title(f"D(x; sigma) - x at sigma = {sigma:g} (longest {float(length.max()):.2g})",
                     fontsize=9)
    fig.tight_layout()
    return fig


def captions_figure(images: torch.Tensor, captions: list[str], title: str = "", rows: int = 8,
                    per_row: int = 8):
    """Samples grouped by caption: one row per distinct caption (the first ``rows``), its first
    ``per_row`` samples beside the caption."""
    distinct = list(dict.fromkeys(captions))[:rows]
    fig, axes = plt.subplots(len(distinct), 1, figsize=(1.1 * per_row + 3, 1.2 * len(distinct)),
                             squeeze=False)
    for ax, text in zip(axes[:, 0], distinct, strict=True):
        picked = [i for i, c in enumerate(captions) if c == text][:per_row]
        show_images(ax, images[picked], per_row)
        ax.set_axis_on()
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(text, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        axes[0, 0].set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
