r"""One training loop and one likelihood evaluation for every model whose likelihood is exact: the
autoregressive image models (``autoregressive/``) and the normalizing flows (``flows/``).

Maximum likelihood. KL(p_data || p_theta) = E_{p_data}[log p_data(x)] - E_{p_data}[log p_theta(x)],
and the first term does not depend on theta, so minimising the KL is maximising the expected
log-likelihood. Each step takes an Adam step on the mean negative log-likelihood per dimension,

    L(theta) = -1/(B D) sum_b log p_theta(x_b),

the global gradient norm clipped to ``grad_clip``.

What the reported numbers mean, for a test set of N examples of D dimensions:

- Binary data (the Bernoulli models): P_theta(x) of x in {0, 1}^D is exact, and
  NLL = -1/N sum_n log P_theta(x_n) nats per example, bits/dim = NLL / (D ln 2).
- Quantised data (grey levels k in {0, ..., L-1}: L = 17 for digits, 256 for MNIST) under a
  density on [0, 1]^D: uniform dequantisation x~ = (k + u) / L, u ~ U[0, 1)^D. Since the cube of
  side 1/L around k has volume L^-D, Jensen's inequality gives

      -log P(k) = -log int_cube p(x~) dx~ <= E_u[-log p(x~)] + D log L        (Theis et al. 2016)

  and the bound on the right is the NLL reported (one draw of u per test example, seeded).
- Points (the 2D toys): the differential NLL -log p(x), nats per example; bits/dim = NLL/(D ln 2)
  can be negative.

Binarisation (``--binarize``) of a ``<name>-binary`` dataset: ``static`` draws x ~ Bernoulli(grey
level) once with ``--binarize-seed`` (Salakhutdinov & Murray 2008), ``dynamic`` draws a fresh
binarisation of each training batch and scores the test set on the static draw, ``threshold``
uses the dataset as loaded (grey level > 0.5).

A model of this family is an ``nn.Module`` with

    log_prob(x, y=None) -> (B,)                          log p_theta(x | y) in nats
    sample(n, generator, y=None, temperature=1.0) -> (n, *sample_shape)

and, if it has a data-dependent initialisation (Glow's ActNorm), ``data_init(x, y)``, which the loop
calls once, on a fixed batch of training data, before the first step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from mlatlas.core import distributed
from mlatlas.core.config import BatchConfig, ConfigError, check_options
from mlatlas.core.plots import density_figure, metric_curves, samples_figure
from mlatlas.core.precision import Precision, compile_module
from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import resolve_device, seed_everything
from mlatlas.data import DATASETS, Dataset, DatasetError, EpochBatches, load_dataset
from mlatlas.eval.likelihood import bits_per_dim, independent_baseline_nll
from mlatlas.eval.samples import min_samples, score_samples

LN2 = math.log(2.0)
# Test examples per forward pass of the evaluation.
EVAL_BATCH = 500


# --- data ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DensityData:
    """The data a likelihood model sees: ``kind`` is 'binary', 'quantised' or 'points';
    ``grey_train`` holds the grey levels dynamic binarisation draws from (else None); ``levels``
    is L of the dequantisation (0 for binary data and points)."""

    dataset: Dataset
    kind: Literal["binary", "quantised", "points"]
    levels: int
    grey_train: torch.Tensor | None = None

    @property
    def dims(self) -> int:
        return math.prod(self.dataset.sample_shape)

    @property
    def dequantisation(self) -> str:
        if self.kind == "quantised":
            return f"uniform: x = (k + u) / {self.levels}, u ~ U[0, 1)^D, one draw per example"
        return "none"

    @property
    def formula(self) -> str:
        if self.kind == "quantised":
            return (f"NLL = -log p(x) + D log {self.levels} nats per example (a bound on "
                    "-log P(k)); bits/dim = NLL / (D ln 2)")
        if self.kind == "binary":
            return "NLL = -log P(x) nats per example (exact); bits/dim = NLL / (D ln 2)"
        return "NLL = -log p(x) nats per example (differential); bits/dim = NLL / (D ln 2)"


def grey_levels(x: torch.Tensor) -> int:
    """L, the number of evenly spaced grey levels of images in [0, 1]: one more than the inverse
    of the smallest gap between distinct values (17 for the 8x8 digits, 256 for MNIST)."""
    values = torch.unique(x)
    if len(values) < 2:
        return 2
    gap = float((values[1:] - values[:-1]).min())
    return min(256, max(2, round(1 / gap) + 1))


def is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def load_data(cfg: DensityConfig) -> DensityData:
    """The config's dataset, checked against what its model can score, and binarised for the
    Bernoulli models as ``--binarize`` says."""
    data = load_dataset(cfg.dataset)
    if cfg.conditional and not data.num_classes:
        raise ConfigError(f"--conditional needs class labels and {cfg.dataset} has none")
    if data.kind == "image" and not (data.x_train.min() >= 0 and data.x_train.max() <= 1):
        raise DatasetError(f"{cfg.dataset}: image values must lie in [0, 1]")
    if not cfg.BERNOULLI:
        if data.kind == "points":
            return DensityData(data, "points", 0)
        return DensityData(data, "quantised", grey_levels(data.x_train))
    if data.kind != "image":
        raise ConfigError(f"{cfg.METHOD} models binary images; {cfg.dataset} holds points")
    grey = data
    if cfg.dataset.endswith("-binary") and cfg.binarize != "threshold":
        grey = load_dataset(cfg.dataset[: -len("-binary")])
    elif not (is_binary(data.x_train) and is_binary(data.x_test)):
        if data.sample_shape[0] != 1:  # a colour set has no -binary variant
            hint = " holds colour images; use a grey set's -binary variant or data of 0s and 1s"
        elif cfg.dataset in DATASETS:
            hint = (f" has {grey_levels(data.x_train)} grey levels: use {cfg.dataset}-binary or "
                    "data of 0s and 1s")
        else:
            hint = " holds values other than 0 and 1"
        raise ConfigError(f"{cfg.METHOD} models binary images and {cfg.dataset}{hint}")
    if grey is data:
        return DensityData(data, "binary", 0)
    generator = torch.Generator().manual_seed(cfg.binarize_seed)
    x_train = torch.bernoulli(grey.x_train, generator=generator)
    x_test = torch.bernoulli(grey.x_test, generator=generator)
    binary = Dataset(data.name, "image", x_train, x_test, data.y_train, data.y_test,
                     data.classes)
    return DensityData(binary, "binary", 0,
                       grey.x_train if cfg.binarize == "dynamic" else None)


def dequantise(x: torch.Tensor, levels: int, generator: torch.Generator | None) -> torch.Tensor:
    """x~ = (k + u) / L for grey levels x = k / (L - 1), u ~ U[0, 1): a point of [0, 1)^D."""
    k = torch.round(x * (levels - 1))
    u = torch.rand(x.shape, generator=generator, device="cpu").to(x.device)
    return (k + u) / levels


# --- config --------------------------------------------------------------------------------------

@dataclass
class DensityConfig(BatchConfig):
    """Fields shared by every model of the family; a method's ``Config`` extends it and builds
    its network in :meth:`build_model`."""

    METHOD: ClassVar[str] = ""
    RESUMABLE: ClassVar[frozenset[str]] = BatchConfig.RESUMABLE | {"eval_samples"}
    # True for the models of binary images (a Bernoulli per pixel), False for densities.
    BERNOULLI: ClassVar[bool] = True

    dataset: str = "digits-binary"
    """Training data: a name from `mlatlas list` or a path to an image folder or .npy file."""
    steps: int = 2000
    """Number of optimisation steps."""
    batch_size: int = 128
    """Examples per optimisation step."""
    lr: float = 1e-3
    """Adam learning rate."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 turns clipping off)."""
    binarize: Literal["static", "dynamic", "threshold"] = "static"
    """How a <name>-binary dataset is binarised: one Bernoulli draw of the grey levels (static),
    a fresh draw per batch (dynamic), or grey level > 0.5 (threshold)."""
    binarize_seed: int = 0
    """Seed of the static binarisation (train and test)."""
    conditional: bool = False
    """Condition on the class label: p(x | y)."""
    eval_samples: int = 64
    """Samples drawn by the evaluation at the end of training (0 skips the evaluation)."""

    def check(self) -> None:
        super().check()
        if self.eval_samples and self.eval_samples < min_samples("image"):
            raise ConfigError(f"--eval-samples must be 0 or at least {min_samples('image')}, "
                              f"got {self.eval_samples}")

    def check_data(self) -> None:
        load_data(self)

    def build_model(self, data: DensityData) -> nn.Module:
        raise NotImplementedError(f"{type(self).__qualname__} builds no model")


@dataclass
class SampleOptions:
    """How to sample from a trained run."""

    SIGNED: ClassVar[frozenset[str]] = frozenset({"label"})

    temperature: float = 1.0
    """Sampling temperature: Bernoulli logits divided by T, or a flow's prior N(0, T^2 I)."""
    label: int = -1
    """Class to sample for a conditional run; -1 cycles through the classes."""

    def __post_init__(self) -> None:
        check_options(self)
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be positive, got {self.temperature}")


# --- training ------------------------------------------------------------------------------------

def nll_per_dim(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None,
                dims: int) -> torch.Tensor:
    """The training loss -1/(B D) sum_b log p(x_b | y_b), in nats per dimension."""
    return -model.log_prob(x, y).mean() / dims


def train(cfg: DensityConfig, run: Run | None = None, progress: bool | None = None) -> Run:
    """Train (or, given a run with a checkpoint, resume) any likelihood model; returns the run."""
    run = run or Run.create(cfg.METHOD, cfg)
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    generator = seed_everything(cfg.seed)
    model = cfg.build_model(data).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    precision = Precision(cfg.precision, device)
    ds = data.dataset
    x_train = ds.x_train.to(device)
    grey = data.grey_train.to(device) if data.grey_train is not None else None
    y_train = ds.y_train.to(device) if cfg.conditional else None
    batches = EpochBatches(len(x_train), cfg.batch_size, cfg.seed)

    def batch(index: torch.Tensor) -> torch.Tensor:
        if grey is not None:
            return torch.bernoulli(grey[index].cpu(), generator=generator).to(device)
        if data.kind == "quantised":
            return dequantise(x_train[index], data.levels, generator)
        return x_train[index]

    if hasattr(model, "data_init") and not run.has_checkpoint():
        # The first global batch, the same on every rank, so the ranks start from one model.
        with torch.no_grad():
            index = batches(1).to(device)
            model.data_init(batch(index), y_train[index] if y_train is not None else None)
    compile_module(model, cfg.compile)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        index = distributed.shard(batches(step)).to(device)
        y = y_train[index] if y_train is not None else None
        with precision.autocast():
            loss = nll_per_dim(model, batch(index), y, data.dims)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer, model.parameters(), cfg.grad_clip)
        metrics = {"nll_per_dim": loss.detach()}
        if step % cfg.log_every == 0 or step == cfg.steps:
            # Shown beside the training loss so overfitting is seen; never used to select.
            metrics["test_nll_nats"] = torch.tensor(held_out_nll(model, cfg, data))
        return metrics

    fit(run, step_fn, total_steps=cfg.steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
        objects={"model": model, "optimizer": optimizer, "rng": generator,
                 "precision": precision},
        progress=progress)
    if not distributed.is_main():
        return run
    run.save_figure(metric_curves([r for r in run.metrics if "test_nll_nats" in r],
                                  ["nll_per_dim", "test_nll_nats"], log=False,
                                  title=f"{cfg.METHOD}: training NLL (nats per dimension) and "
                                        "held-out NLL (nats per example)"), "loss.png")
    run.write_summary({"train/steps": cfg.steps,
                       "train/nll_per_dim": run.last_row()["nll_per_dim"]})
    if cfg.eval_samples:
        evaluate(run, n=cfg.eval_samples, progress=progress)
    return run


# --- a trained run -------------------------------------------------------------------------------

def load_model(run: Run) -> tuple[DensityConfig, DensityData, nn.Module]:
    """The run's config, data and trained model (in eval mode, on the run's device)."""
    cfg = run.load_config()
    if not isinstance(cfg, DensityConfig):
        raise ConfigError(f"{run.dir} is a {run.method} run, not a likelihood model's")
    data = load_data(cfg)
    model = cfg.build_model(data)
    run.load_weights(model, "model")
    return cfg, data, model.to(resolve_device(cfg.device)).eval()


def sample_labels(n: int, options: SampleOptions, cfg: DensityConfig,
                  data: DensityData) -> torch.Tensor | None:
    if not cfg.conditional:
        if options.label >= 0:
            raise ConfigError("--label needs a run trained with --conditional")
        return None
    if options.label >= data.dataset.num_classes:
        raise ConfigError(f"--label must be below {data.dataset.num_classes}, got "
                          f"{options.label}")
    if options.label >= 0:
        return torch.full((n,), options.label, dtype=torch.long)
    return torch.arange(n) % data.dataset.num_classes


def draw(model: nn.Module, cfg: DensityConfig, data: DensityData, n: int, seed: int,
         options: SampleOptions) -> torch.Tensor:
    """n samples in data space: binary images, grey levels in [0, 1] (the dequantised sample
    rounded down to its level), or points."""
    device = next(model.parameters()).device
    labels = sample_labels(n, options, cfg, data)
    with torch.no_grad():
        x = model.sample(n, torch.Generator(device).manual_seed(seed),
                         labels.to(device) if labels is not None else None,
                         options.temperature).cpu()
    if data.kind == "quantised":
        x = torch.floor(x.clamp(0, 1 - 1e-6) * data.levels) / (data.levels - 1)
    return x


def sample(run: Run, n: int = 64, seed: int = 0, progress: bool | None = None,
           options: SampleOptions | None = None) -> torch.Tensor:
    """n exact (ancestral or inverse-flow) samples of the run's model."""
    cfg, data, model = load_model(run)
    return draw(model, cfg, data, n, seed, options or SampleOptions())


def held_out_log_prob(model: nn.Module, cfg: DensityConfig, data: DensityData, seed: int = 0,
                      limit: int | None = None) -> torch.Tensor:
    """log p(x_n) of the first ``limit`` (None: every) held-out example in nats, (N,), on the
    data the model sees (the dequantised test set for quantised data, one draw of u per example
    from ``seed``)."""
    ds, device = data.dataset, next(model.parameters()).device
    n_test = len(ds.x_test) if limit is None else min(limit, len(ds.x_test))
    generator = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for start in range(0, n_test, EVAL_BATCH):
            stop = min(start + EVAL_BATCH, n_test)
            x = ds.x_test[start:stop]
            if data.kind == "quantised":
                x = dequantise(x, data.levels, generator)
            y = ds.y_test[start:stop].to(device) if cfg.conditional else None
            out.append(model.log_prob(x.to(device), y).cpu())
    return torch.cat(out)


def held_out_nll(model: nn.Module, cfg: DensityConfig, data: DensityData,
                 limit: int = EVAL_BATCH) -> float:
    """The NLL (nats per example, as :func:`nll_report` counts it) of the first ``limit``
    held-out examples, in eval mode; the model is put back in the mode it was in."""
    training = model.training
    model.eval()
    nll = nll_report(held_out_log_prob(model, cfg, data, limit=limit), data)["test_nll_nats"]
    model.train(training)
    return nll


def nll_report(log_p: torch.Tensor, data: DensityData) -> dict:
    """Held-out NLL in nats per example and bits/dim (see the module docstring), with the
    formula and the dequantisation that produced them."""
    nll = -float(log_p.double().mean())
    if data.kind == "quantised":
        nll += data.dims * math.log(data.levels)
    return {"test_nll_nats": nll, "test_bits_per_dim": bits_per_dim(nll, data.dims),
            "test_examples": len(log_p), "dims": data.dims, "formula": data.formula,
            "dequantisation": data.dequantisation}


def evaluate(run: Run, n: int | None = None, seed: int = 0, progress: bool | None = None,
             options: SampleOptions | None = None) -> dict:
    """Score the whole held-out split (NLL in nats per example and bits/dim, beside the
    pixel-independent baseline fitted on the training split), then draw n samples (None: the
    run's ``eval_samples``), write the figures and score the samples as the diffusion family
    does; the metrics also go to summary.json as ``eval/<name>``, the baseline's as
    ``baseline/test_nll_nats`` and ``baseline/test_bits_per_dim``."""
    cfg, data, model = load_model(run)
    device = next(model.parameters()).device
    options = options or SampleOptions()
    n = cfg.eval_samples if n is None else n
    metrics = nll_report(held_out_log_prob(model, cfg, data, seed), data)
    if data.kind != "points":
        baseline = independent_baseline_nll(data.dataset.x_train, data.dataset.x_test,
                                             data.levels if data.kind == "quantised" else 2)
        metrics.update(baseline_nll_nats=baseline,
                       baseline_bits_per_dim=bits_per_dim(baseline, data.dims))
    if n:
        x = draw(model, cfg, data, n, seed, options)
        metrics.update(score_samples(x, data.dataset))
        title = f"{cfg.METHOD} samples, {cfg.dataset}, T = {options.temperature:g}"
        run.save_figure(samples_figure(x, title, data.dataset.x_test), "samples.png")
    if data.kind == "points" and data.dims == 2:
        run.save_figure(density_figure(lambda x: model.log_prob(x.to(device)),
                                       data.dataset.x_test,
                                       title=f"{cfg.METHOD} on {cfg.dataset}"), "density.png")
    metrics["temperature"] = options.temperature
    run.write_evaluation({k: v for k, v in metrics.items() if not k.startswith("baseline_")})
    if "baseline_nll_nats" in metrics:
        run.write_evaluation({"test_nll_nats": metrics["baseline_nll_nats"],
                              "test_bits_per_dim": metrics["baseline_bits_per_dim"],
                              "model": "pixel-independent categorical (add-one smoothing)"},
                             prefix="baseline")
    return metrics
