"""Frechet distance against network evaluations: DDPM, DDIM, Euler and Heun on one trained model.

    python benchmarks/diffusion_nfe.py [--run RUN_DIR] [--n 500] [--seeds 2] [--threads 2]

Without --run it trains DDPM (eps-prediction, linear betas, `mlatlas train ddpm` defaults) on
the 8x8 digits first and keeps the run under --out. Every sampler then draws the same number of
samples from the same EMA network and starting seeds, and the table gives the classifier Frechet
distance to the digits' test split (mean and spread over seeds), precision, recall and seconds.
Goal (Karras et al. 2022): Heun at 35 evaluations within 10% of DDPM's distance at 1,000.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from mlatlas.core.run import Run
from mlatlas.core.runtime import set_threads
from mlatlas.eval.samples import score_samples
from mlatlas.generative.diffusion import configs, loop
from mlatlas.generative.diffusion.samplers import function_evaluations

GRID = [("ddpm", 1000), ("ddim", 10), ("ddim", 20), ("ddim", 50), ("ddim", 100),
        ("euler", 10), ("euler", 18), ("euler", 35), ("euler", 100),
        ("heun", 5), ("heun", 10), ("heun", 18), ("heun", 50)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="a trained diffusion run (default: train DDPM)")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="where to train")
    parser.add_argument("--n", type=int, default=500, help="samples per sampler and seed")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    if args.run is None:
        cfg = configs.DDPMConfig(dataset="digits", eval_samples=0)
        run = loop.train(cfg, Run.create("ddpm", cfg, root=args.out))
    else:
        run = Run.open(args.run)
    cfg, data, model = loop.load_model(run)
    print(f"run: {run.dir} ({cfg.METHOD} on {cfg.dataset}, {cfg.steps} steps), {args.n} samples "
          f"x {args.seeds} seeds, {args.threads} threads")
    print(f"{'sampler':8s} {'steps':>5s} {'NFE':>5s} {'Frechet':>15s} {'precision':>9s} "
          f"{'recall':>7s} {'seconds':>8s}")
    results = {}
    for sampler, steps in GRID:
        if sampler not in cfg.formulation().samplers:
            continue
        options = configs.SampleConfig(sampler=sampler, steps=steps).resolve(cfg, data)
        scores, seconds = [], []
        for seed in range(args.seeds):
            start = time.perf_counter()
            with torch.no_grad():
                x = loop.draw(cfg, data, model, args.n, seed, options, progress=False)[0]
            seconds.append(time.perf_counter() - start)
            scores.append(score_samples(loop.from_model_space(x.cpu(), data), data))
        fd = [s["frechet_distance"] for s in scores]
        spread = statistics.stdev(fd) if len(fd) > 1 else 0.0
        nfe = function_evaluations(sampler, steps)
        results[sampler, nfe] = statistics.mean(fd)
        print(f"{sampler:8s} {steps:5d} {nfe:5d} {statistics.mean(fd):8.2f} +- {spread:4.2f} "
              f"{statistics.mean(s['precision'] for s in scores):9.3f} "
              f"{statistics.mean(s['recall'] for s in scores):7.3f} "
              f"{statistics.mean(seconds):8.1f}", flush=True)
    if ("heun", 35) in results and ("ddpm", 1000) in results:
        ratio = results["heun", 35] / results["ddpm", 1000]
        print(f"Heun at 35 NFE / DDPM at 1000: {ratio:.3f} (goal <= 1.10: "
              f"{'met' if ratio <= 1.10 else 'not met'})")


if __name__ == "__main__":
    main()
