"""Feature vectors of the grid's cells and state-action pairs (Zhao, Section 8.2.4).

Value-function approximation writes v_hat(s, w) = phi(s)^T w (eq. 8.1) and
q_hat(s, a, w) = phi(s, a)^T w. Features of a cell (x the column, y the row):

- polynomial, x and y scaled to [-1, 1]: order 1 is [1, x, y] (eq. 8.15), order 2 adds
  [x^2, y^2, xy] (eq. 8.16), order 3 adds [x^3, y^3, x^2 y, x y^2] (eq. 8.17);
- Fourier, x and y scaled to [0, 1]: cos(pi (c1 x + c2 y)) for c1, c2 in {0..q}, (q+1)^2 of them
  (eq. 8.18);
- one-hot phi(s) = e_s, with which TD-Linear is tabular TD(0) (Box 8.2).

The book uses "Fourier features of order 5" for action values without saying how the action
enters; :func:`action_features` makes the action index, scaled like x and y, a third coordinate
(``coordinate``: cos(pi (c1 x + c2 y + c3 z)), (q+1)^3 terms) or uses one block of state features
per action (``one_hot``: phi(s, a) = e_a (x) phi(s)).
"""

from __future__ import annotations

import itertools
import math
import typing
from typing import Literal

import torch

from mlatlas.core.config import ConfigError
from mlatlas.rl.tabular.gridworld import ACTIONS, GridWorld

Features = Literal["polynomial", "fourier", "tabular"]
FEATURES = typing.get_args(Features)
ActionEncoding = Literal["coordinate", "one_hot"]


def cell_coordinates(world: GridWorld, low: float, high: float) -> tuple[torch.Tensor, ...]:
    """(x, y) of every state, the column and the row scaled linearly to [low, high]."""
    n_rows, n_cols = world.shape
    row = torch.arange(n_rows, dtype=torch.float64).repeat_interleave(n_cols)
    col = torch.arange(n_cols, dtype=torch.float64).repeat(n_rows)
    # max(., 1): a grid one cell wide has its single column at ``low``.
    x = low + (high - low) * col / max(n_cols - 1, 1)
    y = low + (high - low) * row / max(n_rows - 1, 1)
    return x, y


def polynomial_features(x: torch.Tensor, y: torch.Tensor, order: int) -> torch.Tensor:
    """(N, (order+1)(order+2)/2) monomials x^i y^j, i + j <= order, in the book's order: degree by
    degree, within a degree the pure powers x^k, y^k first, then x^{k-1} y, ..., x y^{k-1}
    (eqs. 8.15-8.17)."""
    columns = [torch.ones_like(x)]
    for k in range(1, order + 1):
        columns += [x**k, y**k] + [x ** (k - j) * y**j for j in range(1, k)]
    return torch.stack(columns, dim=1)


def fourier_features(x: torch.Tensor, y: torch.Tensor, order: int) -> torch.Tensor:
    """(N, (q+1)^2) cos(pi (c1 x + c2 y)) for c1, c2 in {0..q}, c1 the outer index (eq. 8.18)."""
    c = torch.arange(order + 1, dtype=x.dtype)
    c1, c2 = c.repeat_interleave(order + 1), c.repeat(order + 1)
    return torch.cos(math.pi * (x[:, None] * c1 + y[:, None] * c2))


def state_features(world: GridWorld, kind: str, order: int) -> torch.Tensor:
    """Phi: (S, m), the feature vector phi(s)^T of every state as a row (eq. 8.20)."""
    if kind == "polynomial":
        return polynomial_features(*cell_coordinates(world, -1.0, 1.0), order)
    if kind == "fourier":
        return fourier_features(*cell_coordinates(world, 0.0, 1.0), order)
    if kind == "tabular":
        return torch.eye(world.n_states, dtype=torch.float64)
    raise ConfigError(f"unknown features {kind!r}; use one of {', '.join(FEATURES)}")


def action_features(world: GridWorld, kind: str, order: int,
                    encoding: str = "coordinate") -> torch.Tensor:
    """phi(s, a) for every pair: (S, |A|, m).

    ``coordinate``: the action index, scaled like x and y, is a third coordinate of the basis:
    cos(pi (c1 x + c2 y + c3 z)) for c1, c2, c3 in {0..q} (eq. 8.18 in three variables), or the
    monomials of (x, y, z) of degree <= order; with q (or the degree) >= |A| - 1 the basis spans
    every function of the action. ``one_hot``: one block of state features per action,
    phi(s, a) = e_a (x) phi(s). ``tabular`` features are the one-hot e_(s, a) either way.
    """
    n_states, n_actions = world.n_states, len(ACTIONS)
    if kind == "tabular":
        return torch.eye(n_states * n_actions, dtype=torch.float64).view(n_states, n_actions, -1)
    if encoding == "one_hot":
        phi = state_features(world, kind, order)  # (S, m)
        blocks = torch.eye(n_actions, dtype=phi.dtype)[None, :, :, None] * phi[:, None, None, :]
        return blocks.reshape(n_states, n_actions, -1)
    low = -1.0 if kind == "polynomial" else 0.0
    x, y = cell_coordinates(world, low, 1.0)
    z = low + (1.0 - low) * torch.arange(n_actions, dtype=torch.float64) / (n_actions - 1)
    x, y, z = (t.reshape(shape).expand(n_states, n_actions).reshape(-1)
               for t, shape in ((x, (-1, 1)), (y, (-1, 1)), (z, (1, -1))))
    coords = torch.stack([x, y, z], dim=1)
    if kind == "polynomial":
        powers = torch.tensor(_powers(3, order), dtype=coords.dtype)  # (m, 3)
        phi = (coords[:, None, :] ** powers).prod(dim=2)
    else:
        c = torch.cartesian_prod(*[torch.arange(order + 1, dtype=coords.dtype)] * 3)
        phi = torch.cos(math.pi * coords @ c.T)
    return phi.view(n_states, n_actions, -1)


def _powers(n_vars: int, order: int) -> list[tuple[int, ...]]:
    """Exponents of the monomials of n_vars variables of degree <= order, degree by degree."""
    powers = [p for p in itertools.product(range(order + 1), repeat=n_vars) if sum(p) <= order]
    return sorted(powers, key=lambda p: (sum(p), [-e for e in p]))
