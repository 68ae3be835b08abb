"""Mode coverage of the adversarial models on the 8 and 25 Gaussians.

    python benchmarks/gan_mode_coverage.py [--datasets 8gaussians,25gaussians] [--seeds 2]
        [--steps N] [--threads 1]

Trains gan (non-saturating and minimax generator losses), wgan and wgan_gp with their
`mlatlas train NAME` defaults (``--steps`` overrides them) and scores 1,000 samples: modes hit
(a mode is hit when at least a tenth of its fair share of the samples lie within 3 sigma of it),
the share of samples within 3 sigma of a mode, and the exact W1 to 1,000 test points. Prints a
markdown table, mean over seeds with the per-seed modes hit, and the training seconds.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from mlatlas.core.run import Run
from mlatlas.core.runtime import set_threads
from mlatlas.generative.gan import common
from mlatlas.registry import METHODS

VARIANTS = [("gan", {"g_loss": "non-saturating"}), ("gan", {"g_loss": "minimax"}),
            ("wgan", {}), ("wgan_gp", {})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="8gaussians,25gaussians")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    print("| data | method | modes hit (per seed) | within 3 sigma | exact W1 | seconds |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as out:
        for dataset in args.datasets.split(","):
            for name, extra in VARIANTS:
                hits, quality, w1, seconds = [], [], [], []
                for seed in range(args.seeds):
                    overrides = {"dataset": dataset, "seed": seed, **extra}
                    if args.steps:
                        overrides["steps"] = args.steps
                    cfg = METHODS[name].config_cls(**overrides)
                    start = time.perf_counter()
                    run = common.train(cfg, Run.create(name, cfg, out), progress=False)
                    seconds.append(time.perf_counter() - start)
                    s = run.summary()
                    hits.append(s["eval/modes_hit"])
                    quality.append(s["eval/high_quality"])
                    w1.append(s["eval/w1_exact"])
                label = name + (f" ({extra['g_loss']})" if extra else "")
                mean = lambda v: sum(v) / len(v)  # noqa: E731
                print(f"| {dataset} | {label} | {mean(hits):.1f} of {s['eval/modes']} "
                      f"({', '.join(map(str, hits))}) | {mean(quality):.3f} | {mean(w1):.3f} "
                      f"| {mean(seconds):.0f} |", flush=True)


if __name__ == "__main__":
    main()
