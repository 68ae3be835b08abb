"""The MoE decoder against the dense decoder of the same active parameters: tokens per second.

    python benchmarks/moe_vs_dense.py [--batch-sizes 4 16 64] [--seq-len 64] [--repeats 5] \\
        [--threads 1] [--device cpu]

Both models are :class:`mlatlas.multimodal.decoder.MoEDecoder`: the default ``DecoderConfig``
(8 routed experts of width 64, 1 shared, top-2, the first layer dense) and its
``dense_equivalent``, whose MoE layers are SwiGLUs of width (2 + 1) 64, the matrices one token
runs through. Per token both do the same expert arithmetic; the MoE model adds the router and
the dispatch (sorting token-expert pairs, E small matmuls instead of one, a gather back), which is
what the ratio measures. Parameters: total, and active per token (the MoE's routers, E x dim per
MoE layer, are the only difference in the active count).

For each batch size the script times ``--repeats`` rounds, each running forward only (under
no_grad) and forward + backward (mean logit as the loss) of each model in turn, after one warm-up
round, and reports each median as tokens per second (batch x seq_len / seconds) and the
MoE / dense ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mlatlas.core.runtime import resolve_device
from mlatlas.multimodal.decoder import (
    DecoderConfig,
    MoEDecoder,
    active_parameters,
    count_parameters,
    dense_equivalent,
)


def seconds(model: MoEDecoder, tokens: torch.Tensor, backward: bool) -> float:
    if tokens.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    if backward:
        model.zero_grad(set_to_none=True)
        model(tokens).mean().backward()
    else:
        with torch.no_grad():
            model(tokens)
    if tokens.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=args.vocab)
    models = {"moe": MoEDecoder(cfg).to(device),
              "dense": MoEDecoder(dense_equivalent(cfg)).to(device)}
    for name, model in models.items():
        print(f"{name:6s} parameters {count_parameters(model):>9,d} total, "
              f"{active_parameters(model):>9,d} active per token")
    print(f"\n{'batch':>5s} {'pass':>8s} {'moe tok/s':>11s} {'dense tok/s':>12s} "
          f"{'moe/dense':>10s}")
    for batch in args.batch_sizes:
        tokens = torch.randint(0, args.vocab, (batch, args.seq_len), device=device)
        for backward in (False, True):
            times: dict[str, list[float]] = {name: [] for name in models}
            for round_ in range(args.repeats + 1):
                for name, model in models.items():
                    t = seconds(model, tokens, backward)
                    if round_:  # round 0 warms up
                        times[name].append(t)
            rate = {name: batch * args.seq_len / statistics.median(ts)
                    for name, ts in times.items()}
            print(f"{batch:5d} {'fwd+bwd' if backward else 'fwd':>8s} {rate['moe']:11.0f} "
                  f"{rate['dense']:12.0f} {rate['moe'] / rate['dense']:10.2f}")


if __name__ == "__main__":
    main()
