"""CLIP and SigLIP losses against open_clip's ClipLoss and SigLipLoss: agreement and speed.

For each batch size N the script draws (N, D) image features, texts near them, a log-scale t
and a bias b, and runs our loss and open_clip's on the same leaves. open_clip's losses take
L2-normalised features and the scale already exponentiated, so they get F.normalize(features)
and t.exp() under autograd; ours take the raw features and t (t' for SigLIP). It prints the
largest absolute difference of the loss and of the gradients with respect to the features, t
and b, in float64 and float32, and the median time of one forward + backward pass of ours over
open_clip's (float32).

open_clip needs torchvision, which installs only beside torch 2.14.1, so run this in its own
environment (the wheels come from the package index; torch 2.14.1 is a CUDA build of ~5.5 GB):

    python3 -m venv /tmp/venv-openclip
    /tmp/venv-openclip/bin/pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch==3.3.0
    /tmp/venv-openclip/bin/pip install -e . --no-deps
    /tmp/venv-openclip/bin/python benchmarks/contrastive_vs_open_clip.py --sizes 256 1024 4096
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from mlatlas.contrastive.losses import (
    CLIP_LOGIT_SCALE_INIT,
    SIGLIP_BIAS_INIT,
    SIGLIP_T_PRIME_INIT,
    clip_loss,
    siglip_loss,
    siglip_loss_chunked,
)


def leaves(n: int, dim: int, dtype: torch.dtype, t_value: float, b_value: float):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, dim, generator=g, dtype=dtype, requires_grad=True)
    y = (x.detach() + torch.randn(n, dim, generator=g, dtype=dtype)).requires_grad_()
    t = torch.tensor(t_value, dtype=dtype, requires_grad=True)
    b = torch.tensor(b_value, dtype=dtype, requires_grad=True)
    return x, y, t, b


def pairs(chunk: int):
    """(name, ours, open_clip's, t, b, wants_b): each loss as a function of the leaves."""
    clip_peer, siglip_peer = ClipLoss(), SigLipLoss()

    def clip_theirs(x, y, t, b):
        return clip_peer(F.normalize(x, dim=-1), F.normalize(y, dim=-1), t.exp())

    def siglip_theirs(x, y, t, b):
        return siglip_peer(F.normalize(x, dim=-1), F.normalize(y, dim=-1), t.exp(), b)

    return [
        ("clip", lambda x, y, t, b: clip_loss(x, y, t), clip_theirs, CLIP_LOGIT_SCALE_INIT, 0.0,
         False),
        ("siglip", siglip_loss, siglip_theirs, SIGLIP_T_PRIME_INIT, SIGLIP_BIAS_INIT, True),
        (f"siglip chunk {chunk}", lambda x, y, t, b: siglip_loss_chunked(x, y, t, b, chunk),
         siglip_theirs, SIGLIP_T_PRIME_INIT, SIGLIP_BIAS_INIT, True),
    ]


def max_differences(ours, theirs, inputs, wrt) -> tuple[float, float]:
    """Largest |difference| of the loss and of any gradient."""
    a, c = ours(*inputs), theirs(*inputs)
    grads = zip(torch.autograd.grad(a, wrt), torch.autograd.grad(c, wrt), strict=True)
    return (a - c).abs().item(), max((ga - gc).abs().max().item() for ga, gc in grads)


def median_seconds(loss_fns, inputs, wrt, repeats: int) -> list[float]:
    """Median forward + backward time of each loss, the losses taken in turn so that the load
    of a shared machine falls on them evenly."""
    for loss_fn in loss_fns:
        torch.autograd.grad(loss_fn(*inputs), wrt)  # warm-up
    times: list[list[float]] = [[] for _ in loss_fns]
    for _ in range(repeats):
        for loss_fn, record in zip(loss_fns, times, strict=True):
            start = time.perf_counter()
            torch.autograd.grad(loss_fn(*inputs), wrt)
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"D = {args.dim}, {args.threads} thread(s); |diff| = largest absolute difference; "
          f"time = median of {args.repeats} forward + backward passes in float32, "
          f"ours and open_clip's in turn")
    print(f"{'N':>5} {'loss':>17} {'loss f64':>9} {'grad f64':>9} {'loss f32':>9} "
          f"{'grad f32':>9} {'ours s':>8} {'peer s':>8} {'ours/peer':>9}")
    for n in args.sizes:
        for name, ours, theirs, t_value, b_value, wants_b in pairs(args.chunk):
            row = []
            for dtype in (torch.float64, torch.float32):
                inputs = leaves(n, args.dim, dtype, t_value, b_value)
                wrt = inputs if wants_b else inputs[:3]
                row += max_differences(ours, theirs, inputs, wrt)
            ours_s, peer_s = median_seconds((ours, theirs), inputs, wrt, args.repeats)
            print(f"{n:>5} {name:>17} " + " ".join(f"{v:>9.1e}" for v in row)
                  + f" {ours_s:>8.4f} {peer_s:>8.4f} {ours_s / peer_s:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
