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


def pipeline_figure():
    """Latent diffusion with ControlNet as boxes and arrows: image -> encoder -> latent ->
    denoiser (with the condition through cross-attention and the ControlNet's residuals) ->
    decoder -> image."""
    fig, ax = plt.subplots(figsize=(12, 4.2))
    ax.set_xlim(0, 13)
    ax.set_ylim(0, 4.2)
    ax.set_axis_off()

    def box(x, y, w, h, text, colour):
        ax.add_patch(plt.Rectangle((x, y), w, h, facecolor=colour, edgecolor="0.3"))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=8)

    def arrow(x0, y0, x1, y1, text=""):
        ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "color": "0.2"})
        if text:
            ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.12, text, ha="center", fontsize=7)

    box(0.1, 2.4, 1.2, 0.8, "image x\n(3x32x32)", "#eeeeee")
    box(1.8, 2.4, 1.3, 0.8, "encoder E\n(frozen)", "#cfe2f3")
    box(3.6, 2.4, 1.5, 0.8, "z_0 = s E(x)\n(4x8x8)", "#eeeeee")
    box(5.9, 2.2, 2.7, 1.2, "UNet eps_theta(z_t, t, tau(y))\nwith cross-attention\n(frozen "
        "under ControlNet)", "#d9ead3")
    box(9.4, 2.4, 1.3, 0.8, "decoder D\n(frozen)", "#cfe2f3")
    box(11.2, 2.4, 1.6, 0.8, "x = D(z_0 / s)", "#eeeeee")
    box(5.9, 3.7, 2.7, 0.45, "tau(y): label or caption tokens", "#fff2cc")
    box(5.9, 0.2, 2.7, 1.0, "ControlNet: a copy of the\nUNet's encoder, zero convs", "#f4cccc")
    box(2.4, 0.3, 2.4, 0.8, "control c: Canny / Sobel\nedges, mask, skeleton", "#eeeeee")
    arrow(1.3, 2.8, 1.8, 2.8)
    arrow(3.1, 2.8, 3.6, 2.8)
    arrow(5.1, 2.8, 5.9, 2.8, "+ noise")
    arrow(8.6, 2.8, 9.4, 2.8, "sampler")
    arrow(10.7, 2.8, 11.2, 2.8)
    arrow(7.25, 3.7, 7.25, 3.4)
    arrow(4.8, 0.7, 5.9, 0.7, "H(c)")
    arrow(7.25, 1.2, 7.25, 2.2, "")
    ax.text(7.35, 1.65, "s keep_i Z(h): skips, middle", fontsize=7)
    ax.set_title("latent diffusion and ControlNet (mlatlas.generative.diffusion.latent, "
                 ".controlnet)", fontsize=9)
    return fig
