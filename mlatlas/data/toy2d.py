"""Generated 2D distributions, deterministic given a seed.

The shapes follow the toy densities common in the flow and diffusion literature (FFJORD,
Grathwohl et al. 2019), scaled to roughly unit spread so that a unit-variance Gaussian prior
covers them.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def two_moons(n: int, rng: np.random.Generator) -> np.ndarray:
    half = n // 2
    outer = rng.uniform(0, math.pi, n - half)
    inner = rng.uniform(0, math.pi, half)
    x = np.concatenate([
        np.stack([np.cos(outer), np.sin(outer)], 1),
        np.stack([1 - np.cos(inner), 0.5 - np.sin(inner)], 1),
    ])
    x += rng.normal(scale=0.1, size=x.shape)
    return x * 2 + np.array([-1.0, -0.2])


def _mixture(centers: np.ndarray, sigma: float, n: int, rng: np.random.Generator) -> np.ndarray:
    which = rng.integers(0, len(centers), n)
    return centers[which] + rng.normal(scale=sigma, size=(n, 2))


def eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    return _mixture(*MODES["8gaussians"], n, rng)


def twenty_five_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    return _mixture(*MODES["25gaussians"], n, rng)


def checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    x1 = rng.uniform(-2, 2, n)
    x2 = rng.uniform(0, 1, n) - 2 * rng.integers(0, 2, n) + np.floor(x1) % 2
    return np.stack([x1, x2], 1) * 2


def swiss_roll(n: int, rng: np.random.Generator) -> np.ndarray:
    t = 1.5 * math.pi * (1 + 2 * rng.uniform(0, 1, n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], 1)
    return (x + rng.normal(scale=1.0, size=x.shape)) / 5


_ANGLES = np.arange(8) * math.pi / 4
# The mixtures' (centres, standard deviation): eight on a circle of radius 4 / sqrt(2) with
# sigma 0.5 / sqrt(2); twenty-five on the grid {-2, ..., 2}^2 with sigma 0.05 (the mode-coverage
# benchmarks of Metz et al. 2017 and Srivastava et al. 2017, at unit spacing).
MODES: dict[str, tuple[np.ndarray, float]] = {
    "8gaussians": (4 * np.stack([np.cos(_ANGLES), np.sin(_ANGLES)], 1) / math.sqrt(2),
                   0.5 / math.sqrt(2)),
    "25gaussians": (np.stack(np.meshgrid(np.arange(-2.0, 3), np.arange(-2.0, 3)), -1)
                    .reshape(-1, 2), 0.05),
}

GENERATORS = {
    "two-moons": two_moons,
    "8gaussians": eight_gaussians,
    "25gaussians": twenty_five_gaussians,
    "checkerboard": checkerboard,
    "swiss-roll": swiss_roll,
}


def mixture_modes(name: str) -> tuple[torch.Tensor, float] | None:
    """The centres (M, 2) and standard deviation of a Gaussian-mixture toy, or None."""
    if name not in MODES:
        return None
    centers, sigma = MODES[name]
    return torch.from_numpy(centers).float(), sigma


def sample_toy(name: str, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` points of the named 2D distribution as a float32 tensor of shape (n, 2)."""
    return torch.from_numpy(GENERATORS[name](n, np.random.default_rng(seed))).float()
