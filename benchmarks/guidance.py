"""Guidance on the 8x8 digits: label accuracy, diversity and Frechet distance against the weight.

    python benchmarks/guidance.py [--steps 2000] [--classifier-steps 1500]
        [--samples-per-class 50] [--threads 1] [--out runs] [--run RUN_DIR]

Trains a class-conditional EDM on the digits (10% of the labels dropped to the null label, so
the same network is also unconditional) and a noisy classifier p(y | x; sigma) (``guidance.py``),
both saved in the run folder (``--run RUN_DIR`` re-samples a run made before, training the
classifier only if the folder lacks one). Then draws ``--samples-per-class`` samples of every
class with Heun's 18 steps from the same noise for

- classifier-free guidance, (1 + w) D(x | y) - w D(x), for each w of ``--weights``;
- classifier guidance, D(x) + s sigma^2 grad log p(y | x; sigma), on the same network with the
  null label (its unconditional model), for each s of ``--scales``;

and prints per setting the share of samples the shipped digits classifier assigns to the
requested label, the diversity (within-label feature spread over the test split's, see
``guidance.py``), the Frechet distance, precision and recall against the test split, and the
sampling time. The first row scores real data: the test images with their labels, and for the
Frechet distance 500 training images. Sample grids (one column per class) go to the run folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mlatlas.core.io import write_json
from mlatlas.core.plots import image_grid
from mlatlas.core.run import Run
from mlatlas.core.runtime import set_threads
from mlatlas.eval.samples import score_samples
from mlatlas.generative.diffusion import configs, loop
from mlatlas.generative.diffusion.guidance import (
    classifier_guided,
    diversity,
    label_accuracy,
    load_noisy_classifier,
    save_noisy_classifier,
    train_noisy_classifier,
)
from mlatlas.generative.diffusion.samplers import heun


def train_or_open(args: argparse.Namespace) -> Run:
    if args.run:
        return Run.open(args.run)
    cfg = configs.EDMConfig(dataset="digits", conditional=True, steps=args.steps,
                              eval_samples=0, seed=args.seed)
    run = Run.create(cfg.METHOD, cfg, root=args.out)
    start = time.perf_counter()
    loop.train(cfg, run, progress=args.progress)
    print(f"trained {run.dir} ({args.steps} steps) in {time.perf_counter() - start:.0f} s",
          flush=True)
    return run


def noisy_classifier(run: Run, data, args: argparse.Namespace):
    path = run.path(loop.CLASSIFIER)
    if path.is_file():
        return load_noisy_classifier(path)
    start = time.perf_counter()
    clf = train_noisy_classifier(loop.to_model_space(data.x_train, data), data.y_train,
                                 data.num_classes, args.classifier_steps, seed=args.seed,
                                 progress=args.progress)
    save_noisy_classifier(clf, path)
    print(f"trained the noisy classifier ({args.classifier_steps} steps) in "
          f"{time.perf_counter() - start:.0f} s -> {path}", flush=True)
    return clf


@torch.no_grad()
def noisy_accuracy(clf, data, sigmas=(0.05, 0.5, 1.0, 2.0, 5.0)) -> str:
    x0 = loop.to_model_space(data.x_test, data)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    parts = []
    for sigma in sigmas:
        predicted = clf(x0 + sigma * eps, torch.full((len(x0),), sigma)).argmax(1)
        parts.append(f"{sigma:g}: {float((predicted == data.y_test).float().mean()):.3f}")
    return "noisy classifier test accuracy by sigma: " + ", ".join(parts)


def score(x: torch.Tensor, labels: torch.Tensor, data) -> dict:
    metrics = score_samples(x, data)
    metrics.update(label_accuracy(x, labels, data))
    metrics.update(diversity(x, labels, data))
    return metrics


def classifier_guided_draw(cfg, data, model, clf, n: int, seed: int, scale: float):
    """As ``loop.draw`` with Heun, but the network with its null label (unconditional)
    and the denoiser wrapped by classifier guidance towards the classes in turn."""
    formulation = cfg.formulation()
    labels = torch.arange(n) % data.num_classes
    denoiser = classifier_guided(formulation.denoiser(model, clip=cfg.clip_x0), clf, labels,
                                 scale)
    sigmas = formulation.sigmas(cfg.sample_steps, "heun")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *data.sample_shape), generator=generator) * float(sigmas[0])
    return heun(denoiser, x, sigmas, generator=generator), labels


def row(name: str, value: str, m: dict, seconds: float | None) -> str:
    secs = f"{seconds:8.1f}" if seconds is not None else f"{'':8s}"
    return (f"{name:16s} {value:>6s} {m.get('label_accuracy', float('nan')):9.3f} "
            f"{m.get('diversity', float('nan')):9.3f} {m['frechet_distance']:8.2f} "
            f"{m['precision']:9.3f} {m['recall']:7.3f} {secs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="EDM training steps")
    parser.add_argument("--classifier-steps", type=int, default=1500)
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--weights", type=float, nargs="+", default=[0, 0.5, 1, 2, 3, 5])
    parser.add_argument("--scales", type=float, nargs="+", default=[0, 1, 3, 10])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs", help="folder for the new run")
    parser.add_argument("--run", help="an existing conditional digits run to re-sample")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args()
    set_threads(args.threads)

    run = train_or_open(args)
    cfg, data, model = loop.load_model(run)
    if not cfg.conditional or data.name != "digits":
        raise SystemExit(f"{run.dir} is not a conditional digits run")
    clf = noisy_classifier(run, data, args)
    print(noisy_accuracy(clf, data), flush=True)
    n = args.samples_per_class * data.num_classes

    reference = score(data.x_test, data.y_test, data)
    train_subset = data.x_train[torch.randperm(len(data.x_train),
                                               generator=torch.Generator().manual_seed(0))[:n]]
    reference.update({k: v for k, v in score_samples(train_subset, data).items()
                      if k in ("frechet_distance", "precision", "recall")})
    print(f"\n{n} samples ({args.samples_per_class} per class), {cfg.METHOD} "
          f"{cfg.steps} steps, heun {cfg.sample_steps} steps, {args.threads} thread(s)")
    print(f"{'guidance':16s} {'w / s':>6s} {'label acc':>9s} {'diversity':>9s} {'FD':>8s} "
          f"{'precision':>9s} {'recall':>7s} {'time s':>8s}")
    print(row("real data", "", reference, None))
    results = {"reference": reference, "classifier_free": {}, "classifier": {}}

    def report(kind: str, value: float, x: torch.Tensor, labels: torch.Tensor,
               seconds: float) -> None:
        x = loop.from_model_space(x.cpu(), data)
        metrics = score(x, labels, data) | {"seconds": seconds}
        results[kind][str(value)] = metrics
        print(row("classifier-free" if kind == "classifier_free" else "classifier",
                  f"{value:g}", metrics, seconds), flush=True)
        run.save_figure(image_grid(x[:50], f"{kind} guidance {value:g}", ncols=10),
                        f"guidance_{kind}_{value:g}.png")

    for w in args.weights:
        start = time.perf_counter()
        options = configs.SampleConfig(sampler="heun", guidance=w).resolve(cfg, data)
        x, labels = loop.draw(cfg, data, model, n, args.seed, options)
        report("classifier_free", w, x, labels, time.perf_counter() - start)
    for s in args.scales:
        start = time.perf_counter()
        x, labels = classifier_guided_draw(cfg, data, model, clf, n, args.seed, s)
        report("classifier", s, x, labels, time.perf_counter() - start)
    write_json(Path(run.dir) / "guidance_benchmark.json",
               json.loads(json.dumps(results, default=float)))
    print(f"\nresults and sample grids in {run.dir}")


if __name__ == "__main__":
    main()
