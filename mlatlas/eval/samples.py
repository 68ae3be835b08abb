"""Scoring generated samples against a dataset's held-out test split, whatever made them."""

from __future__ import annotations

import torch

from mlatlas.data import Dataset
from mlatlas.eval.classifier import image_features, load_feature_net
from mlatlas.eval.metrics import frechet_distance_features, mmd_rbf, precision_recall

# Neighbours of the k-NN manifolds of improved precision and recall (Kynkaanniemi et al. use 3).
PRECISION_RECALL_K = 3


def min_samples(kind: str) -> int:
    """The fewest samples :func:`score_samples` can score: 2 for the MMD of points (its
    unbiased estimate leaves out the diagonal), k + 1 for the k-NN precision and recall of
    images."""
    return 2 if kind == "points" else PRECISION_RECALL_K + 1


def score_samples(x: torch.Tensor, data: Dataset) -> dict:
    """MMD to the test split for points; Frechet distance and precision/recall on the shipped
    classifier's features for images (absent for user image data, which has no classifier)."""
    metrics: dict = {"n_samples": len(x)}
    if data.kind == "points":
        metrics["mmd"] = mmd_rbf(x, data.x_test)
        return metrics
    try:
        net = load_feature_net(data.name)
    except FileNotFoundError as err:
        metrics["note"] = str(err)
        return metrics
    real, fake = image_features(net, data.x_test), image_features(net, x)
    metrics["frechet_distance"] = frechet_distance_features(real, fake)
    metrics["precision"], metrics["recall"] = precision_recall(real, fake, PRECISION_RECALL_K)
    return metrics


def real_data_floor(data: Dataset, n: int, seed: int = 0) -> dict:
    """The scores of ``n`` real training examples (drawn with ``seed``) against the test split:
    the best a sampler can show with ``n`` samples, since finite samples leave a distance."""
    index = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))
    return score_samples(data.x_train[index[:n]], data)
