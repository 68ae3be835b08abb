r"""One training loop, one sampling path and one evaluation for every diffusion and flow-matching
model: the config names a formulation (``formulations.py``), this module trains its network on
the formulation's loss and samples it through ``samplers.py``.

Each optimisation step draws a batch (its order a function of the seed and the step), takes one
Adam step on the formulation's loss with the learning rate

    lr_k = lr min(1, k / warmup_steps)       (``core.optim.warmup_linear_lr``)

and the global gradient norm clipped to ``grad_clip``, then updates the EMA of the weights,
theta_ema <- decay theta_ema + (1 - decay) theta with decay = min(ema_decay, (1 + k) / (10 + k)),
which sampling uses.

Class conditioning (``--conditional``) adds a label embedding to the network and, with
probability ``label_dropout``, trains on the null label instead, so one network is both
p(x | y) and p(x) for classifier-free guidance (``guidance.py``). ``--classifier-steps`` trains
a noisy classifier p(y | x; sigma) after the model, saved beside it, for classifier guidance
(``mlatlas sample RUN --classifier-scale s``), which works on conditional and unconditional runs
alike.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mlatlas.core import distributed
from mlatlas.core.config import ConfigError
from mlatlas.core.optim import polyak_update, set_lr, warmup_linear_lr
from mlatlas.core.plots import metric_curves, samples_figure
from mlatlas.core.precision import Precision, compile_module
from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import resolve_device, seed_everything
from mlatlas.data import Dataset, EpochBatches, load_dataset
from mlatlas.eval.samples import score_samples
from mlatlas.generative.diffusion import edm
from mlatlas.generative.diffusion.configs import DiffusionConfig, SampleConfig, check_eval_count
from mlatlas.generative.diffusion.formulations import Formulation, log_likelihood
from mlatlas.generative.diffusion.guidance import (
    classifier_free,
    classifier_guided,
    diversity,
    label_accuracy,
    load_noisy_classifier,
    save_noisy_classifier,
    train_noisy_classifier,
)
from mlatlas.generative.diffusion.samplers import (
    ATOL,
    RTOL,
    Callback,
    Denoiser,
    function_evaluations,
)
from mlatlas.nn.unet import TimeMLP, UNet

# The noisy classifier of classifier guidance, in the run folder beside the checkpoint.
CLASSIFIER = "noisy_classifier.safetensors"


# --- model and data ------------------------------------------------------------------------------

def build_model(cfg: DiffusionConfig, data: Dataset) -> nn.Module:
    num_classes = data.num_classes if cfg.conditional else 0
    time_scale = cfg.formulation().time_scale
    if data.kind == "points":
        return TimeMLP(data.sample_shape[0], hidden=cfg.hidden, num_classes=num_classes,
                       time_scale=time_scale)
    side = data.sample_shape[-1]
    mults = (1, 2) if side % 2 == 0 else (1,)
    return UNet(data.sample_shape[0], base=cfg.channels, channel_mults=mults, attention=False,
                num_classes=num_classes, time_scale=time_scale)


def to_model_space(x: torch.Tensor, data: Dataset) -> torch.Tensor:
    """Images in [0, 1] become [-1, 1]; points are used as they are."""
    return x * 2 - 1 if data.kind == "image" else x


def from_model_space(x: torch.Tensor, data: Dataset) -> torch.Tensor:
    return ((x + 1) / 2).clamp(0, 1) if data.kind == "image" else x


def load_data(cfg: DiffusionConfig) -> Dataset:
    data = load_dataset(cfg.dataset)
    if (cfg.conditional or cfg.classifier_steps) and not data.num_classes:
        raise ConfigError(f"--conditional and --classifier-steps need class labels and "
                          f"{cfg.dataset} has none")
    return data


# --- training ------------------------------------------------------------------------------------

@dataclass
class Setup:
    """What a training run starts from, made in one fixed order (the seed, then the network's
    initialisation), so every method of the family draws the same numbers for the same seed."""

    data: Dataset
    formulation: Formulation
    generator: torch.Generator
    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    x_train: torch.Tensor
    batches: EpochBatches
    device: torch.device
    precision: Precision


def setup(cfg: DiffusionConfig) -> Setup:
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    formulation = cfg.formulation()
    generator = seed_everything(cfg.seed)
    model = build_model(cfg, data).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    compile_module(model, cfg.compile)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    x_train = to_model_space(data.x_train, data).to(device)
    batches = EpochBatches(len(x_train), cfg.batch_size, cfg.seed)
    return Setup(data, formulation, generator, model, ema, optimizer, x_train, batches, device,
                 Precision(cfg.precision, device))


def train(cfg: DiffusionConfig, run: Run | None = None, progress: bool | None = None) -> Run:
    """Train (or, given a run with a checkpoint, resume) any diffusion or flow-matching config;
    returns the run."""
    run = run or Run.create(cfg.METHOD, cfg)
    s = setup(cfg)
    data, device, generator = s.data, s.device, s.generator
    y_train = data.y_train.to(device) if cfg.conditional else None

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        # This rank's rows of the global batch; the random draws below are the global batch's.
        index = distributed.shard(s.batches(step)).to(device)
        y = None
        if y_train is not None:
            drop = distributed.rand((len(index),), generator=generator).to(device) < \
                cfg.label_dropout
            y = torch.where(drop, data.num_classes, y_train[index])
        with s.precision.autocast():
            loss = s.formulation.loss(s.model, s.x_train[index], y, generator)
        optimise(cfg, s.model, s.ema, s.optimizer, loss, step, s.precision)
        return {"loss": loss.detach()}

    fit(run, step_fn, total_steps=cfg.steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
        objects={"model": s.model, "ema": s.ema, "optimizer": s.optimizer, "rng": generator,
                 "precision": s.precision},
        progress=progress)
    if not distributed.is_main():
        return run  # the figures, the noisy classifier and the evaluation are rank 0's
    run.save_figure(metric_curves(run.metrics, ["loss"], title=f"{cfg.METHOD} training loss"),
                    "loss.png")
    run.write_summary({"train/steps": cfg.steps, "train/loss": run.last_row()["loss"]})
    if cfg.classifier_steps and not run.path(CLASSIFIER).is_file():
        save_noisy_classifier(train_classifier(cfg, data, s.x_train, device, progress),
                              run.path(CLASSIFIER))
    if cfg.eval_samples:
        evaluate(run, n=cfg.eval_samples, progress=progress)
    return run


def optimise(cfg: DiffusionConfig, model: nn.Module, ema: nn.Module,
             opt: torch.optim.Optimizer, loss: torch.Tensor, step: int,
             precision: Precision) -> None:
    """One Adam step on ``loss``: learning-rate warm-up, gradients averaged over the ranks and
    clipped, then the EMA update (``step`` counts from 1; a method with stages may restart it)."""
    set_lr(opt, warmup_linear_lr(cfg.lr, step, cfg.warmup_steps))
    opt.zero_grad(set_to_none=True)
    precision.backward(loss)
    precision.step(opt, model.parameters(), cfg.grad_clip)
    # EMA with the usual warm-up of the decay so early averages are not stuck at init.
    decay = min(cfg.ema_decay, (1 + step) / (10 + step))
    polyak_update(ema, model, 1 - decay)


def train_classifier(cfg: DiffusionConfig, data: Dataset, x_train: torch.Tensor,
                     device: torch.device, progress: bool | None = None) -> nn.Module:
    """The noisy classifier of classifier guidance, on the noise levels the sampler visits."""
    # The samplers start at the top of the model's range: sigma = 157 for VP, 100 for VE.
    sigma_max = max(edm.SIGMA_MAX, cfg.formulation().sigma_range()[1])
    return train_noisy_classifier(x_train, data.y_train, data.num_classes, cfg.classifier_steps,
                                  batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                                  device=device, sigma_max=sigma_max, progress=progress)


# --- a trained run -------------------------------------------------------------------------------

def load_classifier(run: Run, options: SampleConfig, device: torch.device) -> nn.Module | None:
    """The run's noisy classifier when ``options`` ask for classifier guidance."""
    if not options.classifier_scale:
        return None
    return load_noisy_classifier(run.path(CLASSIFIER), device)


def load_config(run: Run) -> DiffusionConfig:
    """The run's config, of the class config.json records; for a run that records none (made
    before mlatlas 0.2), the family's config of its method."""
    if run.config_class:
        return run.load_config()
    from mlatlas.generative.diffusion import configs
    from mlatlas.generative.flow_matching import flow_matching, rectified_flow

    family = [configs.DDPMConfig, configs.VPConfig, configs.VEConfig, configs.EDMConfig,
              flow_matching.Config, rectified_flow.Config]
    by_method = {cls.METHOD: cls for cls in family}
    if run.method not in by_method:
        raise ConfigError(f"{run.dir} is a {run.method} run, not one of the diffusion family's")
    return run.load_config(by_method[run.method])


def load_model(run: Run) -> tuple[DiffusionConfig, Dataset, nn.Module]:
    """The run's config, data and EMA network (in eval mode, on the run's device)."""
    cfg = load_config(run)
    data = load_data(cfg)
    model = build_model(cfg, data)
    run.load_weights(model, "ema")
    return cfg, data, model.to(resolve_device(cfg.device)).eval()


def eval_count(cfg: DiffusionConfig, n: int | None, data: Dataset) -> int:
    """``n`` samples, or the config's ``eval_samples`` when None, checked against the fewest the
    metrics of ``data`` can score."""
    n = cfg.eval_samples if n is None else n
    check_eval_count(n, data, "--n, or the run's --eval-samples")
    return n


# --- sampling and evaluation ---------------------------------------------------------------------

def sample_labels(n: int, options: SampleConfig, data: Dataset) -> torch.Tensor:
    """``options.label`` for all n samples, or the classes in turn."""
    if options.label >= 0:
        return torch.full((n,), options.label, dtype=torch.long)
    return torch.arange(n) % data.num_classes


def draw(cfg: DiffusionConfig, data: Dataset, model: nn.Module, n: int, seed: int,
         options: SampleConfig, progress: bool | None = None, callback: Callback = None,
         classifier: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n samples in model space with their labels (None for an unlabelled draw: an
    unconditional run without classifier guidance)."""
    device = next(model.parameters()).device
    labels = sample_labels(n, options, data).to(device) if options.labelled(cfg) else None
    net = classifier_free(model, labels if cfg.conditional else None, options.guidance)
    guide: Callable[[Denoiser], Denoiser] | None = None
    if options.classifier_scale:
        if classifier is None:
            raise ConfigError("--classifier-scale needs the run's noisy classifier")
        def guide(denoiser: Denoiser) -> Denoiser:
            return classifier_guided(denoiser, classifier, labels, options.classifier_scale)
    formulation = cfg.formulation()
    x = formulation.sample(
        net, (n, *data.sample_shape), options.sampler, options.steps,
        torch.Generator().manual_seed(seed), device,
        clip=formulation.clip_x0 and data.kind == "image", progress=progress,
        callback=callback, guide=guide, **options.sampler_options())
    return x, labels.cpu() if labels is not None else None


def sample(run: Run, n: int = 64, seed: int = 0, progress: bool | None = None,
           options: SampleConfig | None = None) -> torch.Tensor:
    """n samples from the run's EMA model, in data space (images in [0, 1])."""
    cfg, data, model = load_model(run)
    options = (options or SampleConfig()).resolve(cfg, data)
    classifier = load_classifier(run, options, next(model.parameters()).device)
    x = draw(cfg, data, model, n, seed, options, progress, classifier=classifier)[0]
    return from_model_space(x.cpu(), data)


def held_out_nll(formulation: Formulation, net: nn.Module, data: Dataset, n: int = 500,
                 rtol: float = RTOL, atol: float = ATOL) -> dict[str, float]:
    """Mean negative log-likelihood in nats of the first n held-out points of 2D ``data``, with
    the exact divergence (2 backward passes an evaluation in 2D; no random draw), as
    ``test_nll_nats`` beside the tolerances and function evaluations that produced it."""
    test = to_model_space(data.x_test[:n], data).to(next(net.parameters()).device)
    likelihood = log_likelihood(formulation, net, test, rtol=rtol, atol=atol)
    return {"test_nll_nats": -float(likelihood.log_p.mean()), "test_nll_rtol": rtol,
            "test_nll_atol": atol, "test_nll_nfe": likelihood.nfe}


def evaluate(run: Run, n: int | None = None, seed: int = 0, progress: bool | None = None,
             options: SampleConfig | None = None) -> dict:
    """Draw n samples (None: the run's ``eval_samples``) from the noise of ``seed``, write the
    figures, and score them against the held-out test split; the metrics also go to
    summary.json as ``eval/<name>``."""
    from mlatlas.generative.diffusion.plots import Frames, trajectory_figure, vector_field_figure

    cfg, data, model = load_model(run)
    n = eval_count(cfg, n, data)
    options = (options or SampleConfig()).resolve(cfg, data)
    formulation, keep = cfg.formulation(), 8 if data.kind == "image" else 200
    frames: Frames = []

    def record(i: int, level: float, x_i: torch.Tensor, x0_i: torch.Tensor) -> None:
        frames.append((level, formulation.display(x_i[:keep], level).cpu(), x0_i[:keep].cpu()))

    classifier = load_classifier(run, options, next(model.parameters()).device)
    x, labels = draw(cfg, data, model, n, seed, options, progress, callback=record,
                     classifier=classifier)
    x = from_model_space(x.cpu(), data)
    metrics = score_samples(x, data)
    if labels is not None:
        metrics.update(label_accuracy(x, labels, data))
        metrics.update(diversity(x, labels, data))
    metrics.update(sampler=options.sampler, sampler_steps=options.steps,
                   function_evaluations=function_evaluations(options.sampler, options.steps),
                   guidance=options.guidance, classifier_scale=options.classifier_scale)
    title = f"{cfg.METHOD} samples, {cfg.dataset}, {options.describe()}"
    run.save_figure(samples_figure(x, title, data.x_test), "samples.png")
    run.save_figure(trajectory_figure(frames, data, title=f"{cfg.METHOD}: the sampling "
                                      f"trajectory ({options.describe()})"), "trajectory.png")
    if data.kind == "points":
        run.save_figure(vector_field_figure(formulation, model, data), "vector_field.png")
        if labels is None:
            metrics.update(held_out_nll(formulation, model, data))
    write_eval_summary(run, metrics)
    return metrics


def write_eval_summary(run: Run, metrics: dict) -> None:
    """The metrics of the last evaluation as flat ``eval/<name>`` keys of summary.json."""
    run.write_evaluation(metrics)
