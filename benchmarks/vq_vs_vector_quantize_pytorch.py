"""Time our VQ layer against vector-quantize-pytorch's ``VectorQuantize`` on the same codebook and
inputs: one training step of the layer (nearest code, straight-through output, commitment loss,
EMA codebook update) forward and backward, for several sizes. Its extras (rotation trick,
k-means init, dead-code expiry) are off, as in tests/test_parity_vq.py.

    .venv/bin/python benchmarks/vq_vs_vector_quantize_pytorch.py [--repeats 20] [--device cpu]

Prints the median time of each over --repeats steps and the ratio ours / theirs (below 1: ours
is faster). One thread on the CPU, float32.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import time

import torch
import vector_quantize_pytorch as vqp

from mlatlas.generative.vq.quantizer import VectorQuantizer

# (batch, code dim D, latent side, codebook size K)
SIZES = [(128, 16, 4, 64), (64, 64, 8, 512), (32, 64, 16, 1024), (16, 128, 16, 4096)]


def pair(k: int, d: int, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    ours = VectorQuantizer(k, d, ema=True).to(device)
    theirs = vqp.VectorQuantize(dim=d, codebook_size=k, decay=0.99, eps=1e-5,
                                commitment_weight=0.25, kmeans_init=False, rotation_trick=False,
                                threshold_ema_dead_code=0, accept_image_fmap=True).to(device)
    with torch.no_grad():
        theirs._codebook.embed.copy_(ours.codebook[None])
        theirs._codebook.embed_avg.copy_(ours.embed_sum[None])
    return ours, theirs


def step_ours(layer, x):
    q = layer(x)
    (q.z_q.square().mean() + q.loss).backward()


def step_theirs(layer, x):
    quantize, _, loss = layer(x)
    (quantize.square().mean() + loss.sum()).backward()


def median_ms(step, layer, x, repeats: int) -> float:
    times = []
    for i in range(repeats + 2):
        xi = x.clone().requires_grad_()
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(layer, xi)
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up steps
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    version = importlib.metadata.version("vector-quantize-pytorch")
    print(f"vector-quantize-pytorch {version}, torch {torch.__version__}, {args.device}, "
          f"median of {args.repeats} steps (forward + backward + EMA update)")
    print(f"{'B':>4} {'D':>4} {'h=w':>4} {'K':>5} | {'ours ms':>9} {'theirs ms':>9} | ours/theirs")
    for b, d, side, k in SIZES:
        ours, theirs = pair(k, d, args.device)
        ours.train()
        theirs.train()
        x = torch.randn(b, d, side, side, device=args.device)
        t_ours = median_ms(step_ours, ours, x, args.repeats)
        t_theirs = median_ms(step_theirs, theirs, x, args.repeats)
        print(f"{b:>4} {d:>4} {side:>4} {k:>5} | {t_ours:9.2f} {t_theirs:9.2f} | "
              f"{t_ours / t_theirs:.2f}")


if __name__ == "__main__":
    main()
