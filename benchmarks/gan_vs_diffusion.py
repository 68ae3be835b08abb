"""The adversarial models against the diffusion models on one image dataset, same metric, same
number of samples.

    python benchmarks/gan_vs_diffusion.py [--dataset digits] [--methods gan,wgan_gp,edm]
        [--samples 500] [--seeds 1] [--threads 1]

Trains each method with its `mlatlas train NAME` defaults on ``--dataset`` and scores
``--samples`` samples against the test split on the shipped classifier's features (Frechet
distance, precision, recall), beside the untrained generator and as many real training images
(the floor finite samples leave). Prints a markdown table with the training seconds.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from mlatlas.core.run import Run
from mlatlas.core.runtime import set_threads
from mlatlas.data import load_dataset
from mlatlas.eval.samples import real_data_floor
from mlatlas.registry import METHODS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--methods", default="gan,wgan_gp,edm")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    floor = real_data_floor(load_dataset(args.dataset), args.samples)
    print("| model | Frechet | precision | recall | training seconds |")
    print("|---|---|---|---|---|")
    print(f"| {args.samples} real training images | {floor['frechet_distance']:.2f} | "
          f"{floor['precision']:.3f} | {floor['recall']:.3f} | - |", flush=True)
    with tempfile.TemporaryDirectory() as out:
        for name in args.methods.split(","):
            method = METHODS[name]
            for seed in range(args.seeds):
                cfg = method.config_cls(dataset=args.dataset, eval_samples=args.samples,
                                        seed=seed)
                start = time.perf_counter()
                run = method.train_fn(cfg, Run.create(name, cfg, out), progress=False)
                seconds = time.perf_counter() - start
                s = run.summary()
                print(f"| {name} (seed {seed}, {cfg.steps} steps) | "
                      f"{s['eval/frechet_distance']:.2f} | {s['eval/precision']:.3f} | "
                      f"{s['eval/recall']:.3f} | {seconds:.0f} |", flush=True)
                if "baseline/frechet_distance" in s and seed == 0:
                    print(f"| {name}, untrained generator | "
                          f"{s['baseline/frechet_distance']:.1f} | "
                          f"{s['baseline/precision']:.3f} | {s['baseline/recall']:.3f} | - |",
                          flush=True)


if __name__ == "__main__":
    main()
