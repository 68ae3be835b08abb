"""Data parallelism: W processes train one model on one global batch.

Rank r = 0..W-1 holds rows r n .. r n + n - 1 of the global batch of N = W n examples and
computes the mean loss of its rows, L_r. Every method's loss is a mean over examples (or, for
the contrastive losses of :mod:`mlatlas.contrastive.distributed`, built so that the mean over
ranks is the single-process loss), so the full-batch gradient is the mean of the ranks' ones:

    g = d/dtheta (1/W) sum_r L_r = (1/W) sum_r g_r,

which :func:`all_reduce_gradients` computes (one all-reduce of all gradients, flattened into
one buffer, as DistributedDataParallel's buckets do) before the optimizer step. Every rank then
applies the same update to the same parameters and they stay equal without being sent again.

Reproducible whatever W. The global batch's indices are a pure function of (seed, step); every
rank draws the *global* batch's random numbers (noise, time steps, augmentations, token samples)
from the run's one generator and keeps its own rows (:func:`randn`, :func:`rand`,
:func:`randint`), so every rank's generator stays in the state it has in a one-process run. A run
at W = 2 therefore follows the run at W = 1 up to the order of floating-point sums, and a
checkpoint written at one world size resumes at another.

Rank 0 alone writes (``Run`` checks :func:`is_main`); every rank reads the checkpoint it wrote.
Without ``torch.distributed`` initialised, everything here is the one-process identity.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from mlatlas.core.config import ConfigError

# How long a collective waits for a missing rank before it fails (torch's default is 30 min,
# far too long for a peer that died on a laptop; a slow first step still fits).
TIMEOUT = datetime.timedelta(minutes=5)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True inside a process started by ``torchrun`` (or ``mlatlas train --nproc``) with more
    than one process in the job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> torch.device:
    """Join the job's process group if this process was launched as one of several (gloo on
    CPU, NCCL on CUDA) and return the device this rank uses: ``cuda:LOCAL_RANK`` on GPUs, the
    given device otherwise. Idempotent; a plain process is left alone."""
    if not launched():
        return device
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} needs cuda:{local_rank}, but this machine "
                              f"has {torch.cuda.device_count()} GPU(s); start at most that many "
                              "processes per machine")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
    return device


def shutdown(synchronize: bool = False) -> None:
    """Leave the process group. After a job that ended well, ``synchronize`` first waits for
    every rank: a rank that tears gloo down while a peer is still writing its last files can
    abort in gloo's background thread ("terminate called without an active exception"). After
    a failure there is no barrier, since a peer may be gone for good."""
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def check_divisible(value: int, name: str, world: int) -> None:
    """ConfigError unless the global ``value`` of ``--name`` splits evenly over ``world``
    ranks."""
    if value % world:
        raise ConfigError(f"--{name.replace('_', '-')} {value} is the global batch and does "
                          f"not split over {world} processes; use a multiple of {world}")


def shard_slice(n_global: int) -> slice:
    """The rows of a global batch of ``n_global`` that this rank holds."""
    world = world_size()
    if n_global % world:
        raise ValueError(f"a global batch of {n_global} does not split over {world} ranks")
    n = n_global // world
    return slice(rank() * n, (rank() + 1) * n)


def shard(x: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global batch (dim 0)."""
    return x[shard_slice(len(x))] if active() else x


def shard_list(items: Sequence[Any]) -> list[Any]:
    return list(items[shard_slice(len(items))]) if active() else list(items)


def _global_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    return (shape[0] * world_size(), *shape[1:])


def randn(shape: Sequence[int], *, generator: torch.Generator | None = None,
          device: torch.device | str | None = None,
          dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.randn`` of this rank's rows (``shape[0]`` of them) of the global batch's draw:
    the generator advances as in a one-process run of the whole batch."""
    if not active():
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return shard(torch.randn(_global_shape(shape), generator=generator, device=device,
                             dtype=dtype))


def rand(shape: Sequence[int], *, generator: torch.Generator | None = None,
         device: torch.device | str | None = None,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.rand`` of this rank's rows of the global batch's draw (see :func:`randn`)."""
    if not active():
        return torch.rand(shape, generator=generator, device=device, dtype=dtype)
    return shard(torch.rand(_global_shape(shape), generator=generator, device=device,
                            dtype=dtype))


def randint(low: int, high: int, shape: Sequence[int], *,
            generator: torch.Generator | None = None,
            device: torch.device | str | None = None) -> torch.Tensor:
    """``torch.randint`` of this rank's rows of the global batch's draw (see :func:`randn`)."""
    if not active():
        return torch.randint(low, high, shape, generator=generator, device=device)
    return shard(torch.randint(low, high, _global_shape(shape), generator=generator,
                               device=device))


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """g <- (1/W) sum_r g_r for every parameter, in one collective per dtype and device.

    A rank whose batch did not reach a parameter sends zeros for it, so every rank sends one
    layout (unequal buffers would hang the job); a parameter no rank reached keeps ``None``, as
    in a one-process run, so the optimizer skips it there too."""
    if not active():
        return
    world = dist.get_world_size()
    by_type: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
    for p in parameters:
        if p.requires_grad:
            by_type.setdefault((p.dtype, p.device), []).append(p)
    for (dtype, device), group in by_type.items():
        # One buffer: the gradients, then one flag per parameter saying whether a rank had it.
        sizes = [p.numel() for p in group]
        flat = torch.zeros(sum(sizes) + len(group), dtype=dtype, device=device)
        *chunks, reached = flat.split([*sizes, len(group)])
        for i, (p, chunk) in enumerate(zip(group, chunks, strict=True)):
            if p.grad is not None:
                chunk.copy_(p.grad.reshape(-1))
                reached[i] = 1
        dist.all_reduce(flat)
        flat /= world
        for p, chunk, hit in zip(group, chunks, reached.tolist(), strict=True):
            if hit:
                if p.grad is None:
                    p.grad = chunk.view_as(p).clone()
                else:
                    p.grad.copy_(chunk.view_as(p))


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a tensor every rank holds (a copy; the input is unchanged)."""
    if not active():
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if not active():
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (no gradient; equal shapes on all ranks)."""
    if not active():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (a path, a flag)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()
