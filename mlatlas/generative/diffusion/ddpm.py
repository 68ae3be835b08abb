r"""Denoising diffusion probabilistic models (Ho, Jain & Abbeel, NeurIPS 2020).

Forward process, a fixed Markov chain with variances beta_1 < ... < beta_T (linear from 1e-4 to
0.02 over T = 1000 steps in the paper):

    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)
    alpha_t = 1 - beta_t,    alpha_bar_t = prod_{s <= t} alpha_s
    q(x_t | x_0)     = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)                    (eq. 4)
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,   eps ~ N(0, I)

Posterior of one reverse step, tractable given x_0 (eq. 6-7):

    q(x_{t-1} | x_t, x_0) = N(mu_tilde_t, beta_tilde_t I)
    mu_tilde_t   = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
                   + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
    beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t

The network eps_theta(x_t, t) predicts the noise; the simple objective (eq. 14) is

    L_simple = E_{t ~ U{1..T}, x_0, eps} || eps - eps_theta(sqrt(alpha_bar_t) x_0
                                                         + sqrt(1 - alpha_bar_t) eps, t) ||^2

and ancestral sampling (Algorithm 2) runs t = T, ..., 1 with z ~ N(0, I) (z = 0 at t = 1):

    x_0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_bar_t)   (optionally clipped)
    x_{t-1} = mu_tilde_t(x_0_hat, x_t) + sigma_t z,   sigma_t^2 = beta_tilde_t or beta_t

Without clipping the mean equals the paper's 1/sqrt(alpha_t) (x_t - beta_t/sqrt(1-alpha_bar_t)
eps_theta). In code the timestep is 0-based: index i holds the paper's t = i + 1, so
``alpha_bar[0] = alpha_1`` and ``alpha_bar_prev[0] = 1``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mlatlas.core.config import BaseConfig, ConfigError, config_from_dict, flag
from mlatlas.core.nn import TimeMLP, UNet
from mlatlas.core.plots import metric_curves, samples_figure
from mlatlas.core.progress import progress_bar
from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import resolve_device, seed_everything
from mlatlas.data import Dataset, EpochBatches, load_dataset
from mlatlas.eval.samples import score_samples


@dataclass
class Config(BaseConfig):
    """DDPM with epsilon prediction, the simple loss and the ancestral sampler."""

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
    T: int = 1000
    """Number of diffusion steps."""
    beta_1: float = 1e-4
    """First forward-process variance beta_1."""
    beta_T: float = 0.02
    """Last forward-process variance beta_T."""
    variance: Literal["posterior", "beta"] = "posterior"
    """Reverse-step variance sigma_t^2: the posterior's beta_tilde_t or the forward beta_t."""
    clip_x0: bool = True
    """Clip the predicted x_0 to the data range [-1, 1] when sampling images."""
    channels: int = 24
    """UNet base width for images (levels of 1x and 2x this)."""
    hidden: int = 128
    """MLP width for points."""
    eval_samples: int = 500
    """Samples drawn at the end of training for the figures and metrics (0 skips)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.beta_1 < self.beta_T < 1:
            raise ConfigError(f"need 0 < beta_1 < beta_T < 1, got {self.beta_1}, {self.beta_T}")
        if self.T < 2:
            raise ConfigError(f"--T must be at least 2, got {self.T}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"--ema-decay must lie in [0, 1), got {self.ema_decay}")
        for name in ("batch_size", "lr", "channels", "hidden"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{flag(name)} must be positive")
        if self.eval_samples < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("--eval-samples, --warmup-steps and --grad-clip cannot be negative")


# --- the maths ---------------------------------------------------------------------------------

# A (B,) tensor of 0-based step indices, or one int shared by the whole batch.
Timestep = torch.Tensor | int


def linear_betas(T: int = 1000, beta_1: float = 1e-4, beta_T: float = 0.02) -> torch.Tensor:
    """beta_1..beta_T spaced linearly (float64, shape (T,))."""
    return torch.linspace(beta_1, beta_T, T, dtype=torch.float64)


class Schedule:
    """Every per-step coefficient of the forward process and its posterior, in float64."""

    def __init__(self, betas: torch.Tensor):
        betas = betas.double()
        self.T = len(betas)
        self.betas = betas
        self.alphas = 1 - betas
        self.alpha_bar = torch.cumprod(self.alphas, 0)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        self.sqrt_alpha_bar = self.alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1 - self.alpha_bar).sqrt()
        self.beta_tilde = (1 - self.alpha_bar_prev) / (1 - self.alpha_bar) * betas
        self.mu_coef_x0 = self.alpha_bar_prev.sqrt() * betas / (1 - self.alpha_bar)
        self.mu_coef_xt = self.alphas.sqrt() * (1 - self.alpha_bar_prev) / (1 - self.alpha_bar)

    @classmethod
    def linear(cls, T: int = 1000, beta_1: float = 1e-4, beta_T: float = 0.02) -> Schedule:
        return cls(linear_betas(T, beta_1, beta_T))


def _at(coef: torch.Tensor, t: Timestep, x: torch.Tensor) -> torch.Tensor | float:
    """coef[t] shaped (B, 1, ..., 1) to broadcast against x, in x's dtype and device; a plain
    float when t is one int shared by the batch (the sampler's case: scalars cost less)."""
    if isinstance(t, int):
        return float(coef[t])
    # Index on the CPU table first: only B values then cross to the device and dtype.
    return coef[t.cpu()].to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def q_mean_var(x0: torch.Tensor, t: Timestep, s: Schedule) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
    """Mean sqrt(alpha_bar_t) x_0 and variance 1 - alpha_bar_t of q(x_t | x_0)."""
    return _at(s.sqrt_alpha_bar, t, x0) * x0, _at(1 - s.alpha_bar, t, x0)


def q_sample(x0: torch.Tensor, t: Timestep, eps: torch.Tensor, s: Schedule) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    return _at(s.sqrt_alpha_bar, t, x0) * x0 + _at(s.sqrt_one_minus_alpha_bar, t, x0) * eps


def q_posterior(x0: torch.Tensor, xt: torch.Tensor, t: Timestep,
                s: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean mu_tilde_t and variance beta_tilde_t of q(x_{t-1} | x_t, x_0)."""
    mean = _at(s.mu_coef_x0, t, x0) * x0 + _at(s.mu_coef_xt, t, xt) * xt
    return mean, _at(s.beta_tilde, t, x0)


def predict_x0(xt: torch.Tensor, t: Timestep, eps: torch.Tensor, s: Schedule) -> torch.Tensor:
    """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
    return (xt - _at(s.sqrt_one_minus_alpha_bar, t, xt) * eps) / _at(s.sqrt_alpha_bar, t, xt)


def simple_loss(model: nn.Module, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                s: Schedule) -> torch.Tensor:
    """L_simple: mean squared error between eps and eps_theta(x_t, t)."""
    return (eps - model(q_sample(x0, t, eps, s), t.float())).pow(2).mean()


def p_sample_step(model: nn.Module, xt: torch.Tensor, i: int, s: Schedule, z: torch.Tensor,
                  variance: str = "posterior", clip: bool = False) -> torch.Tensor:
    """One ancestral step from x_t to x_{t-1} at 0-based index ``i`` with noise ``z``."""
    x0_hat = predict_x0(xt, i, model(xt, torch.full((len(xt),), float(i), device=xt.device)), s)
    if clip:
        x0_hat = x0_hat.clamp(-1, 1)
    mean, beta_tilde = q_posterior(x0_hat, xt, i, s)
    if i == 0:
        return mean
    sigma2 = beta_tilde if variance == "posterior" else _at(s.betas, i, xt)
    return mean + sigma2**0.5 * z


@torch.no_grad()
def ancestral_sample(model: nn.Module, shape: tuple[int, ...], s: Schedule,
                     generator: torch.Generator | None = None, variance: str = "posterior",
                     clip: bool = False, device: torch.device | str = "cpu",
                     progress: bool | None = None) -> torch.Tensor:
    """Algorithm 2: x_T ~ N(0, I), then T ancestral steps. Noise is drawn on the CPU from
    ``generator`` so that a seed gives the same samples on any device."""
    x = torch.randn(shape, generator=generator).to(device)
    for i in progress_bar(range(s.T - 1, -1, -1), desc="sampling", leave=False,
                          progress=progress):
        z = torch.randn(shape, generator=generator).to(device) if i > 0 else None
        x = p_sample_step(model, x, i, s, z, variance, clip)
    return x


# --- model, training, sampling -----------------------------------------------------------------

def build_model(cfg: Config, data: Dataset) -> nn.Module:
    if data.kind == "points":
        return TimeMLP(data.sample_shape[0], hidden=cfg.hidden)
    side = data.sample_shape[-1]
    mults = (1, 2) if side % 2 == 0 else (1,)
    return UNet(data.sample_shape[0], base=cfg.channels, channel_mults=mults, attention=False)


def to_model_space(x: torch.Tensor, data: Dataset) -> torch.Tensor:
    """Images in [0, 1] become [-1, 1]; points are used as they are."""
    return x * 2 - 1 if data.kind == "image" else x


def from_model_space(x: torch.Tensor, data: Dataset) -> torch.Tensor:
    return ((x + 1) / 2).clamp(0, 1) if data.kind == "image" else x


def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    """Train (or, given a run with a checkpoint, resume) DDPM; returns the run."""
    run = run or Run.create("ddpm", cfg)
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.dataset)
    generator = seed_everything(cfg.seed)
    model = build_model(cfg, data).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    s = Schedule.linear(cfg.T, cfg.beta_1, cfg.beta_T)
    x_train = to_model_space(data.x_train, data).to(device)
    batches = EpochBatches(len(x_train), cfg.batch_size, cfg.seed)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        x0 = x_train[batches(step).to(device)]
        t = torch.randint(0, s.T, (len(x0),), generator=generator).to(device)
        eps = torch.randn(x0.shape, generator=generator).to(device)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, step / max(1, cfg.warmup_steps))
        loss = simple_loss(model, x0, t, eps, s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        # EMA with the usual warm-up of the decay so early averages are not stuck at init.
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        return {"loss": loss.detach()}

    fit(run, step_fn, total_steps=cfg.steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
        objects={"model": model, "ema": ema, "optimizer": opt, "rng": generator},
        progress=progress)
    run.save_figure(metric_curves(run.metrics, ["loss"], title="DDPM simple loss"), "loss.png")
    run.write_summary({"steps": cfg.steps, "final_loss": run.metrics[-1]["loss"]})
    if cfg.eval_samples:
        evaluate(run, n=cfg.eval_samples, progress=progress)
    return run


def load_config(run: Run) -> Config:
    return config_from_dict(Config, run.config)


def sample(run: Run, n: int = 64, seed: int = 0, progress: bool | None = None) -> torch.Tensor:
    """n samples from the run's EMA model, in data space (images in [0, 1])."""
    cfg = load_config(run)
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.dataset)
    model = build_model(cfg, data)
    run.load_weights(model, "ema")
    s = Schedule.linear(cfg.T, cfg.beta_1, cfg.beta_T)
    x = ancestral_sample(model.to(device).eval(), (n, *data.sample_shape), s,
                         torch.Generator().manual_seed(seed), cfg.variance,
                         clip=cfg.clip_x0 and data.kind == "image", device=device,
                         progress=progress)
    return from_model_space(x.cpu(), data)


def evaluate(run: Run, n: int = 500, seed: int = 0, progress: bool | None = None) -> dict:
    """Draw n samples, write the figure, and score them against the held-out test split."""
    cfg = load_config(run)
    data = load_dataset(cfg.dataset)
    x = sample(run, n, seed, progress)
    metrics = score_samples(x, data)
    run.save_figure(samples_figure(x, f"DDPM samples, {cfg.dataset}, step {cfg.steps}",
                                   data.x_test), "samples.png")
    run.write_summary({"eval": metrics})
    return metrics
