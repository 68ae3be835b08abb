"""NADE, MADE and PixelCNN beside EugenHotaj/pytorch-generative's, same split, budget and widths.

    python benchmarks/autoregressive_vs_pytorch_generative.py --pg-dir DIR
        [--dataset digits-binary] [--steps 2000] [--batch-size 128] [--threads 1]

DIR is a checkout of https://github.com/EugenHotaj/pytorch-generative (its
``pytorch_generative`` folder is imported from there, never installed or copied; its package
``__init__`` files, which pull in torchvision and tensorboard, are skipped by registering the
folders as bare packages). Both libraries train on the same statically binarised training split
of mlatlas, in the same batch order, with Adam at the same learning rate for the same number of
steps, at matched widths: NADE with H ReLU hidden units (the peer's activation; ours defaults to
the paper's sigmoid, 0.4 nats worse here), MADE with one hidden layer of 500 and the peer's one
mask (its ordering and degrees copied, see ``with_peer_masks``), PixelCNN with a 7x7 mask-A
input, 4 residual blocks of 64 channels and a 64-channel head. The table gives the held-out NLL
(nats per example, the whole test split; mean and standard deviation over ``--seeds`` seeds of
initialisation and batch order) and seconds per epoch of each. Goal: ours at least as good, at
most 0.5x the time per epoch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mlatlas.core.runtime import set_threads
from mlatlas.data import EpochBatches
from mlatlas.generative import likelihood
from mlatlas.generative.autoregressive import made, nade, pixelcnn


def import_peer(root: Path):
    """pytorch_generative's model modules from ``root``, without its package __init__ files."""
    base = root / "pytorch_generative"
    if not (base / "models" / "base.py").is_file():
        sys.exit(f"{root} is not a pytorch-generative checkout (no pytorch_generative/models)")
    for name, folder in (("pytorch_generative", base), ("pytorch_generative.models",
                                                         base / "models")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package
    sys.path.insert(0, str(root))
    from pytorch_generative.models.autoregressive import made as pg_made
    from pytorch_generative.models.autoregressive import nade as pg_nade
    from pytorch_generative.models.autoregressive import pixel_cnn as pg_pixel_cnn
    return pg_nade, pg_made, pg_pixel_cnn


def peer_log_prob(kind: str, model, x: torch.Tensor) -> torch.Tensor:
    """log p(x) (B,) of a pytorch-generative model: NADE returns probabilities, the others
    logits."""
    out = model(x)
    if kind == "nade":
        return -F.binary_cross_entropy(out.clamp(1e-7, 1 - 1e-7), x,
                                       reduction="none").flatten(1).sum(1)
    return -F.binary_cross_entropy_with_logits(out, x, reduction="none").flatten(1).sum(1)


def with_peer_masks(model: made.MADE) -> made.MADE:
    """Our one-mask MADE given the ordering and hidden degrees pytorch-generative's draws (from
    numpy's RandomState(0), whatever the seed), so both learn the same factorisation: the draw
    alone moves the held-out NLL of the digits by 0.3 nats."""
    rng = np.random.RandomState(0)
    order = torch.from_numpy(rng.permutation(model.dims)) + 1
    hidden = torch.from_numpy(rng.randint(0, model.dims - 1, size=model.mask0.shape[1])) + 1
    input_mask, output_mask = made.made_masks([order, hidden])
    with torch.no_grad():
        model.mask0.copy_(input_mask[None])
        model.mask1.copy_(output_mask[None])
        model.direct_mask.copy_((order[:, None] > order[None, :]).float()[None])
        model.orders.copy_(torch.argsort(order)[None])
    return model


def train_and_score(log_prob, make_model, x_train, x_test, steps, batch_size, lr, seed):
    torch.manual_seed(seed)  # the initialisation, then the batch order, from the seed
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = EpochBatches(len(x_train), batch_size, seed)
    dims = x_train[0].numel()
    model.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        loss = -log_prob(model, x_train[batches(step)]).mean() / dims
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        nll = -float(torch.cat([log_prob(model, x_test[i:i + 500])
                                for i in range(0, len(x_test), 500)]).mean())
    return nll, seconds / (steps / batches.per_epoch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pg-dir", type=Path, required=True)
    parser.add_argument("--dataset", default="digits-binary")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=256, help="NADE's H")
    parser.add_argument("--models", default="nade,made,pixelcnn")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 for each library")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    pg_nade, pg_made, pg_pixel_cnn = import_peer(args.pg_dir)
    data = likelihood.load_data(made.Config(dataset=args.dataset))
    x_train, x_test = data.dataset.x_train, data.dataset.x_test
    shape, dims = data.dataset.sample_shape, data.dims
    pairs = {
        "nade": (lambda: nade.NADE(shape, args.hidden, activation="relu"),
                 lambda: pg_nade.NADE(dims, args.hidden)),
        "made": (lambda: with_peer_masks(made.MADE(shape, (500,), 1, 0)),
                 lambda: pg_made.MADE(dims, [500], n_masks=1)),
        "pixelcnn": (lambda: pixelcnn.PixelCNN(shape, 64, 4),
                     lambda: pg_pixel_cnn.PixelCNN(n_residual=4, residual_channels=32,
                                                   head_channels=64)),
    }
    print(f"{args.dataset}: {len(x_train)} train / {len(x_test)} test, {args.steps} steps of "
          f"{args.batch_size}, Adam {args.lr}, {args.threads} thread(s)")
    print(f"| model | ours NLL | theirs NLL | ours s/epoch | theirs s/epoch | time ratio |  "
          f"(mean +- sd over {args.seeds} seeds)")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in args.models.split(","):
        ours_fn, theirs_fn = pairs[kind]
        ours = [train_and_score(lambda m, x: m.log_prob(x), ours_fn, x_train, x_test,
                                args.steps, args.batch_size, args.lr, seed)
                for seed in range(args.seeds)]
        theirs = [train_and_score(lambda m, x, k=kind: peer_log_prob(k, m, x), theirs_fn,
                                  x_train, x_test, args.steps, args.batch_size, args.lr, seed)
                  for seed in range(args.seeds)]
        ours_t, theirs_t = (statistics.mean(r[1] for r in runs) for runs in (ours, theirs))
        print(f"| {kind} | {spread([r[0] for r in ours])} | {spread([r[0] for r in theirs])} | "
              f"{ours_t:.3f} | {theirs_t:.3f} | {ours_t / theirs_t:.2f} |", flush=True)


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


if __name__ == "__main__":
    main()
