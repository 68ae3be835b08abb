r"""Guidance: trading diversity for fidelity to a class label at sampling time.

Classifier-free guidance (Ho & Salimans 2021). One network is trained on labelled data with the
label replaced by a null label with probability p_uncond, so it models both eps(x_t, y) and
eps(x_t). Sampling uses

    eps_tilde(x_t, y) = (1 + w) eps(x_t, y) - w eps(x_t)

with guidance weight w (w = 0: the plain conditional model; diffusers' guidance_scale is 1 + w).
Every prediction of ``parameterization.py`` and the EDM/VE network output F is affine in the
network's output with coefficients that do not depend on it, so the same combination of raw
network outputs guides D, v and flow-matching velocities alike.
"""

from __future__ import annotations

import torch
from torch import nn

from mlatlas.data import Dataset


def classifier_free(model: nn.Module, labels: torch.Tensor | None, w: float):
    """The network with labels bound, guided with weight ``w``: a function (x, t) -> output.
    ``labels=None`` (an unconditional model) returns the model itself; the conditional and
    unconditional passes run as one batch of twice the size."""
    if labels is None:
        return model
    if w == 0:
        return lambda x, t: model(x, t, labels)
    null = torch.full_like(labels, model.labels.num_classes)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        conditional, unconditional = out.chunk(2)
        return unconditional + (1 + w) * (conditional - unconditional)

    return guided


def label_accuracy(x: torch.Tensor, labels: torch.Tensor, data: Dataset) -> dict:
    """The share of samples that the shipped classifier of ``data`` assigns to the requested
    label (empty for data without a shipped classifier)."""
    from mlatlas.eval.classifier import load_feature_net

    try:
        net = load_feature_net(data.name)
    except FileNotFoundError:
        return {}
    with torch.no_grad():
        predicted = torch.cat([net(chunk).argmax(1) for chunk in x.split(1000)])
    return {"label_accuracy": float((predicted == labels).double().mean())}
