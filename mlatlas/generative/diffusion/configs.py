"""The configs of the diffusion family and the options of `mlatlas sample` and `mlatlas eval`.

``DiffusionConfig`` holds what every diffusion and flow-matching model shares (data, optimiser,
EMA, network widths, conditioning, the default sampler); each model's config extends it directly
(``DDPMConfig``, ``VPConfig``, ``EDMConfig``, ``VEConfig`` here, ``flow_matching.Config`` and
``rectified_flow.Config`` beside their maths) and names its ``formulation``. ``SampleConfig``
holds the sampling options, whose zeros and empty strings take the run's own settings.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from mlatlas.core.config import BatchConfig, ConfigError, check_options, flag, require_unit
from mlatlas.generative.diffusion import edm
from mlatlas.generative.diffusion.ddpm import Schedule
from mlatlas.generative.diffusion.formulations import VP, Formulation, Preconditioned

if TYPE_CHECKING:
    from mlatlas.data import Dataset

Sampler = Literal["ddpm", "ddim", "euler", "heun"]


@dataclass
class DiffusionConfig(BatchConfig):
    """Fields shared by every diffusion and flow-matching model."""

    METHOD: ClassVar[str] = ""
    RESUMABLE: ClassVar[frozenset[str]] = BatchConfig.RESUMABLE | {"eval_samples"}

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

    def check(self) -> None:
        super().check()
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"--ema-decay must lie in [0, 1), got {self.ema_decay}")
        for name in ("batch_size", "channels", "hidden", "sample_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{flag(name)} must be positive, got {getattr(self, name)}")
        if self.channels % 2:
            # The UNet's sinusoidal time embedding has channels / 2 frequencies, cos and sin.
            raise ConfigError(f"--channels must be even, got {self.channels}")
        if self.grad_clip < 0:  # the integer fields are non-negative by check_fields
            raise ConfigError(f"--grad-clip cannot be negative, got {self.grad_clip}")
        require_unit(self, "label_dropout")
        self.check_sampler(self.sampler)

    def check_data(self) -> None:
        from mlatlas.data import load_dataset

        data = load_dataset(self.dataset)
        if data.kind == "points" and data.sample_shape != (2,):
            raise ConfigError(f"--dataset {self.dataset}: points in {data.sample_shape[0]} "
                              "dimensions; the diffusion methods model points in the plane, "
                              "(N, 2), whose figures and vector fields they draw")
        if self.eval_samples:
            check_eval_count(self.eval_samples, data, "--eval-samples; 0 skips the evaluation")

    def formulation(self) -> Formulation:
        raise NotImplementedError

    def check_sampler(self, sampler: str) -> None:
        """A ConfigError unless ``sampler`` applies to this model."""
        choices = self.formulation().samplers
        if sampler not in choices:
            raise ConfigError(f"--sampler {sampler} does not apply to {self.METHOD}; choose from "
                              f"{', '.join(choices)}")


def check_eval_count(n: int, data: Dataset, where: str) -> None:
    """ConfigError unless ``n`` samples of ``data`` are enough for its metrics."""
    from mlatlas.eval.samples import min_samples

    low = min_samples(data.kind)
    if n < low:
        reason = ("the unbiased MMD needs two" if data.kind == "points"
                  else f"precision and recall need more than their {low - 1} neighbours")
        raise ConfigError(f"an evaluation on {data.kind} needs at least {low} samples "
                          f"({reason}), got {n} ({where})")


# --- VP and DDPM ---------------------------------------------------------------------------------
# Two methods on one formulation; each config is flat, the checks and the formulation shared.

def check_vp(cfg: VPConfig | DDPMConfig | Any) -> None:
    if not 0 < cfg.beta_1 < cfg.beta_T < 1:
        raise ConfigError(f"need 0 < beta_1 < beta_T < 1, got {cfg.beta_1}, {cfg.beta_T}")
    if cfg.T < 2:
        raise ConfigError(f"--T must be at least 2, got {cfg.T}")


def vp_formulation(cfg: VPConfig | DDPMConfig | Any, variance: Literal["posterior", "beta"]) -> VP:
    schedule = (Schedule.linear(cfg.T, cfg.beta_1, cfg.beta_T)
                if cfg.schedule == "linear" else Schedule.cosine(cfg.T))
    return VP(schedule, cfg.prediction, variance, cfg.clip_x0)


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

    def check(self) -> None:
        check_vp(self)
        super().check()

    def formulation(self) -> VP:
        return vp_formulation(self, "posterior")


@dataclass
class DDPMConfig(DiffusionConfig):
    """DDPM with epsilon prediction, the simple loss and the ancestral sampler."""

    METHOD: ClassVar[str] = "ddpm"

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
    variance: Literal["posterior", "beta"] = "posterior"
    """Reverse-step variance sigma_t^2: the posterior's beta_tilde_t or the forward beta_t."""
    sampler: Sampler = "ddpm"
    """Sampler for the samples drawn at the end of training and the default of `mlatlas sample`."""
    sample_steps: int = 1000
    """Sampler steps (DDPM's ancestral sampler takes every one of the T steps)."""

    def check(self) -> None:
        check_vp(self)
        super().check()

    def formulation(self) -> VP:
        return vp_formulation(self, self.variance)


# --- EDM and VE ----------------------------------------------------------------------------------

def _check_sigma_range(cfg: EDMConfig | VEConfig) -> None:
    if not 0 < cfg.sigma_min < cfg.sigma_max:
        raise ConfigError(f"need 0 < sigma_min < sigma_max, got {cfg.sigma_min}, "
                          f"{cfg.sigma_max}")


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

    def check(self) -> None:
        _check_sigma_range(self)
        for name in ("sigma_data", "rho", "p_std"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{flag(name)} must be positive")
        super().check()

    def formulation(self) -> Preconditioned:
        return Preconditioned("edm", self.sigma_min, self.sigma_max, self.sigma_data, self.rho,
                              self.p_mean, self.p_std, clip_x0=self.clip_x0)


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

    def check(self) -> None:
        _check_sigma_range(self)
        super().check()

    def formulation(self) -> Preconditioned:
        return Preconditioned("ve", self.sigma_min, self.sigma_max, clip_x0=self.clip_x0)


# --- sampling options (flags of `mlatlas sample` and `mlatlas eval`) ---------------------------

@dataclass
class SampleConfig:
    """How to sample from a trained run; zeros and empty strings take the run's own settings."""

    SIGNED: ClassVar[frozenset[str]] = frozenset({"label"})

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

    def __post_init__(self) -> None:
        check_options(self)

    def resolve(self, cfg: DiffusionConfig, data: Dataset) -> SampleConfig:
        """Fill the run's defaults in and check the options against the run."""
        out = copy.copy(self)
        out.sampler = self.sampler or cfg.sampler
        out.steps = self.steps or cfg.sample_steps
        cfg.check_sampler(out.sampler)
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
