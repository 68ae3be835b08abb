"""Learning-rate schedules set by hand each step (a pure function of the step, so a resumed run
needs no scheduler state)."""

from __future__ import annotations

import math

import torch


def warmup_cosine_lr(lr: float, step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay from ``lr`` to 0 at the end."""
    warm = min(1.0, step / warmup_steps) if warmup_steps else 1.0
    return lr * warm * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
