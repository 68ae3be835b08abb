"""Every learning-rate (and step-size) schedule of the library, as a pure function of the step.

A schedule is set by hand each step (:func:`set_lr`), so a resumed run needs no scheduler state
and follows exactly the curve of an uninterrupted one. Writing them once here keeps the
families from growing their own variants; the shapes, with ``k`` the step and ``K`` the total:

    warmup_linear(lr, k, w)           = lr * min(1, k / w)                      (w = 0: lr)
    warmup_cosine(lr, k, K, w)        = warmup_linear(lr, k, w) * (1 + cos(pi min(k, K) / K)) / 2
    linear_decay(lr, p)               = lr * max(0, 1 - p),   p = progress in [0, 1]
    linear_interpolate(a, b, k, s, d) = a, then linearly to b over steps [s, s + d], then b
    exponential_decay(a, r, k)        = a * r^k
    inverse_power(c, k, p)            = c / k^p   (Robbins-Monro step sizes a_k, k = 1, 2, ...)

and the one moving average of weights, theta' <- tau theta + (1 - tau) theta'
(:func:`polyak_update`): DDPG/TD3's target networks (tau small) and the diffusion models' EMA
weights (tau = 1 - decay).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mlatlas.core import distributed


def warmup_linear_lr(lr: float, step: int, warmup_steps: int) -> float:
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps`` (steps count from 1), then ``lr``."""
    return lr * min(1.0, step / warmup_steps) if warmup_steps > 0 else lr


def warmup_cosine_lr(lr: float, step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay from ``lr`` to 0 at the end."""
    cosine = 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return warmup_linear_lr(lr, step, warmup_steps) * cosine


def linear_decay(value: float, progress: float) -> float:
    """``value`` decayed linearly to 0 as training ``progress`` goes from 0 to 1."""
    return value * max(0.0, 1.0 - progress)


def linear_interpolate(start: float, end: float, step: int, begin: int, duration: int) -> float:
    """``start`` until ``begin``, then linearly to ``end`` over ``duration`` steps, then ``end``."""
    progress = min(max(step - begin, 0) / max(duration, 1), 1.0)
    return start + (end - start) * progress


def exponential_decay(value: float, rate: float, step: int) -> float:
    """``value`` multiplied by ``rate`` once per step (rate 1 keeps it constant)."""
    return value * rate**step


def inverse_power(scale: float, step: int, power: float = 1.0) -> float:
    """a_k = c / k^p for k = 1, 2, ...: sum a_k diverges iff p <= 1 and sum a_k^2 converges iff
    p > 1/2, Robbins and Monro's conditions (Zhao, Theorem 6.1)."""
    return scale / step**power


def clip_and_step(optimizer: torch.optim.Optimizer, parameters, grad_clip: float,
                  scaler: torch.amp.GradScaler | None = None) -> float:
    """The optimizer step from the gradients the backward pass left: averaged over the ranks
    of a data-parallel job (:mod:`mlatlas.core.distributed`), unscaled by an fp16 ``scaler``,
    the global norm clipped to ``grad_clip`` (0 turns it off), then the step (which the scaler
    skips on inf/NaN gradients). Returns the norm before clipping."""
    parameters = [p for p in parameters if p.requires_grad]
    distributed.all_reduce_gradients(parameters)
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = (torch.nn.utils.clip_grad_norm_(parameters, grad_clip) if grad_clip > 0
            else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters
                                                       if p.grad is not None])))
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return float(norm)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def polyak_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """theta' <- tau theta + (1 - tau) theta', parameter by parameter (buffers copied)."""
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)
        for t, s in zip(target.buffers(), source.buffers(), strict=True):
            t.copy_(s)
