"""Distributed CLIP training throughput: DistributedDataParallel on W gloo processes against one.

Trains the CLIP model of ``mlatlas.contrastive.clip.build_model`` (CNN image tower, Transformer
text tower, default widths) on the captioned shapes, one torch thread per process, and times
``--steps`` optimiser steps after ``--warmup`` untimed ones in three settings:

- 1 process, batch B (the baseline);
- W processes, B / W pairs each: the same global batch, the loss of
  ``clip_loss_distributed`` (all-gather) equals the baseline's, so the runs take the same steps;
- W processes, B pairs each: the same per-process batch, a global batch of W B.

Throughput is global pairs per second, timed by the slowest rank. The last column is the loss
at the last step: equal global batches start from the same weights and see the same pairs, so
their losses agree up to float32 rounding, a check of the distributed loss and DDP's gradient
average together. On a machine with fewer free cores than W processes the processes share
cores and the ratio says so.

    python benchmarks/contrastive_distributed.py --steps 20 --batch-size 256 --nprocs 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mlatlas.contrastive import clip
from mlatlas.contrastive.common import optimizer_step
from mlatlas.contrastive.data import load_captioned
from mlatlas.contrastive.distributed import clip_loss_distributed, siglip_loss_distributed
from mlatlas.contrastive.text import CaptionTokenizer
from mlatlas.contrastive.towers import DualEncoder
from mlatlas.core.runtime import set_threads
from mlatlas.data import EpochBatches


class DistributedLoss(nn.Module):
    """The model's forward pass with the loss taken over every process's batch."""

    def __init__(self, model: DualEncoder):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, ids: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        x, y = self.model.encode_image(images), self.model.encode_text(ids, mask)
        if self.model.loss_name == "clip":
            return clip_loss_distributed(x, y, self.model.logit_scale)
        return siglip_loss_distributed(x, y, self.model.t_prime, self.model.bias)


def worker(rank: int, world: int, per_process: int, args: argparse.Namespace, shared: dict,
           folder: str) -> None:
    set_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank,
                                world_size=world)
    cfg = shared["cfg"]
    torch.manual_seed(cfg.seed)
    model = DistributedLoss(clip.build_model(cfg, shared["data"], shared["tokenizer"]))
    # DDP broadcasts rank 0's weights at construction and averages gradients in backward.
    module = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    images, ids, mask = shared["images"], shared["ids"], shared["mask"]
    batches = EpochBatches(len(images), per_process * world, cfg.seed)

    def step(s: int) -> float:
        index = batches(s)[rank * per_process:(rank + 1) * per_process]
        loss = module(images[index], ids[index], mask[index])
        optimizer_step(optimizer, loss, cfg.grad_clip)
        return loss.item()

    for s in range(1, args.warmup + 1):
        step(s)
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    for s in range(args.warmup + 1, args.warmup + args.steps + 1):
        loss = step(s)
    result = torch.tensor([time.perf_counter() - start, loss], dtype=torch.float64)
    if world > 1:
        # The step ends when the slowest rank ends; the global loss is the mean of L_r.
        elapsed = result[:1].clone()
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        dist.all_reduce(result[1:])
        result = torch.cat([elapsed, result[1:] / world])
        dist.destroy_process_group()
    if rank == 0:
        torch.save(result, f"{folder}/result.pt")


def measure(world: int, per_process: int, args: argparse.Namespace, shared: dict):
    with tempfile.TemporaryDirectory() as folder:
        # fork hands the processes this one's data and imported modules (spawn pickles them).
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        mp.start_processes(worker, args=(world, per_process, args, shared, folder), nprocs=world,
                           start_method=method)
        seconds, loss = torch.load(f"{folder}/result.pt").tolist()
    return seconds / args.steps, per_process * world * args.steps / seconds, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="global batch of the baseline, divisible by --nprocs")
    parser.add_argument("--nprocs", type=int, default=2, help="processes W of the DDP runs")
    parser.add_argument("--loss", choices=["clip", "siglip"], default="clip")
    parser.add_argument("--n-train", type=int, default=4096)
    args = parser.parse_args()
    if args.nprocs < 2 or args.batch_size % args.nprocs:
        parser.error("--nprocs must be at least 2 and divide --batch-size")
    if args.n_train < args.batch_size * args.nprocs:
        parser.error("--n-train must hold at least --batch-size x --nprocs pairs")
    set_threads(1)
    cfg = (clip.Config if args.loss == "clip" else clip.SigLIPConfig)(n_train=args.n_train)
    data = load_captioned(cfg.dataset, n_train=cfg.n_train, n_test=64, seed=cfg.seed)
    tokenizer = CaptionTokenizer.train(data.train.captions, cfg.vocab_size, cfg.max_len)
    ids, mask = tokenizer.encode(data.train.captions)
    shared = {"cfg": cfg, "data": data, "tokenizer": tokenizer, "images": data.train.images,
              "ids": ids, "mask": mask}

    b, w = args.batch_size, args.nprocs
    print(f"{args.loss} on {cfg.dataset}, {args.steps} timed steps, 1 thread a process, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"{'processes':>9} {'batch/process':>13} {'global batch':>12} {'s/step':>7} "
          f"{'pairs/s':>8} {'vs 1 process':>12} {'last loss':>10}")
    baseline = None
    for world, per_process in ((1, b), (w, b // w), (w, b)):
        seconds, pairs, loss = measure(world, per_process, args, shared)
        baseline = baseline or pairs
        print(f"{world:>9} {per_process:>13} {world * per_process:>12} {seconds:>7.3f} "
              f"{pairs:>8.1f} {pairs / baseline:>11.2f}x {loss:>10.5f}", flush=True)


if __name__ == "__main__":
    main()
