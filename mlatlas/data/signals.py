"""Generated 1-D signals: periodic waveforms in noise, labelled by waveform and frequency band.

Each sequence of ``length`` samples is

    x[n] = a * w((n / P + phi) mod 1) + sigma * eps[n],   eps[n] ~ N(0, 1),

with a waveform w (sine, square, sawtooth, triangle), a period P drawn uniformly inside one of
three bands (short, medium, long; in samples), a phase phi ~ U(0, 1), an amplitude
a ~ U(0.5, 1.5) and white noise of standard deviation ``noise``. The label is the pair
(waveform, band): 12 balanced classes. A second sinusoid of random period and amplitude up to
``distractor`` is added so that the label is not the only structure in the signal.

Everything is a function of the seed: the same arguments give the same signals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

WAVEFORMS = ("sine", "square", "sawtooth", "triangle")
BANDS = {"short": (8.0, 14.0), "medium": (20.0, 36.0), "long": (56.0, 100.0)}
CLASSES = tuple(f"{w}-{b}" for w in WAVEFORMS for b in BANDS)


@dataclass(frozen=True)
class Signals:
    """``x`` (N, 1, length) float32 signals and ``y`` (N,) class indices into ``CLASSES``."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def waveform(name: str, u: np.ndarray) -> np.ndarray:
    """One period of a unit-amplitude waveform evaluated at phases u in [0, 1)."""
    if name == "sine":
        return np.sin(2 * np.pi * u)
    if name == "square":
        return np.where(u < 0.5, 1.0, -1.0)
    if name == "sawtooth":
        return 2 * u - 1
    if name == "triangle":
        return 1 - 4 * np.abs(u - 0.5)
    raise ValueError(f"unknown waveform {name!r}; choose from {', '.join(WAVEFORMS)}")


def generate_signals(n: int, length: int = 1024, seed: int = 0, noise: float = 0.3,
                     distractor: float = 0.5) -> Signals:
    """``n`` labelled signals (see the module docstring); classes are balanced and shuffled."""
    if n < 1 or length < 2:
        raise ValueError(f"need n >= 1 signals of length >= 2, got n={n}, length={length}")
    if noise < 0 or distractor < 0:
        raise ValueError(f"noise and distractor must be non-negative, got {noise}, {distractor}")
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % len(CLASSES))
    bands = np.array(list(BANDS.values()))
    low, high = bands[y % len(BANDS)].T
    period = rng.uniform(low, high)
    phase = rng.uniform(0, 1, n)
    amplitude = rng.uniform(0.5, 1.5, n)
    t = np.arange(length)
    u = (t[None] / period[:, None] + phase[:, None]) % 1.0
    x = np.empty((n, length))
    for i, name in enumerate(WAVEFORMS):
        rows = y // len(BANDS) == i
        x[rows] = waveform(name, u[rows])
    x *= amplitude[:, None]
    other_period = rng.uniform(8.0, 128.0, n)
    other_phase = rng.uniform(0, 2 * np.pi, n)
    x += rng.uniform(0, distractor, n)[:, None] * np.sin(2 * np.pi * t[None] /
                                                         other_period[:, None]
                                                         + other_phase[:, None])
    x += noise * rng.standard_normal((n, length))
    return Signals(torch.as_tensor(x[:, None], dtype=torch.float32), torch.as_tensor(y))


def load_signals(n_train: int = 4000, n_test: int = 1000, length: int = 1024, seed: int = 0,
                 noise: float = 0.3, distractor: float = 0.5) -> tuple[Signals, Signals]:
    """Train and test signals drawn from independent seeded streams."""
    # Different streams rather than one split: the test set does not change with n_train.
    return (generate_signals(n_train, length, 2 * seed, noise, distractor),
            generate_signals(n_test, length, 2 * seed + 1, noise, distractor))
