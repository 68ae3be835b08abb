"""Pictures of the vision-language model: training curves and answers on test images."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
import torch

from mlatlas.core.plots import panel_curves

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("loss", "loss"), ("siglip", "SigLIP loss"), ("reward", "mean reward of replies"),
          ("circular", "held-out CircularEval"), ("open_accuracy", "held-out open accuracy"),
          ("capacity", "max expert load / balanced load"))


def curves_figure(rows: Sequence[dict], stage: str = ""):
    """One panel per metric the rows hold, against step."""
    return panel_curves(rows, PANELS, f"vlm, {stage} stage" if stage else "vlm")


def image_tensor(image) -> torch.Tensor:
    """A PIL image as a (3, H, W) float tensor in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def examples_figure(model, tokenizer, data, text_only: bool, max_new_tokens: int,
                    count: int = 12):
    """The first ``count`` test images (each at its own size) with the question, the model's
    open reply and the right answer, green when they agree."""
    from mlatlas.multimodal.model import prompt_text
    from mlatlas.multimodal.vlm import answer, reward

    count = min(count, len(data))
    # One question of each task first, so the picture shows every task.
    categories = list(data.categories)
    firsts = sorted({categories.index(c) for c in categories})
    order = (firsts + [i for i in range(len(data)) if i not in firsts])[:count]
    images = [data.images[i] for i in order]
    replies = answer(model, tokenizer, None if text_only else images,
                     [prompt_text(data.questions[i]) for i in order],
                     max_new_tokens=max_new_tokens)[0]
    right = reward(replies, [data.answers[i] for i in order], [None] * count)
    cols = 4
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i, reply, hit in zip(axes.flat, order, replies, right, strict=False):
        ax.imshow(data.images[i].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        h, w = data.images[i].shape[-2:]
        ax.set_title(f"{data.questions[i]}\nreply: {reply!r}  answer: {data.answers[i]!r}\n"
                     f"{h}x{w} px", fontsize=8, color="green" if hit else "red")
    fig.tight_layout()
    return fig
