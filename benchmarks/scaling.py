"""Data-parallel scaling: training throughput at 1 and 2 processes, one method per family.

    python benchmarks/scaling.py [--steps 60] [--only ddpm,clip]

Each case runs ``mlatlas train METHOD --nproc 1`` and ``--nproc 2`` (gloo on the CPU) with the
same global batch and reads the throughput off ``metrics.csv`` between its first and last rows
(so start-up, data loading and the final evaluation are not counted). It prints examples per
second at each world size, their ratio, and what every rank sends per optimisation step: the
ring all-reduce of the float32 gradients, 2 (W - 1) / W * 4 P bytes for P parameters, plus the
contrastive methods' feature exchange.

The honest caveat of a 2-core machine: two ranks share the two cores the one-process run had to
itself (one intra-op thread each), so a ratio near 2 is the best case and anything the ranks
also do redundantly (the global batch's random draws, collectives through loopback TCP) shows
up directly. On GPUs every rank has its own device and the ratio is what the collective costs.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

from mlatlas.core.io import load_tensors

# (family, method, flags, examples per optimisation step)
CASES = [
    ("generative", "ddpm", ["--dataset", "digits", "--batch-size", "128", "--eval-samples", "0"],
     128),
    ("generative", "flow_matching", ["--dataset", "two-moons", "--batch-size", "512",
                                     "--eval-samples", "0"], 512),
    ("contrastive", "clip", ["--batch-size", "128"], 128),
    ("contrastive", "siglip", ["--batch-size", "128"], 128),
    ("llm", "sft", ["--batch-size", "64"], 64),
]


def run(method: str, flags: list[str], nproc: int, steps: int, out: Path) -> Path:
    args = [sys.executable, "-m", "mlatlas", "train", method, *flags, "--steps", str(steps),
            "--log-every", str(steps // 6), "--ckpt-every", str(steps), "--nproc", str(nproc),
            "--threads", "1", "--no-progress", "--out", str(out)]
    subprocess.run(args, check=True, capture_output=True, text=True)
    (directory,) = [p for p in out.iterdir() if p.is_dir()]
    return directory


def steps_per_second(directory: Path) -> float:
    with (directory / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    first, last = rows[0], rows[-1]
    return (int(last["step"]) - int(first["step"])) / (float(last["wall_s"])
                                                       - float(first["wall_s"]))


def parameters(directory: Path) -> int:
    """Trained parameters: the floating-point tensors of the checkpoint's model group."""
    return sum(t.numel() for k, t in load_tensors(directory / "checkpoint.safetensors").items()
               if k.startswith("model.") and t.is_floating_point())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--only", default="", help="comma-separated methods")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    print(f"{'family':12s} {'method':14s} {'batch':>5s} {'params':>9s} {'ex/s W=1':>9s} "
          f"{'ex/s W=2':>9s} {'ratio':>6s} {'grad bytes/step/rank W=2':>25s}")
    for family, method, flags, batch in CASES:
        if only and method not in only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            speed = {}
            for nproc in (1, 2):
                directory = run(method, flags, nproc, args.steps, Path(tmp) / str(nproc))
                speed[nproc] = steps_per_second(directory) * batch
            p = parameters(directory)
        sent = 2 * (2 - 1) / 2 * 4 * p
        print(f"{family:12s} {method:14s} {batch:5d} {p:9,d} {speed[1]:9.0f} {speed[2]:9.0f} "
              f"{speed[2] / speed[1]:6.2f} {sent:25,.0f}", flush=True)


if __name__ == "__main__":
    main()
