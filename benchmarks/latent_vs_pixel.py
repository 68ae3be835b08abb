"""Latent diffusion against pixel-space EDM on the same images: Frechet distance against seconds
of training, one plot.

    python benchmarks/latent_vs_pixel.py [--dataset shapes] [--segments 4] [--segment-steps 500]
        [--edm-segment-steps 150] [--samples 300] [--threads 2] [--figure PATH]

Latent diffusion trains its KL autoencoder first (its seconds count: the curve starts where the
autoencoder is done), then its denoiser in segments of ``--segment-steps``; EDM trains on the
pixels in segments of ``--edm-segment-steps`` (a pixel step costs more). After each segment
both draw ``--samples`` samples (latent: its DDIM sampler; EDM: Heun, 18 steps), scored on the
shipped feature network of the dataset against its test split, beside the floor of as many real
training images. Prints the table and writes the figure (default
docs/methods/figures/latent-vs-pixel.png). Only training seconds count, not sampling.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from mlatlas import cli
from mlatlas.core.plots import plt
from mlatlas.core.run import Run
from mlatlas.core.runtime import set_threads
from mlatlas.data import load_dataset
from mlatlas.eval.samples import real_data_floor
from mlatlas.registry import METHODS

FIGURE = Path(__file__).resolve().parents[1] / "docs/methods/figures/latent-vs-pixel.png"


def train(argv: list[str]) -> float:
    """Seconds of ``mlatlas train ARGV``."""
    start = time.perf_counter()
    if cli.main(["train", *argv, "--no-progress", "--eval-samples", "0"]) != 0:
        raise SystemExit(f"mlatlas train {' '.join(argv)} failed")
    return time.perf_counter() - start


def only_run(folder: Path) -> Path:
    return next(p for p in folder.iterdir() if p.is_dir())


def frechet(run_dir: Path, n: int) -> float:
    run = Run.open(run_dir)
    return METHODS[run.method].function("evaluate")(run, n, 0, progress=False)[
        "frechet_distance"]


def curve(name: str, first: list[str], steps: int, segments: int, n: int,
          offset: float = 0.0) -> list[tuple[int, float, float]]:
    """(steps, seconds, Frechet) after each segment of training."""
    with tempfile.TemporaryDirectory() as out:
        seconds = offset + train([*first, "--steps", str(steps), "--out", out])
        run_dir = only_run(Path(out))
        points = [(steps, seconds, frechet(run_dir, n))]
        print(f"{name}: {points[-1]}", flush=True)
        for k in range(2, segments + 1):
            seconds += train(["--resume", str(run_dir), "--steps", str(k * steps)])
            points.append((k * steps, seconds, frechet(run_dir, n)))
            print(f"{name}: {points[-1]}", flush=True)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--segment-steps", type=int, default=500)
    parser.add_argument("--edm-segment-steps", type=int, default=150)
    parser.add_argument("--ae-steps", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--figure", type=Path, default=FIGURE)
    args = parser.parse_args()
    set_threads(args.threads)
    floor = real_data_floor(load_dataset(args.dataset), args.samples)["frechet_distance"]
    with tempfile.TemporaryDirectory() as ae_out:
        ae_seconds = train(["autoencoder", "--dataset", args.dataset, "--width", "16",
                            "--downsample", "4", "--steps", str(args.ae_steps), "--out", ae_out])
        ae_run = only_run(Path(ae_out))
        latent = curve("latent_diffusion", ["latent_diffusion", "--dataset", args.dataset,
                                            "--ae-run", str(ae_run), "--no-conditional"],
                       args.segment_steps, args.segments, args.samples, ae_seconds)
    pixel = curve("edm", ["edm", "--dataset", args.dataset, "--channels", "32"],
                  args.edm_segment_steps, args.segments, args.samples)
    print(f"\nautoencoder: {args.ae_steps} steps in {ae_seconds:.0f} s; real-data floor "
          f"{floor:.2f} ({args.samples} images)\n")
    print("| model | steps | training seconds | Frechet |")
    print("|---|---|---|---|")
    for name, points in (("latent_diffusion (seconds include the autoencoder)", latent),
                         ("edm on pixels", pixel)):
        for steps, seconds, fd in points:
            print(f"| {name} | {steps} | {seconds:.0f} | {fd:.2f} |")
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in (("latent diffusion (after its autoencoder)", latent),
                          ("EDM on pixels", pixel)):
        ax.plot([p[1] for p in points], [p[2] for p in points], "o-", label=label)
    ax.axvline(ae_seconds, color="0.6", ls=":", label="autoencoder trained")
    ax.axhline(floor, color="k", ls="--", lw=0.8, label=f"{args.samples} real images")
    ax.set_xlabel("training seconds (2 CPU cores)")
    ax.set_ylabel("Frechet distance (shipped features)")
    ax.set_title(f"{args.dataset}: sample quality per second of training", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=110)
    print(f"\nfigure: {args.figure}")


if __name__ == "__main__":
    main()
