"""Time a Glow-like stack of ours against normflows 1.7's on the same input: K steps of ActNorm,
LU 1x1 convolution and affine coupling (sigmoid scale, the same 3x3-1x1-3x3 coupling network),
one forward (data -> latent) plus one inverse pass, with and without gradients.

    .venv/bin/python benchmarks/flows_vs_normflows.py [--batch 64] [--channels 16] [--size 16]

Prints the median time of each library over --repeats runs and the ratio ours / normflows
(below 1: ours is faster). One thread, CPU, float32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import normflows as nf
import torch

from mlatlas.generative.flows import layers


def ours_stack(c: int, hidden: int, k: int) -> layers.FlowSequence:
    steps = []
    for _ in range(k):
        steps += [layers.ActNorm(c), layers.InvertibleConv1x1(c),
                  layers.AffineCoupling(layers.conv_net(c - c // 2, 2 * (c // 2), hidden),
                                        scale="sigmoid")]
    return layers.FlowSequence(*steps)


class TheirStack(torch.nn.Module):
    """normflows' GlowBlocks; its inverse is the data -> latent direction."""

    def __init__(self, c: int, hidden: int, k: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            nf.flows.GlowBlock(c, hidden, scale=True, scale_map="sigmoid", split_mode="channel",
                               leaky=0.0, init_zeros=True, use_lu=True) for _ in range(k))
        for block in self.blocks:  # weights set below: skip ActNorm's lazy initialisation
            block.flows[-1].data_dep_init_done = torch.tensor(1.0)

    def forward(self, x):  # data -> latent
        logdet = 0
        for block in reversed(self.blocks):
            x, ld = block.inverse(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z):  # latent -> data
        for block in self.blocks:
            z, _ = block(z)
        return z


def randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))


def one_pass(model, x, grad: bool) -> None:
    if grad:
        z, logdet = model(x)
        (z.square().sum() - logdet.sum()).backward()
        with torch.no_grad():
            model.inverse(z.detach())
    else:
        with torch.no_grad():
            z, _ = model(x)
            model.inverse(z)


def time_pair(ours, theirs, x, repeats: int, grad: bool) -> tuple[float, float]:
    """Median seconds of one pass of each, the two timed alternately (so that a busy neighbour
    slows both alike)."""
    one_pass(ours, x, grad)  # warm-up
    one_pass(theirs, x, grad)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for model, out in ((ours, times[0]), (theirs, times[1])):
            start = time.perf_counter()
            one_pass(model, x, grad)
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="K, steps of flow")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    c = args.channels
    ours, theirs = ours_stack(c, args.hidden, args.steps), TheirStack(c, args.hidden, args.steps)
    randomise(ours)
    randomise(theirs)
    x = torch.randn(args.batch, c, args.size, args.size)
    print(f"K = {args.steps} steps of (ActNorm, LU 1x1 conv, affine coupling), hidden "
          f"{args.hidden}, input {tuple(x.shape)}, 1 thread, median of {args.repeats}, "
          "timed alternately")
    for grad in (False, True):
        t_ours, t_theirs = time_pair(ours, theirs, x, args.repeats, grad)
        what = "forward + backward + inverse" if grad else "forward + inverse (no grad)"
        print(f"{what:30s} ours {1000 * t_ours:7.1f} ms   normflows {1000 * t_theirs:7.1f} ms"
              f"   ratio ours/normflows {t_ours / t_theirs:.2f}")


if __name__ == "__main__":
    main()
