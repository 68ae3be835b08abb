"""Seeds, devices and thread counts."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from mlatlas.core.config import ConfigError

# Measured with benchmarks/threads.py on a 2-core machine (docs/methods/ddpm.md): a second
# intra-op thread makes the digits UNet 1.4x faster when the other core is idle but 2.5x slower
# when it is busy, and never helps the 2D MLP. One thread is the safe default.
DEFAULT_THREADS = 1
MAX_THREADS = 1024


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a fresh generator for the run's own randomness."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (seeds code that uses the legacy global RNG)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {name!r}; use cpu, cuda, cuda:N or auto")
    return device


def idle_cores() -> int:
    """Cores no other process is using now: the core count minus the 1-minute load average
    (rounded), at least 1. A second thread on a busy core made the digits UNet 8x slower, not
    faster (benchmarks/threads.py), so a command that would take every core takes only these.
    The load average lags by about a minute; where it is unknown (Windows), every core."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cores
    return max(1, cores - round(load))


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads: an explicit number, $MLATLAS_THREADS, or the default; 0
    takes every core."""
    where = "--threads"
    if threads is None:
        where, text = "$MLATLAS_THREADS", os.environ.get("MLATLAS_THREADS", str(DEFAULT_THREADS))
        try:
            threads = int(text)
        except ValueError:
            raise ConfigError(f"$MLATLAS_THREADS must be an integer in 0..{MAX_THREADS}, "
                              f"got {text!r}") from None
    if not 0 <= threads <= MAX_THREADS:
        raise ConfigError(f"{where} must be in 0..{MAX_THREADS} (0: every core), got {threads}")
    if threads == 0:
        threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads
