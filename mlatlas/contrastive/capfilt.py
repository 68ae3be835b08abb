"""CapFilt (Li et al. 2022, section 3.3): bootstrap a noisy image-text dataset.

A BLIP model trained on the noisy pairs {(I_i, T_i)} supplies two modules:

- the captioner (its image-grounded decoder) writes one synthetic caption T_s,i per image;
- the filter (its image-text matching head) scores every pair, p_itm(I, T) = P(match | I, T),
  and removes the original and the synthetic captions with p_itm < tau.

The bootstrapped dataset D' = {(I_i, T_i) : p_itm(I_i, T_i) >= tau} u
{(I_i, T_s,i) : p_itm(I_i, T_s,i) >= tau} trains a new model. BLIP fine-tunes the captioner
and the filter on clean COCO pairs first; here they are the noisy model itself, so the filter
can only remove what that model has learnt not to believe.

This module knows neither how the captioner nor the filter works: it takes them as functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mlatlas.core.plots import plt, show_images


@dataclass
class CapFiltResult:
    """Synthetic captions and the filter's match probabilities, one per training image."""

    synthetic: list[str]
    p_original: torch.Tensor
    p_synthetic: torch.Tensor
    threshold: float

    @property
    def keep_original(self) -> torch.Tensor:
        return self.p_original >= self.threshold

    @property
    def keep_synthetic(self) -> torch.Tensor:
        return self.p_synthetic >= self.threshold

    def to_dict(self) -> dict:
        return {"synthetic": self.synthetic, "p_original": self.p_original.tolist(),
                "p_synthetic": self.p_synthetic.tolist(), "threshold": self.threshold}

    @classmethod
    def from_dict(cls, data: dict) -> CapFiltResult:
        return cls(list(data["synthetic"]), torch.tensor(data["p_original"]),
                   torch.tensor(data["p_synthetic"]), float(data["threshold"]))


def capfilt(images: torch.Tensor, captions: list[str],
            caption: Callable[[torch.Tensor], list[str]],
            match_probability: Callable[[torch.Tensor, list[str]], torch.Tensor],
            threshold: float = 0.5) -> CapFiltResult:
    """Caption every image with ``caption`` and score the original and synthetic pairs with
    ``match_probability``; pairs below ``threshold`` are the ones to remove."""
    if len(images) != len(captions):
        raise ValueError(f"capfilt needs one caption per image, got {len(images)} images and "
                         f"{len(captions)} captions")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"the filter threshold must be in (0, 1), got {threshold}")
    synthetic = caption(images)
    return CapFiltResult(synthetic, match_probability(images, captions).float().cpu(),
                         match_probability(images, synthetic).float().cpu(), threshold)


def bootstrap(images: torch.Tensor, captions: list[str],
              result: CapFiltResult) -> tuple[torch.Tensor, list[str]]:
    """D': the kept original pairs followed by the kept synthetic pairs (an image whose two
    captions both pass appears twice, one whose two captions both fail is dropped)."""
    original = result.keep_original.nonzero().squeeze(1)
    synthetic = result.keep_synthetic.nonzero().squeeze(1)
    texts = [captions[i] for i in original.tolist()] + \
        [result.synthetic[i] for i in synthetic.tolist()]
    return torch.cat([images[original], images[synthetic]]), texts


def filter_scores(result: CapFiltResult, corrupted: torch.Tensor) -> dict[str, float | None]:
    """How well the filter finds the corrupted original captions: the share of corrupted and of
    clean captions it removed, and precision / recall of "removed" as a detector of
    "corrupted" (None, JSON's null, when it removed nothing: precision is undefined); also the
    share of synthetic captions kept and the size of D'."""
    removed = ~result.keep_original
    corrupted = corrupted.bool()
    n_removed = int(removed.sum())
    hits = int((removed & corrupted).sum())
    return {
        "filter_removed_corrupted": hits / max(1, int(corrupted.sum())),
        "filter_removed_clean": int((removed & ~corrupted).sum()) / max(1, int((~corrupted).sum())),
        "filter_precision": hits / n_removed if n_removed else None,
        "filter_recall": hits / max(1, int(corrupted.sum())),
        "synthetic_kept": float(result.keep_synthetic.float().mean()),
        "bootstrapped_pairs": int(result.keep_original.sum() + result.keep_synthetic.sum()),
    }


def capfilt_figure(images: torch.Tensor, captions: list[str], corrupted: torch.Tensor,
                   result: CapFiltResult, n: int = 8, title: str = ""):
    """Images with their noisy caption and the synthetic one, each marked kept or removed
    (green / red) with its match probability; half of the rows show corrupted captions."""
    bad = corrupted.nonzero().squeeze(1).tolist()
    good = (~corrupted).nonzero().squeeze(1).tolist()
    rows = sorted(bad[:n // 2] + good[:n - min(len(bad), n // 2)])[:n]
    fig, axes = plt.subplots(len(rows), 2, figsize=(8, 1.1 * len(rows)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 7]})
    for ax, i in zip(axes, rows, strict=True):
        show_images(ax[0], images[i:i + 1], ncols=1)
        ax[1].axis("off")
        lines = [("original" + (" (corrupted)" if corrupted[i] else ""), captions[i],
                  result.p_original[i]),
                 ("synthetic", result.synthetic[i], result.p_synthetic[i])]
        for row, (name, text, p) in enumerate(lines):
            keep = bool(p >= result.threshold)
            ax[1].text(0, 0.7 - 0.45 * row,
                       f"{'keep' if keep else 'remove'} {float(p):.2f}  {name}: {text}",
                       color="green" if keep else "red", fontsize=8, transform=ax[1].transAxes)
    fig.suptitle(title or f"CapFilt: keep when p(match) >= {result.threshold}")
    return fig
