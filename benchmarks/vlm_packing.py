"""Packed against padded encoding of images of mixed sizes by MoonViT: tokens per second.

A batch of ``--batch`` images cycles through mixed sizes (32x32, 32x64, 64x64, 48x32, ...),
patches of ``--patch`` px. Four ways to encode the same patches with the same model:

    packed   one sequence of all N patches, the block-diagonal mask M_ab = [img(a) = img(b)]
             (MoonViT.forward on :func:`pack`); attention costs O(N^2) for the dense mask,
             though only sum_j n_j^2 of its entries are True
    padded   each image's patches zero-padded to the longest image's T_max, a (B, T_max)
             batch with a padding mask; costs B T_max^2 and wastes B T_max - N tokens
    chunked  images grouped in order into sequences of at most ``--chunk`` patches
             (:func:`budget_groups`), each sequence packed with its own block-diagonal mask,
             the sequences padded to the longest one and batched (padding tokens form a
             block of their own, so a padded query never has every key masked)
    bucketed images of one size batched together, one (G, n, P) batch per size and no mask:
             no padding and sum_j n_j^2 attention, what a variable-length attention kernel
             (flash-attn's varlen, flex attention's document mask) does for a packed sequence;
             possible here because the batch has only a few distinct sizes

All four compute the same outputs for the real tokens (checked before timing). Tokens per
second counts real patches only, N / time; the ratio columns divide by padded's. One process
warms each mode up once, then runs ``--repeats`` rounds taking the modes in turn (spreading the
load of a shared machine evenly) and keeps each mode's median. ``fwd`` is a forward pass under
no_grad, ``fwd+bwd`` a forward and backward pass of the mean square of the real outputs.

    python benchmarks/vlm_packing.py --batch 8 32 --threads 1 --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn.utils.rnn import pad_sequence

from mlatlas.multimodal.vision import EncoderConfig, MoonViT, batch_chunks, budget_groups, pack

SIZES = [(32, 32), (32, 64), (64, 64), (48, 32), (64, 32), (32, 48), (48, 48), (64, 48)]


def make_images(batch: int, channels: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(channels, *SIZES[i % len(SIZES)], generator=g) for i in range(batch)]


def prepare(images: list[torch.Tensor], patch: int, chunk: int, device: str) -> dict:
    budget = sum((x.shape[1] // patch) * (x.shape[2] // patch) for x in images)
    singles = [pack([x], patch, budget) for x in images]
    padded = {
        "patches": pad_sequence([p.patches for p in singles], batch_first=True),
        "positions": pad_sequence([p.positions for p in singles], batch_first=True),
        "real": pad_sequence([torch.ones(len(p.patches), dtype=torch.bool) for p in singles],
                             batch_first=True),
    }
    padded["mask"] = padded["real"][:, None, None, :]
    chunked = vars(batch_chunks([pack([images[j] for j in group], patch, chunk)
                                 for group in budget_groups(images, patch, chunk)]))
    lengths = [len(p.patches) for p in singles]
    buckets = [[j for j, n in enumerate(lengths) if n == size] for size in sorted(set(lengths))]
    starts = torch.tensor([0, *lengths]).cumsum(0)
    # Token indices in bucket order, so that the bucketed outputs can be put back in image order.
    order = torch.cat([torch.arange(starts[j], starts[j + 1]) for b in buckets for j in b])
    bucketed = [(torch.stack([singles[j].patches for j in b]).to(device),
                 torch.stack([singles[j].positions for j in b]).to(device)) for b in buckets]
    return {"packed": pack(images, patch, budget).to(device),
            "padded": {k: v.to(device) for k, v in padded.items()},
            "chunked": {k: v.to(device) for k, v in chunked.items()},
            "bucketed": {"batches": bucketed, "inverse": order.argsort().to(device)}}


def run_mode(model: MoonViT, mode: str, inputs) -> torch.Tensor:
    """The (N, width) outputs of the real tokens, in image order."""
    if mode == "packed":
        return model(inputs)
    if mode == "bucketed":
        outs = [model.encode(patches, positions, None).flatten(0, 1)
                for patches, positions in inputs["batches"]]
        return torch.cat(outs)[inputs["inverse"]]
    out = model.encode(inputs["patches"], inputs["positions"], inputs["mask"])
    return out[inputs["real"]]


def step(model: MoonViT, mode: str, inputs, backward: bool, device: str) -> float:
    start = time.perf_counter()
    if backward:
        model.zero_grad(set_to_none=True)
        run_mode(model, mode, inputs).square().mean().backward()
    else:
        with torch.no_grad():
            run_mode(model, mode, inputs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=512,
                        help="patches per sequence for the chunked mode (--max-patches)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = EncoderConfig(patch_size=args.patch, width=args.width, depth=args.depth,
                           heads=args.heads, hidden_dim=4 * args.width)
    model = MoonViT(config).to(args.device)
    modes = ("packed", "padded", "chunked", "bucketed")
    print(f"MoonViT width {args.width}, depth {args.depth}, {args.heads} heads, patches of "
          f"{args.patch} px; {args.device}, {args.threads} thread(s); tokens/s = real patches / "
          f"median of {args.repeats}; chunks of <= {args.chunk} patches")
    print(f"{'batch':>5} {'N':>6} {'T_max':>5} {'pad %':>5} {'chunks':>6} {'pass':>7}"
          + "".join(f" {m + ' tok/s':>14}" for m in modes)
          + f" {'packed/pad':>10} {'chunk/pad':>9} {'bucket/pad':>10}")
    for batch in args.batch:
        images = make_images(batch, config.in_channels)
        inputs = prepare(images, args.patch, args.chunk, args.device)
        N = inputs["packed"].patches.shape[0]
        T_max = inputs["padded"]["patches"].shape[1]
        with torch.no_grad():
            reference = run_mode(model, "packed", inputs["packed"])
            for mode in modes[1:]:
                torch.testing.assert_close(run_mode(model, mode, inputs[mode]), reference,
                                           atol=1e-4, rtol=1e-4)
        for backward in (False, True):
            for mode in modes:
                step(model, mode, inputs[mode], backward, args.device)
            times: dict[str, list[float]] = {m: [] for m in modes}
            for _ in range(args.repeats):
                for mode in modes:
                    times[mode].append(step(model, mode, inputs[mode], backward, args.device))
            rate = {m: N / statistics.median(times[m]) for m in modes}
            print(f"{batch:>5} {N:>6} {T_max:>5} {100 * (1 - N / (batch * T_max)):>5.0f} "
                  f"{inputs['chunked']['patches'].shape[0]:>6} "
                  f"{'fwd+bwd' if backward else 'fwd':>7}"
                  + "".join(f" {rate[m]:>14,.0f}" for m in modes)
                  + f" {rate['packed'] / rate['padded']:>10.2f}"
                  f" {rate['chunked'] / rate['padded']:>9.2f}"
                  f" {rate['bucketed'] / rate['padded']:>10.2f}")


if __name__ == "__main__":
    main()
