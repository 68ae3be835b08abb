r"""What the network predicts, and exact conversions between the choices.

With the perturbation written as x_t = alpha_t x_0 + sigma_t eps (alpha_t = s(t) and sigma_t =
s(t) sigma(t) in the notation of ``edm.py``), a network may predict

    eps       the noise                               (DDPM, Ho et al. 2020)
    x0        the clean data                          (the denoiser D)
    v         alpha_t eps - sigma_t x_0               (Salimans & Ho 2022, "v-prediction")
    score     grad log p_t(x_t) = -eps / sigma_t      (score matching, Song et al. 2021)
    velocity  dx_t/dt = alpha_t' x_0 + sigma_t' eps   (flow matching; for x_t = (1 - t) x_0 + t eps
              it is eps - x_0)

Each is an affine function of (x_0, eps) given x_t, so any one determines the others:

    x_0 = (x_t - sigma_t eps) / alpha_t
    x_0 = (alpha_t x_t - sigma_t v) / (alpha_t^2 + sigma_t^2)
    x_0 = (sigma_t' x_t - sigma_t u) / (alpha_t sigma_t' - sigma_t alpha_t')       (u the velocity)

``to_x0_eps`` maps a prediction to the pair (x_0, eps) and ``from_x0_eps`` maps the pair to any
prediction; ``convert`` chains the two. Coefficients may be floats or tensors that broadcast.
"""

from __future__ import annotations

from typing import Literal

import torch

Prediction = Literal["eps", "x0", "v", "score", "velocity"]
PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v", "score", "velocity")
Coef = torch.Tensor | float


def _check(kind: str, d_alpha: Coef | None, d_sigma: Coef | None) -> None:
    if kind not in PREDICTIONS:
        raise ValueError(f"unknown prediction {kind!r}; choose from {', '.join(PREDICTIONS)}")
    if kind == "velocity" and (d_alpha is None or d_sigma is None):
        raise ValueError("a velocity needs the derivatives d_alpha and d_sigma of the schedule")


def to_x0_eps(pred: torch.Tensor, kind: Prediction, x_t: torch.Tensor, alpha: Coef,
              sigma: Coef, d_alpha: Coef | None = None, d_sigma: Coef | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) implied by the prediction ``pred`` of type ``kind`` at x_t."""
    _check(kind, d_alpha, d_sigma)
    if kind == "eps":
        eps = pred
        return (x_t - sigma * eps) / alpha, eps
    if kind == "score":
        eps = -sigma * pred
        return (x_t - sigma * eps) / alpha, eps
    if kind == "x0":
        x0 = pred
    elif kind == "v":
        x0 = (alpha * x_t - sigma * pred) / (alpha**2 + sigma**2)
    else:
        x0 = (d_sigma * x_t - sigma * pred) / (alpha * d_sigma - sigma * d_alpha)
    return x0, (x_t - alpha * x0) / sigma


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, kind: Prediction, alpha: Coef, sigma: Coef,
                d_alpha: Coef | None = None, d_sigma: Coef | None = None) -> torch.Tensor:
    """The prediction of type ``kind`` that the pair (x_0, eps) implies."""
    _check(kind, d_alpha, d_sigma)
    return {"eps": lambda: eps, "x0": lambda: x0,
            "v": lambda: alpha * eps - sigma * x0,
            "score": lambda: -eps / sigma,
            "velocity": lambda: d_alpha * x0 + d_sigma * eps}[kind]()


def convert(pred: torch.Tensor, source: Prediction, target: Prediction, x_t: torch.Tensor,
            alpha: Coef, sigma: Coef, d_alpha: Coef | None = None,
            d_sigma: Coef | None = None) -> torch.Tensor:
    """Re-express a ``source`` prediction at x_t as a ``target`` prediction."""
    x0, eps = to_x0_eps(pred, source, x_t, alpha, sigma, d_alpha, d_sigma)
    return from_x0_eps(x0, eps, target, alpha, sigma, d_alpha, d_sigma)
