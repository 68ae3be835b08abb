r"""One training loop, one sampling path and one CLI for every diffusion model of the unified view.

A model is a *formulation* (``edm.py`` gives the table): how training draws the noise level and
forms the loss, and how a network becomes a denoiser D(x; sigma) on the scale-free variable
x = x_0 + sigma eps that the samplers of ``samplers.py`` integrate.

    ddpm  VP, discrete t in {1..T}, betas linear (or cosine), eps-prediction, L_simple,
          DDPM's ancestral sampler over all T steps (Ho et al. 2020)
    vp    the same process with an eps, x0 or v prediction, sampled with DDIM by default
    ve    s = 1, sigma in [0.02, 100]: ln sigma ~ U, lambda = 1 / sigma^2, D = x + sigma F
          (Song et al. 2021 in Karras et al.'s Table 1)
    edm   s = 1, ln sigma ~ N(-1.2, 1.2^2), the preconditioned D and its weight lambda(sigma)

The VP network sees x_t = x / sqrt(1 + sigma^2) and the fractional step t(sigma) of its table
(``ddpm.Schedule.sigma_to_t``); its output is turned into x_0 by ``parameterization``. Flow
matching (``mlatlas.generative.flow_matching``) plugs its own formulation into the same loop.

Class conditioning (``--conditional``) adds a label embedding to the network and, with
probability ``label_dropout``, trains on the null label instead, so one network is both
p(x | y) and p(x) for classifier-free guidance (``guidance.py``). ``--classifier-steps`` trains
a noisy classifier p(y | x; sigma) after the model, saved beside it, for classifier guidance
(``mlatlas sample RUN --classifier-scale s``), which works on conditional and unconditional runs
alike.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from mlatlas.core.config import BaseConfig, ConfigError, config_from_dict, flag, require_unit
from mlatlas.core.plots import metric_curves, samples_figure
from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import resolve_device, seed_everything
from mlatlas.data import Dataset, EpochBatches, load_dataset
from mlatlas.eval.samples import score_samples
from mlatlas.generative.diffusion import edm, samplers
from mlatlas.generative.diffusion.ddpm import Schedule
from mlatlas.generative.diffusion.guidance import (
    classifier_free,
    classifier_guided,
    diversity,
    label_accuracy,
    load_noisy_classifier,
    save_noisy_classifier,
    train_noisy_classifier,
)
from mlatlas.generative.diffusion.parameterization import from_x0_eps, to_x0_eps
from mlatlas.generative.diffusion.samplers import SAMPLERS, Callback, Denoiser, function_evaluations
from mlatlas.nn.unet import TimeMLP, UNet

# A network call with labels bound or guided: net(x, t) -> output shaped like x.
Network = Any
# The noisy classifier of classifier guidance, in the run folder beside the checkpoint.
CLASSIFIER = "noisy_classifier.safetensors"


# --- formulations ------------------------------------------------------------------------------

class Formulation:
    """How one kind of model trains and samples. Subclasses set ``time_scale`` (stretching the
    network's time input to the range its sinusoidal embedding suits) and the methods below."""

    time_scale: float = 1.0
    samplers: tuple[str, ...] = ("ddim", "euler", "heun")

    def loss(self, net: nn.Module, x0: torch.Tensor, y: torch.Tensor | None,
             generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def denoiser(self, net: Network, clip: bool = False) -> Denoiser:
        raise NotImplementedError

    def sigmas(self, steps: int, sampler: str) -> torch.Tensor:
        raise NotImplementedError

    def prior_std(self, sigma_max: float) -> float:
        """Standard deviation of the sampler's start x at sigma_max."""
        return sigma_max

    def sigma_range(self) -> tuple[float, float]:
        """(sigma_min, sigma_max) the model was trained to denoise, for likelihoods."""
        return edm.SIGMA_MIN, edm.SIGMA_MAX

    def display(self, x: torch.Tensor, level: float) -> torch.Tensor:
        """x at noise level ``level`` rescaled to the data's range, for trajectory figures."""
        return x / math.sqrt(1 + level**2)

    def sample(self, net: Network, shape: tuple[int, ...], sampler: str, steps: int,
               generator: torch.Generator, device: torch.device, *, clip: bool = False,
               progress: bool | None = None, callback: Callback = None,
               guide: Callable[[Denoiser], Denoiser] | None = None,
               **options: Any) -> torch.Tensor:
        """Draw x at sigmas[0] and run ``sampler``; returns x_0 samples in model space.
        ``guide`` wraps the denoiser (classifier guidance)."""
        if sampler not in self.samplers:
            raise ConfigError(f"sampler {sampler!r} does not apply here; choose from "
                              f"{', '.join(self.samplers)}")
        sigmas = self.sigmas(steps, sampler)
        x = torch.randn(shape, generator=generator).to(device) * self.prior_std(float(sigmas[0]))
        denoiser = self.denoiser(net, clip)
        if guide is not None:
            denoiser = guide(denoiser)
        return SAMPLERS[sampler](denoiser, x, sigmas, generator=generator,
                                 progress=progress, callback=callback, **options)


def batch_view(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B,) coefficient shaped (B, 1, ..., 1) in x's dtype and device."""
    return coef.to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class VP(Formulation):
    """Discrete variance preserving diffusion (DDPM) with an eps, x0 or v prediction."""

    samplers = ("ddpm", "ddim", "euler", "heun")

    def __init__(self, schedule: Schedule, prediction: Literal["eps", "x0", "v"] = "eps"):
        self.schedule, self.prediction = schedule, prediction

    def loss(self, net, x0, y, generator):
        s = self.schedule
        t = torch.randint(0, s.T, (len(x0),), generator=generator).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        alpha = batch_view(s.sqrt_alpha_bar[t.cpu()], x0)
        sigma = batch_view(s.sqrt_one_minus_alpha_bar[t.cpu()], x0)
        x_t = alpha * x0 + sigma * eps  # q_sample, with the coefficients the target needs too
        target = from_x0_eps(x0, eps, self.prediction, alpha, sigma)
        return (net(x_t, t.float(), y) - target).pow(2).mean()

    def denoiser(self, net, clip=False):
        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            scale = 1 / math.sqrt(1 + sigma**2)
            t = self.schedule.sigma_to_t(sigma)
            x_t = x * scale
            out = net(x_t, torch.full((len(x),), t, device=x.device, dtype=x.dtype))
            if self.prediction == "eps":  # x_0 = x - sigma eps in x's scale: one op, not three
                x0 = torch.add(x, out, alpha=-sigma)
            else:
                x0 = to_x0_eps(out, self.prediction, x_t, scale, sigma * scale)[0]
            return x0.clamp(-1, 1) if clip else x0

        return denoise

    def sigmas(self, steps, sampler):
        """Karras et al.'s spacing within the table's range for Euler and Heun; otherwise steps
        evenly spaced in t from T - 1 to 0 (every step when steps = T), as DDPM and DDIM use."""
        s = self.schedule
        if sampler in ("euler", "heun"):
            return edm.karras_sigmas(steps, float(s.sigmas[0]), float(s.sigmas[-1]))
        t = torch.linspace(s.T - 1, 0, steps, dtype=torch.float64)
        return torch.cat([s.t_to_sigma(t), torch.zeros(1, dtype=torch.float64)])

    def prior_std(self, sigma_max):
        # x_T ~ N(0, I) in the network's variable is x = x_T sqrt(1 + sigma^2) here.
        return math.sqrt(1 + sigma_max**2)

    def sigma_range(self):
        return float(self.schedule.sigmas[0]), float(self.schedule.sigmas[-1])


class Preconditioned(Formulation):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) trained with weight lambda(sigma):
    EDM (``kind='edm'``) or VE (``kind='ve'``)."""

    def __init__(self, kind: Literal["edm", "ve"], sigma_min: float, sigma_max: float,
                 sigma_data: float = edm.SIGMA_DATA, rho: float = edm.RHO,
                 p_mean: float = edm.P_MEAN, p_std: float = edm.P_STD):
        self.kind, self.sigma_min, self.sigma_max = kind, sigma_min, sigma_max
        self.sigma_data, self.rho, self.p_mean, self.p_std = sigma_data, rho, p_mean, p_std
        # c_noise = ln(sigma)/4 (EDM) or ln(sigma/2) (VE) spans a few units; the embedding was
        # made for step indices in the hundreds.
        self.time_scale = 250.0 if kind == "edm" else 100.0

    def coefficients(self, sigma: torch.Tensor):
        if self.kind == "edm":
            return edm.edm_preconditioning(sigma, self.sigma_data)
        return edm.ve_preconditioning(sigma)

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.kind == "edm":
            return edm.edm_loss_weight(sigma, self.sigma_data)
        return 1 / sigma**2

    def loss(self, net, x0, y, generator):
        n = len(x0)
        sigma = (edm.log_normal_sigmas(n, generator, self.p_mean, self.p_std) if self.kind == "edm"
                 else edm.log_uniform_sigmas(n, self.sigma_min, self.sigma_max, generator))
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        c_skip, c_out, c_in, c_noise = (batch_view(c, x0) for c in self.coefficients(sigma))
        x = x0 + batch_view(sigma, x0) * eps
        denoised = c_skip * x + c_out * net(c_in * x, c_noise.flatten(), y)
        return (batch_view(self.weight(sigma), x0) * (denoised - x0).pow(2)).mean()

    def denoiser(self, net, clip=False):
        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
            out = net(c_in * x, torch.full((len(x),), c_noise, device=x.device, dtype=x.dtype))
            x0 = torch.add(c_out * out, x, alpha=c_skip)
            return x0.clamp(-1, 1) if clip else x0

        return denoise

    def sigma_range(self):
        return self.sigma_min, self.sigma_max

    def sigmas(self, steps, sampler):
        if sampler == "ddim" and self.kind == "ve":
            return edm.geometric_sigmas(steps, self.sigma_min, self.sigma_max)
        return edm.karras_sigmas(steps, self.sigma_min, self.sigma_max, self.rho)


def log_likelihood(formulation: Formulation, net: Network, x0: torch.Tensor, steps: int = 100,
                   trace: Literal["exact", "hutchinson"] = "exact",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """log p(x0) in nats per example under the model's probability-flow ODE, integrated with
    ``steps`` Heun steps over the trained noise range (``samplers.log_likelihood``)."""
    sigma_min, sigma_max = formulation.sigma_range()
    sigmas = edm.karras_sigmas(steps, sigma_min, sigma_max).flip(0)[1:]
    return samplers.log_likelihood(formulation.denoiser(net), x0, sigmas,
                                   formulation.prior_std(sigma_max), trace=trace,
                                   generator=generator, progress=False)


def held_out_nll(formulation: Formulation, net: Network, data: Dataset, n: int = 500,
             steps: int = 64) -> float:
    """Mean negative log-likelihood in nats of the first n held-out points of 2D ``data``, with
    the exact divergence (2 backward passes a step in 2D)."""
    test = to_model_space(data.x_test[:n], data).to(next(net.parameters()).device)
    return -float(log_likelihood(formulation, net, test, steps).mean())


# --- configs -----------------------------------------------------------------------------------

Sampler = Literal["ddpm", "ddim", "euler", "heun"]


@dataclass
class DiffusionConfig(BaseConfig):
    """Fields shared by every diffusion and flow-matching model."""

    METHOD: ClassVar[str] = ""
    RESUMABLE: ClassVar[frozenset[str]] = BaseConfig.RESUMABLE | {"eval_samples"}

    dataset: str = "digits"
    """Training data: a name from `mlatlas list` or a path to an image folder or .npy file."""
    steps: int = 2000
    """Number of optimisation steps."""
    batch_size: int = 128
    """Examples per optimisation step."""
    lr: float = 1e-3
    """Adam learning rate after warm-up."""
    warmup_steps: int = 100
    """Linear learning-rate warm-up from 0."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    ema_decay: float = 0.995
    """Decay of the exponential moving average of the weights used for sampling."""
    channels: int = 24
    """UNet base width for images (levels of 1x and 2x this)."""
    hidden: int = 128
    """MLP width for points."""
    conditional: bool = False
    """Condition on the class label (for classifier-free guidance; needs a labelled dataset)."""
    label_dropout: float = 0.1
    """With --conditional, the share of examples trained with the null label."""
    classifier_steps: int = 0
    """After the model, train a noisy classifier p(y | x; sigma) this many steps for classifier
    guidance (`mlatlas sample --classifier-scale`); 0 trains none. Needs labelled data."""
    sampler: Sampler = "heun"
    """Sampler for the samples drawn at the end of training and the default of `mlatlas sample`."""
    sample_steps: int = 18
    """Sampler steps (Heun makes 2 x steps - 1 network evaluations)."""
    eval_samples: int = 500
    """Samples drawn at the end of training for the figures and metrics (0 skips)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"--ema-decay must lie in [0, 1), got {self.ema_decay}")
        for name in ("batch_size", "lr", "channels", "hidden", "sample_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{flag(name)} must be positive")
        if (self.eval_samples < 0 or self.warmup_steps < 0 or self.grad_clip < 0
                or self.classifier_steps < 0):
            raise ConfigError("--eval-samples, --warmup-steps, --grad-clip and --classifier-steps "
                              "cannot be negative")
        require_unit(self, "label_dropout")
        self.check_sampler(self.sampler)

    def check_data(self) -> None:
        from mlatlas.data import load_dataset

        load_dataset(self.dataset)

    def formulation(self) -> Formulation:
        raise NotImplementedError

    def check_sampler(self, sampler: str) -> None:
        """A ConfigError unless ``sampler`` applies to this model."""
        choices = self.formulation().samplers
        if sampler not in choices:
            raise ConfigError(f"--sampler {sampler} does not apply to {self.METHOD}; choose from "
                              f"{', '.join(choices)}")


@dataclass
class VPConfig(DiffusionConfig):
    """Variance-preserving diffusion (DDPM's process) with an eps, x0 or v prediction."""

    METHOD: ClassVar[str] = "vp"

    T: int = 1000
    """Number of diffusion steps."""
    schedule: Literal["linear", "cosine"] = "linear"
    """Betas linear from beta_1 to beta_T (Ho et al.) or cosine (Nichol & Dhariwal)."""
    beta_1: float = 1e-4
    """First forward-process variance beta_1 (linear schedule)."""
    beta_T: float = 0.02
    """Last forward-process variance beta_T (linear schedule)."""
    prediction: Literal["eps", "x0", "v"] = "eps"
    """What the network predicts: the noise, the clean data or v = alpha eps - sigma x_0."""
    clip_x0: bool = True
    """Clip the predicted x_0 to the data range [-1, 1] when sampling images."""
    sampler: Sampler = "ddim"
    """Sampler for the samples drawn at the end of training and the default of `mlatlas sample`."""
    sample_steps: int = 50
    """Sampler steps (Heun makes 2 x steps - 1 network evaluations)."""

    def __post_init__(self) -> None:
        if not 0 < self.beta_1 < self.beta_T < 1:
            raise ConfigError(f"need 0 < beta_1 < beta_T < 1, got {self.beta_1}, {self.beta_T}")
        if self.T < 2:
            raise ConfigError(f"--T must be at least 2, got {self.T}")
        super().__post_init__()

    def formulation(self) -> VP:
        schedule = (Schedule.linear(self.T, self.beta_1, self.beta_T)
                    if self.schedule == "linear" else Schedule.cosine(self.T))
        return VP(schedule, self.prediction)


@dataclass
class DDPMConfig(VPConfig):
    """DDPM with epsilon prediction, the simple loss and the ancestral sampler."""

    METHOD: ClassVar[str] = "ddpm"

    variance: Literal["posterior", "beta"] = "posterior"
    """Reverse-step variance sigma_t^2: the posterior's beta_tilde_t or the forward beta_t."""
    sampler: Sampler = "ddpm"
    """Sampler for the samples drawn at the end of training and the default of `mlatlas sample`."""
    sample_steps: int = 1000
    """Sampler steps (DDPM's ancestral sampler takes every one of the T steps)."""


@dataclass
class EDMConfig(DiffusionConfig):
    """EDM (Karras et al. 2022): preconditioned denoiser, log-normal sigma, Heun sampling."""

    METHOD: ClassVar[str] = "edm"

    sigma_min: float = edm.SIGMA_MIN
    """Smallest sampling noise level."""
    sigma_max: float = edm.SIGMA_MAX
    """Largest sampling noise level."""
    sigma_data: float = edm.SIGMA_DATA
    """Standard deviation of the data assumed by the preconditioning."""
    rho: float = edm.RHO
    """Exponent of the sampling noise levels' spacing (eq. 5)."""
    p_mean: float = edm.P_MEAN
    """Mean of ln sigma in training."""
    p_std: float = edm.P_STD
    """Standard deviation of ln sigma in training."""
    clip_x0: bool = False
    """Clip the denoised x_0 to [-1, 1] when sampling images (EDM does not)."""

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, "
                              f"{self.sigma_max}")
        for name in ("sigma_data", "rho", "p_std"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{flag(name)} must be positive")
        super().__post_init__()

    def formulation(self) -> Preconditioned:
        return Preconditioned("edm", self.sigma_min, self.sigma_max, self.sigma_data, self.rho,
                              self.p_mean, self.p_std)


@dataclass
class VEConfig(DiffusionConfig):
    """Variance exploding score matching (Song et al. 2021) in EDM's form."""

    METHOD: ClassVar[str] = "ve"

    sigma_min: float = 0.02
    """Smallest noise level, in training and sampling."""
    sigma_max: float = 100.0
    """Largest noise level, in training and sampling."""
    clip_x0: bool = False
    """Clip the denoised x_0 to [-1, 1] when sampling images."""
    sample_steps: int = 40
    """Sampler steps (Heun makes 2 x steps - 1 network evaluations)."""

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, "
                              f"{self.sigma_max}")
        super().__post_init__()

    def formulation(self) -> Preconditioned:
        return Preconditioned("ve", self.sigma_min, self.sigma_max)


# --- sampling options (flags of `mlatlas sample` and `mlatlas eval`) ---------------------------

@dataclass
class SampleConfig:
    """How to sample from a trained run; zeros and empty strings take the run's own settings."""

    sampler: str = ""
    """ddpm, ddim, euler or heun (flow matching: euler or heun); empty: the run's --sampler."""
    steps: int = 0
    """Sampler steps; 0: the run's --sample-steps."""
    eta: float = 0.0
    """DDIM's stochasticity (0 deterministic, 1 DDPM's posterior variance)."""
    churn: float = 0.0
    """Euler/Heun: S_churn of EDM's stochastic sampler (0 deterministic)."""
    guidance: float = 0.0
    """Classifier-free guidance weight w: (1 + w) D(x | y) - w D(x) (0: conditional only)."""
    classifier_scale: float = 0.0
    """Classifier guidance scale s: D(x) + s sigma^2 grad log p(y | x; sigma), with the noisy
    classifier of a run trained with --classifier-steps (0: none)."""
    label: int = -1
    """Class to sample for a conditional run; -1 cycles through the classes."""

    def resolve(self, cfg: DiffusionConfig, data: Dataset) -> SampleConfig:
        """Fill the run's defaults in and check the options against the run."""
        out = copy.copy(self)
        out.sampler = self.sampler or cfg.sampler
        out.steps = self.steps or cfg.sample_steps
        cfg.check_sampler(out.sampler)
        if out.steps < 1:
            raise ConfigError(f"--steps must be positive, got {out.steps}")
        if out.eta and out.sampler != "ddim":
            raise ConfigError("--eta applies to the ddim sampler only")
        if out.churn and out.sampler not in ("euler", "heun"):
            raise ConfigError("--churn applies to the euler and heun samplers only")
        if not 0 <= out.eta <= 1 or out.churn < 0:
            raise ConfigError("--eta must lie in [0, 1] and --churn cannot be negative")
        if out.guidance and not cfg.conditional:
            raise ConfigError("--guidance needs a run trained with --conditional")
        if out.classifier_scale and not cfg.classifier_steps:
            raise ConfigError("--classifier-scale needs a run trained with --classifier-steps")
        if not math.isfinite(out.classifier_scale):
            raise ConfigError("--classifier-scale must be a finite number")
        if out.label >= 0 and not (cfg.conditional or out.classifier_scale):
            raise ConfigError("--label needs a run trained with --conditional or a "
                              "--classifier-scale")
        if out.label >= max(data.num_classes, 1) or out.label < -1:
            raise ConfigError(f"--label must be -1 or a class in 0..{data.num_classes - 1}, "
                              f"got {out.label}")
        return out

    def sampler_options(self) -> dict[str, Any]:
        if self.sampler == "ddim":
            return {"eta": self.eta}
        if self.sampler in ("euler", "heun") and self.churn:
            return {"S_churn": self.churn}
        return {}

    def describe(self) -> str:
        extra = "".join(f", {k} {v}" for k, v in self.sampler_options().items())
        guidance = f", guidance {self.guidance}" if self.guidance else ""
        if self.classifier_scale:
            guidance += f", classifier scale {self.classifier_scale}"
        return f"{self.sampler}, {self.steps} steps{extra}{guidance}"

    def labelled(self, cfg: DiffusionConfig) -> bool:
        """Whether samples are drawn for given labels (conditioning or classifier guidance)."""
        return cfg.conditional or bool(self.classifier_scale)


# --- model, training, sampling -----------------------------------------------------------------

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


def train(cfg: DiffusionConfig, run: Run | None = None, progress: bool | None = None) -> Run:
    """Train (or, given a run with a checkpoint, resume) any diffusion or flow-matching config;
    returns the run."""
    run = run or Run.create(cfg.METHOD, cfg)
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    formulation = cfg.formulation()
    generator = seed_everything(cfg.seed)
    model = build_model(cfg, data).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    x_train = to_model_space(data.x_train, data).to(device)
    y_train = data.y_train.to(device) if cfg.conditional else None
    batches = EpochBatches(len(x_train), cfg.batch_size, cfg.seed)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        index = batches(step).to(device)
        y = None
        if y_train is not None:
            drop = torch.rand(len(index), generator=generator).to(device) < cfg.label_dropout
            y = torch.where(drop, data.num_classes, y_train[index])
        loss = formulation.loss(model, x_train[index], y, generator)
        optimise(cfg, model, ema, opt, loss, step)
        return {"loss": loss.detach()}

    fit(run, step_fn, total_steps=cfg.steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
        objects={"model": model, "ema": ema, "optimizer": opt, "rng": generator},
        progress=progress)
    run.save_figure(metric_curves(run.metrics, ["loss"], title=f"{cfg.METHOD} training loss"),
                    "loss.png")
    run.write_summary({"steps": cfg.steps, "final_loss": run.metrics[-1]["loss"]})
    if cfg.classifier_steps and not run.path(CLASSIFIER).is_file():
        save_noisy_classifier(train_classifier(cfg, data, x_train, device, progress),
                              run.path(CLASSIFIER))
    if cfg.eval_samples:
        evaluate(run, n=cfg.eval_samples, progress=progress)
    return run


def optimise(cfg: DiffusionConfig, model: nn.Module, ema: nn.Module,
             opt: torch.optim.Optimizer, loss: torch.Tensor, step: int) -> None:
    """One Adam step on ``loss``: learning-rate warm-up, gradient clipping, then the EMA update
    (``step`` counts from 1; a method with stages may restart it)."""
    for group in opt.param_groups:
        group["lr"] = cfg.lr * min(1.0, step / max(1, cfg.warmup_steps))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    # EMA with the usual warm-up of the decay so early averages are not stuck at init.
    decay = min(cfg.ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def train_classifier(cfg: DiffusionConfig, data: Dataset, x_train: torch.Tensor,
                     device: torch.device, progress: bool | None = None) -> nn.Module:
    """The noisy classifier of classifier guidance, on the noise levels the sampler visits."""
    # The samplers start at the top of the model's range: sigma = 157 for VP, 100 for VE.
    sigma_max = max(edm.SIGMA_MAX, cfg.formulation().sigma_range()[1])
    return train_noisy_classifier(x_train, data.y_train, data.num_classes, cfg.classifier_steps,
                                  batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                                  device=device, sigma_max=sigma_max, progress=progress)


def load_classifier(run: Run, options: SampleConfig, device: torch.device) -> nn.Module | None:
    """The run's noisy classifier when ``options`` ask for classifier guidance."""
    if not options.classifier_scale:
        return None
    return load_noisy_classifier(run.path(CLASSIFIER), device)


def load_config(run: Run) -> DiffusionConfig:
    from mlatlas.registry import get_method

    return config_from_dict(get_method(run.method).config_cls, run.config)


def load_model(run: Run) -> tuple[DiffusionConfig, Dataset, nn.Module]:
    """The run's config, data and EMA network (in eval mode, on the run's device)."""
    cfg = load_config(run)
    data = load_data(cfg)
    model = build_model(cfg, data)
    run.load_weights(model, "ema")
    return cfg, data, model.to(resolve_device(cfg.device)).eval()


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
    guide = None
    if options.classifier_scale:
        if classifier is None:
            raise ConfigError("--classifier-scale needs the run's noisy classifier")
        def guide(denoiser: Denoiser) -> Denoiser:
            return classifier_guided(denoiser, classifier, labels, options.classifier_scale)
    x = cfg.formulation().sample(
        net, (n, *data.sample_shape), options.sampler, options.steps,
        torch.Generator().manual_seed(seed), device,
        clip=getattr(cfg, "clip_x0", False) and data.kind == "image", progress=progress,
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


def evaluate(run: Run, n: int = 500, seed: int = 0, progress: bool | None = None,
             options: SampleConfig | None = None) -> dict:
    """Draw n samples, write the figures, and score them against the held-out test split."""
    from mlatlas.generative.diffusion.plots import Frames, trajectory_figure, vector_field_figure

    cfg, data, model = load_model(run)
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
            metrics["test_nll_nats"] = held_out_nll(formulation, model, data)
    run.write_summary({"eval": metrics})
    return metrics
