"""Rectified flow: what one reflow buys, on the 2D toys and the 8x8 digits, measured in one run.

    python benchmarks/rectified_flow_reflow.py [--datasets two-moons,8gaussians,checkerboard,digits]
        [--seeds 2] [--steps 1000] [--digits-seeds 1] [--digits-steps 600] [--threads 1]

Each (dataset, seed) is one rectified_flow run: --steps of the 1-rectified flow (flow matching),
the reflow pairs (Phi(z), z) made by Heun with the 1-RF's EMA weights, then --steps more of the
2-rectified flow started from those weights (the digits use --digits-steps and fewer pairs). Both
flows are scored from the same noise by one Euler step, x_0 = z - v(z, 1), and by the run's
Heun-18 sampler (35 evaluations): the MMD to the test split for points, the shipped classifier's
Frechet distance for the digits (lower is better for both), with the straightness S of the
Heun-18 path (0 for straight paths). Prints mean +- standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mlatlas.core.run import Run
from mlatlas.core.runtime import set_threads
from mlatlas.data import load_dataset
from mlatlas.eval.samples import score_samples
from mlatlas.generative.diffusion.configs import SampleConfig
from mlatlas.generative.flow_matching import rectified_flow as rf

POINTS = ("two-moons", "8gaussians", "checkerboard")


def measure(dataset: str, seed: int, steps: int, root: Path) -> dict[str, float]:
    """Train one run and score its two flows; returns the table's numbers and the wall time."""
    digits = load_dataset(dataset).kind == "image"
    cfg = rf.Config(dataset=dataset, seed=seed, steps=2 * steps, reflow_after=steps,
                    reflow_pairs=1000 if digits else 4000, reflow_ode_steps=16 if digits else 32,
                    eval_samples=0, ckpt_every=10 * steps)
    start = time.perf_counter()
    run = rf.train(cfg, Run.create(cfg.METHOD, cfg, root=root), progress=False)
    seconds = time.perf_counter() - start
    cfg, data, flows = rf.load_flows(run)
    options = SampleConfig().resolve(cfg, data)
    metric = "frechet_distance" if digits else "mmd"
    out = {"train_s": seconds}
    for name, net in flows.items():
        draw = rf.draw_flow(cfg, data, net, 500 if digits else 1000, seed, options,
                            progress=False)
        out[f"{name}_one"] = score_samples(draw.x_one, data)[metric]
        out[f"{name}_heun"] = score_samples(draw.x, data)[metric]
        out[f"{name}_s"] = draw.straightness
    return out


def summarise(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.3g}"
    return f"{mean:.3g}+-{statistics.stdev(values):.1g}"


COLUMNS = [("1-RF 1 step", "rf1_one"), ("2-RF 1 step", "rf2_one"), ("1-RF Heun-18", "rf1_heun"),
           ("2-RF Heun-18", "rf2_heun"), ("S 1-RF", "rf1_s"), ("S 2-RF", "rf2_s"),
           ("train s", "train_s")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default=",".join((*POINTS, "digits")))
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 for the 2D toys")
    parser.add_argument("--steps", type=int, default=1000,
                        help="steps of each stage (1-RF, then 2-RF) on the 2D toys")
    parser.add_argument("--digits-seeds", type=int, default=1)
    parser.add_argument("--digits-steps", type=int, default=600,
                        help="steps of each stage on the image datasets")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    datasets = [d for d in args.datasets.split(",") if d]
    print(f"torch {torch.__version__}, threads {args.threads}; 2D: {args.seeds} seeds, "
          f"{args.steps} + {args.steps} steps, 4000 pairs (Heun-32), MMD on 1000 samples; "
          f"digits: {args.digits_seeds} seed(s), {args.digits_steps} + {args.digits_steps} "
          f"steps, 1000 pairs (Heun-16), Frechet distance on 500 samples")
    header = f"{'dataset':13s}{'metric':7s}" + "".join(f" {c:>16s}" for c, _ in COLUMNS)
    print(header)
    print("-" * len(header))
    total = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        for dataset in datasets:
            digits = load_dataset(dataset).kind == "image"
            seeds = range(args.digits_seeds if digits else args.seeds)
            steps = args.digits_steps if digits else args.steps
            rows = [measure(dataset, seed, steps, Path(root)) for seed in seeds]
            cells = "".join(f" {summarise([r[k] for r in rows]):>16s}" for _, k in COLUMNS)
            print(f"{dataset:13s}{'FD' if digits else 'MMD':7s}{cells}", flush=True)
    print(f"total {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    main()
