"""Held-out NLL of every likelihood model of the library on one table, nats and bits/dim.

    python benchmarks/likelihood_table.py [--binary digits-binary] [--grey digits]
        [--points 8gaussians] [--methods fvsbn,nade,...] [--steps N] [--threads 1]

Trains each model with its `mlatlas train NAME` defaults (``--steps`` overrides them all) and
scores the whole test split through the one evaluation, `mlatlas.generative.likelihood`:
the Bernoulli models on ``--binary`` (exact NLL), the flows on ``--grey`` (dequantisation
bound, D log L included) and on ``--points``, and the VP diffusion model on ``--points`` by
its probability-flow ODE (the diffusion family's own likelihood). The pixel-independent
baseline of each dataset heads its block. Prints a markdown table with the training seconds.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from mlatlas.core.run import Run
from mlatlas.core.runtime import set_threads
from mlatlas.generative import likelihood
from mlatlas.registry import METHODS

BERNOULLI = ["fvsbn", "nade", "made", "pixelcnn", "gated_pixelcnn"]
FLOWS = ["nice", "realnvp", "glow"]


def row(name: str, dataset: str, nll: float, bpd: float, seconds: float | None) -> str:
    secs = f"{seconds:.0f}" if seconds is not None else "-"
    return f"| {name} | {dataset} | {nll:.2f} | {bpd:.4f} | {secs} |"


def train_likelihood(name: str, dataset: str, steps: int | None, out: Path) -> tuple[dict, float]:
    method = METHODS[name]
    overrides = {"dataset": dataset, "eval_samples": 0}
    if steps:
        overrides["steps"] = steps
    cfg = method.config_cls(**overrides)
    start = time.perf_counter()
    run = likelihood.train(cfg, Run.create(name, cfg, root=out), progress=False)
    seconds = time.perf_counter() - start
    return likelihood.evaluate(run, n=0), seconds


def train_vp(dataset: str, steps: int | None, out: Path) -> tuple[dict, float]:
    from mlatlas.generative.diffusion import configs, loop

    cfg = configs.VPConfig(dataset=dataset, eval_samples=0, **({"steps": steps} if steps else {}))
    start = time.perf_counter()
    run = loop.train(cfg, Run.create("vp", cfg, root=out), progress=False)
    seconds = time.perf_counter() - start
    _, data, model = loop.load_model(run)
    return loop.held_out_nll(cfg.formulation(), model, data, n=len(data.x_test)), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--binary", default="digits-binary")
    parser.add_argument("--grey", default="digits")
    parser.add_argument("--points", default="8gaussians")
    parser.add_argument("--methods", default=",".join([*BERNOULLI, *FLOWS, "vp"]))
    parser.add_argument("--steps", type=int, default=None, help="override every model's steps")
    parser.add_argument("--out", type=Path, default=Path("runs/likelihood-table"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    methods = args.methods.split(",")
    print("| model | data | test NLL (nats/example) | bits/dim | train s |")
    print("|---|---|---:|---:|---:|")
    baseline_done = set()
    jobs = [(m, args.binary) for m in methods if m in BERNOULLI]
    jobs += [(m, args.grey) for m in methods if m in FLOWS]
    jobs += [(m, args.points) for m in methods if m in FLOWS or m == "vp"]
    for name, dataset in jobs:
        if name == "vp":
            metrics, seconds = train_vp(dataset, args.steps, args.out)
            nll = metrics["test_nll_nats"]
            print(row("vp (probability-flow ODE)", dataset, nll, nll / (2 * math.log(2)),
                      seconds), flush=True)
            continue
        if name not in METHODS:
            print(f"| {name} | {dataset} | not registered | | |")
            continue
        metrics, seconds = train_likelihood(name, dataset, args.steps, args.out)
        if "baseline_nll_nats" in metrics and dataset not in baseline_done:
            baseline_done.add(dataset)
            print(row("pixel-independent baseline", dataset, metrics["baseline_nll_nats"],
                      metrics["baseline_bits_per_dim"], None))
        print(row(name, dataset, metrics["test_nll_nats"], metrics["test_bits_per_dim"],
                  seconds), flush=True)


if __name__ == "__main__":
    main()
