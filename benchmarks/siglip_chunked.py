"""Chunked SigLIP against the dense loss: peak memory and time of one forward + backward pass.

The sigmoid loss sums -log sigma(z_ij (t x_i . y_j + b)) over all N^2 pairs. The dense
``siglip_loss`` holds several N x N tensors for autograd; ``siglip_loss_chunked`` visits the
texts ``chunk`` at a time and works out each block's loss and gradients in one pass, so it holds
O(N chunk). For reference the script also times ``checkpoint``, the earlier chunked form that
wrapped each block in torch.utils.checkpoint and recomputed it in the backward pass.

Peak memory: each (loss, N, chunk) runs in a fresh Python process, which

1. makes (N, D) image and text features, t' and b (all requiring gradients) and runs the loss
   once at N = 64 so that libraries and kernels are loaded;
2. reads its peak resident memory, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``;
3. runs one forward + backward pass at full size and reads the peak again: the difference is
   the peak memory the loss added on top of its inputs (the features' gradients, 2 N D floats,
   count in it for every loss).

The child runs with MALLOC_MMAP_THRESHOLD_=65536 so that glibc serves every block over 64 KiB
with mmap and gives it back at once when torch frees it: resident memory then follows the live
tensors instead of a heap that only grows.

Time: one process per (N, threads) warms every loss up once, then runs ``--repeats`` rounds in
which each loss does one forward + backward pass in turn, and keeps each loss's median. Taking
the losses in turn spreads the load of a shared machine evenly over them; the ratio columns
compare each loss with the dense one at the same N and threads.

    python benchmarks/siglip_chunked.py --sizes 8192 16384 --chunks 256 512 1024 2048 --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mlatlas.contrastive.losses import (
    SIGLIP_BIAS_INIT,
    SIGLIP_T_PRIME_INIT,
    siglip_block_loss,
    siglip_loss,
    siglip_loss_chunked,
)


def siglip_loss_checkpointed(image_features: torch.Tensor, text_features: torch.Tensor,
                             t_prime: torch.Tensor, bias: torch.Tensor,
                             chunk: int) -> torch.Tensor:
    """The chunked loss as it was first written: each block recomputed in the backward pass."""
    x, y = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    total = x.new_zeros(())
    for start in range(0, len(y), chunk):
        total = total + checkpoint(siglip_block_loss, x, y[start:start + chunk], t_prime, bias,
                                   start, use_reentrant=False)
    return total / len(x)


LOSSES = {
    "dense": lambda x, y, t, b, chunk: siglip_loss(x, y, t, b),
    "chunked": siglip_loss_chunked,
    "checkpoint": siglip_loss_checkpointed,
}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def make_inputs(n: int, dim: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g, requires_grad=True)
    # Texts near their images, so that the loss is not dominated by the negatives.
    y = (x.detach() + 0.5 * torch.randn(n, dim, generator=g)).requires_grad_()
    t_prime = torch.tensor(SIGLIP_T_PRIME_INIT, requires_grad=True)
    bias = torch.tensor(SIGLIP_BIAS_INIT, requires_grad=True)
    return x, y, t_prime, bias


def step(loss_name: str, inputs: tuple[torch.Tensor, ...], chunk: int) -> float:
    for a in inputs:
        a.grad = None
    loss = LOSSES[loss_name](*inputs, chunk)
    loss.backward()
    return loss.item()


def measure_peak(loss_name: str, n: int, dim: int, chunk: int) -> dict:
    """Peak memory of one forward + backward pass, in this (fresh) process."""
    torch.set_num_threads(1)
    inputs = make_inputs(n, dim)
    step(loss_name, tuple(a[:64].detach().requires_grad_() for a in inputs[:2]) + inputs[2:],
         min(chunk, 64))
    baseline = peak_mib()
    value = step(loss_name, inputs, chunk)
    return {"value": value, "peak_mib": peak_mib() - baseline}


def peak_in_child(loss_name: str, n: int, dim: int, chunk: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, __file__, "--child", loss_name, str(n), str(dim), str(chunk)],
        env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_seconds(configs: list[tuple[str, int]], n: int, dim: int, threads: int,
                   repeats: int) -> list[float]:
    """Median forward + backward time of each (loss, chunk), the losses taken in turn."""
    torch.set_num_threads(threads)
    inputs = make_inputs(n, dim)
    for name, chunk in configs:
        step(name, inputs, chunk)
    times: list[list[float]] = [[] for _ in configs]
    for _ in range(repeats):
        for (name, chunk), record in zip(configs, times, strict=True):
            start = time.perf_counter()
            step(name, inputs, chunk)
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpoint-chunks", type=int, nargs="*", default=[1024],
                        help="chunk sizes at which to run the recomputing variant too")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, *numbers = args.child
        print(json.dumps(measure_peak(name, *map(int, numbers))))
        return

    print(f"D = {args.dim}; forward + backward; peak = ru_maxrss growth over the inputs "
          f"(1 thread); time = median of {args.repeats}, losses in turn")
    print(f"{'N':>6} {'loss':>10} {'chunk':>6} {'value':>9} {'peak MiB':>9} {'mem/dense':>9}"
          + "".join(f" {f'{t}thr s':>7} {'t/dense':>7}" for t in args.threads))
    for n in args.sizes:
        configs = [("dense", n)] + [("chunked", c) for c in args.chunks] + [
            ("checkpoint", c) for c in args.checkpoint_chunks]
        peaks = [peak_in_child(name, n, args.dim, chunk) for name, chunk in configs]
        seconds = [median_seconds(configs, n, args.dim, t, args.repeats) for t in args.threads]
        for i, ((name, chunk), peak) in enumerate(zip(configs, peaks, strict=True)):
            cells = "".join(f" {s[i]:>7.3f} {s[i] / s[0]:>7.3f}" for s in seconds)
            print(f"{n:>6} {name:>10} {'-' if name == 'dense' else chunk:>6} "
                  f"{peak['value']:>9.4f} {peak['peak_mib']:>9.1f} "
                  f"{peak['peak_mib'] / peaks[0]['peak_mib']:>9.3f}" + cells, flush=True)


if __name__ == "__main__":
    main()
