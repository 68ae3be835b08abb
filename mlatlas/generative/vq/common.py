r"""The autoencoder family: one config base, the models, one training loop and one evaluation for
the KL autoencoder (``autoencoder``), VQ-VAE (``vqvae``) and VQGAN (``vqgan``).

Every model maps an image x (C, H, W) in [0, 1] to a latent map z (C_z, h, w), h = H / f,
w = W / f for the downsampling factor f, and back, and is trained on

    L = L_rec + (the method's terms),      L_rec = ||x - x_hat||^2 (mean over pixels),

the KL autoencoder adding a KL term to N(0, I) (:mod:`.autoencoder`), VQ-VAE the codebook and
commitment terms (:mod:`.quantizer`), VQGAN a perceptual and an adversarial term and a second
optimizer for its discriminator (:mod:`.vqgan`). The loop takes an Adam step on L per batch, the
global gradient norm clipped to ``grad_clip``; a VQ model then resets its dead codes, and VQGAN
takes its discriminator step.

What later stages use (the transformer prior over codes, latent diffusion):
:func:`load_autoencoder` gives the trained :class:`Autoencoder` of a run, with ``encode``,
``decode`` and ``latent_shape``; a :class:`VQModel` adds ``encode_indices``, ``decode_indices``
and ``codebook_size``.

The evaluation reports, on the whole held-out split, the reconstruction MSE (pixels in [0, 1], the
reconstruction clipped to [0, 1]) and PSNR = 10 log10(1 / MSE) dB beside the trivial baseline
(every image reconstructed as the mean training image), the latent standard deviation and the
``scaling_factor`` 1 / std that puts latents at unit variance (diffusers' convention for latent
diffusion), for a VQ model the code usage and perplexity of the held-out codes, and the Frechet
distance and precision/recall (:func:`~mlatlas.eval.samples.score_samples`) of the
reconstructions of ``n`` held-out images, beside the same scores of those n originals
(``originals_*``: the floor, since n images leave a distance even when they are the data).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mlatlas.core import distributed
from mlatlas.core.config import BatchConfig, ConfigError, require_at_least
from mlatlas.core.plots import metric_curves, show_images
from mlatlas.core.precision import Precision, compile_module
from mlatlas.core.run import Run, RunError, fit, open_stage, train_stage
from mlatlas.core.runtime import resolve_device, seed_everything
from mlatlas.data import Dataset, DatasetError, EpochBatches, load_dataset
from mlatlas.eval.samples import min_samples, score_samples
from mlatlas.generative.vq.networks import Decoder, Encoder
from mlatlas.generative.vq.quantizer import (
    BETA,
    DECAY,
    EPS,
    Quantized,
    VectorQuantizer,
    code_counts,
    nearest_code,
    perplexity,
    usage,
)

# Images per forward pass of the evaluation, and held-out images scored during training.
EVAL_BATCH = 500
MAX_DOWNSAMPLE = 64


# --- models --------------------------------------------------------------------------------------

@dataclass
class Reconstruction:
    """A model's forward pass on a batch: ``x_hat`` (B, C, H, W), the ``loss`` terms the model adds
    to the reconstruction loss (weighted), ``metrics`` to log, and the quantiser's output for a VQ
    model."""

    x_hat: torch.Tensor
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    quantized: Quantized | None = None


class Autoencoder(nn.Module):
    """An encoder and a decoder between images (B, C, H, W) in [0, 1] and latents
    (B, *latent_shape); the base of the KL autoencoder and the VQ models."""

    def __init__(self, image_shape: tuple[int, int, int], latent_shape: tuple[int, int, int],
                 encoder: Encoder, decoder: Decoder):
        super().__init__()
        self.image_shape, self.latent_shape = tuple(image_shape), tuple(latent_shape)
        self.encoder, self.decoder = encoder, decoder

    def check_images(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"the autoencoder takes (B, {', '.join(map(str, self.image_shape))})"
                             f" images, got {tuple(x.shape)}")

    def check_latents(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"the decoder takes (B, {', '.join(map(str, self.latent_shape))}) "
                             f"latents, got {tuple(z.shape)}")

    @property
    def last_layer(self) -> torch.Tensor:
        return self.decoder.last_layer

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, *latent_shape) -> (B, C, H, W) images in the [0, 1] scale (not clipped)."""
        self.check_latents(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> Reconstruction:
        raise NotImplementedError


class VQModel(Autoencoder):
    """Encoder -> nearest code of a (K, D) codebook -> decoder: latents z_q (B, D, h, w)."""

    def __init__(self, image_shape: tuple[int, int, int], latent_shape: tuple[int, int, int],
                 encoder: Encoder, decoder: Decoder, quantizer: VectorQuantizer):
        super().__init__(image_shape, latent_shape, encoder, decoder)
        self.quantizer = quantizer

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, h, w) code indices (no codebook update)."""
        self.check_images(x)
        z_e = self.encoder(x).float()
        b, d, h, w = z_e.shape
        indices = nearest_code(z_e.permute(0, 2, 3, 1).reshape(-1, d),
                               self.quantizer.codebook.detach())
        return indices.reshape(b, h, w)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> the quantised latents z_q (B, D, h, w)."""
        return self.quantizer.lookup(self.encode_indices(x))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) code indices -> (B, C, H, W) images."""
        if indices.ndim != 3 or tuple(indices.shape[1:]) != self.latent_shape[1:]:
            raise ValueError(f"code indices must have shape (B, {self.latent_shape[1]}, "
                             f"{self.latent_shape[2]}), got {tuple(indices.shape)}")
        return self.decode(self.quantizer.lookup(indices))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> Reconstruction:
        self.check_images(x)
        q = self.quantizer(self.encoder(x))
        metrics = {"codebook_loss": q.codebook_loss, "commitment_loss": q.commitment_loss,
                   "usage": usage(q.counts), "perplexity": perplexity(q.counts)}
        return Reconstruction(self.decoder(q.z_q), q.loss, metrics, q)


# --- config --------------------------------------------------------------------------------------

@dataclass
class AutoencoderConfig(BatchConfig):
    """Fields shared by every autoencoder of the family; a method's ``Config`` extends it (and
    :class:`CodebookConfig` for a VQ model) and builds its network in :meth:`build_model`."""

    METHOD: ClassVar[str] = ""
    RESUMABLE: ClassVar[frozenset[str]] = BatchConfig.RESUMABLE | {"eval_samples"}

    dataset: str = "digits"
    """Training images: digits, mnist, fashion-mnist, or a path to an image folder or .npy file."""
    steps: int = 1000
    """Number of optimisation steps."""
    batch_size: int = 128
    """Images per optimisation step."""
    lr: float = 1e-3
    """Adam learning rate of the autoencoder."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 turns clipping off)."""
    width: int = 32
    """Channels of the first level of the encoder and the last of the decoder (doubled per
    downsampling)."""
    downsample: int = 2
    """Downsampling factor f (a power of 2): latents are H / f by W / f."""
    eval_samples: int = 64
    """Held-out images whose reconstructions the final evaluation scores (Frechet distance,
    precision/recall); 0 skips the evaluation."""

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "batch_size", "width", "downsample")
        if self.downsample > MAX_DOWNSAMPLE or self.downsample & (self.downsample - 1):
            raise ConfigError(f"--downsample must be a power of 2 up to {MAX_DOWNSAMPLE}, "
                              f"got {self.downsample}")
        if self.eval_samples and self.eval_samples < min_samples("image"):
            raise ConfigError(f"--eval-samples must be 0 or at least {min_samples('image')}, "
                              f"got {self.eval_samples}")

    def check_data(self) -> None:
        data = load_data(self)
        if self.batch_size > len(data.x_train):
            raise ConfigError(f"--batch-size {self.batch_size} exceeds the "
                              f"{len(data.x_train)} training images of {self.dataset}")

    def build_model(self, shape: tuple[int, int, int]) -> Autoencoder:
        raise NotImplementedError(f"{type(self).__qualname__} builds no model")

    def latent_size(self, shape: tuple[int, int, int]) -> tuple[int, int]:
        return shape[1] // self.downsample, shape[2] // self.downsample

    def build_critic(self, shape: tuple[int, int, int]) -> nn.Module | None:
        """A second network trained beside the autoencoder (VQGAN's discriminator), or None."""
        return None

    def loss(self, model: Autoencoder, x: torch.Tensor, out: Reconstruction, step: int,
             critic: nn.Module | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The autoencoder's loss L_rec + the model's terms, and the metrics to log."""
        rec = F.mse_loss(out.x_hat, x)
        loss = rec + out.loss
        return loss, {"loss": loss.detach(), "rec_mse": rec.detach(), **out.metrics}

    def critic_step(self, step: int) -> bool:
        """Whether the critic takes a step at ``step``."""
        return False

    def critic_loss(self, critic: nn.Module, x: torch.Tensor, x_hat: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError(f"{type(self).__qualname__} has no critic")

    def critic_optimizer(self, critic: nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError(f"{type(self).__qualname__} has no critic")


@dataclass
class CodebookConfig:
    """The codebook's fields, mixed into the ``Config`` of each VQ method (VQ-VAE, VQGAN)."""

    codebook_size: int = 64
    """K, the number of codes."""
    code_dim: int = 16
    """D, the dimension of a code (the latent channels)."""
    beta: float = BETA
    """Weight of the commitment loss ||z_e - sg[e]||^2."""
    codebook: Literal["ema", "loss"] = "ema"
    """How the codes learn: exponential moving averages of their encoder outputs (ema) or the
    codebook loss ||sg[z_e] - e||^2 (loss)."""
    decay: float = DECAY
    """Decay gamma of the EMA codebook."""
    ema_eps: float = EPS
    """Laplace smoothing eps of the EMA cluster sizes."""
    dead_window: int = 100
    """Reset a code no position chose for this many consecutive steps to a random encoder output
    of the batch (0 never resets)."""

    def check(self) -> None:
        super().check()  # type: ignore[misc]
        require_at_least(self, 1, "codebook_size", "code_dim")
        if not 0 < self.decay < 1:
            raise ConfigError(f"--decay must be in (0, 1), got {self.decay}")
        if self.ema_eps <= 0:
            raise ConfigError(f"--ema-eps must be positive, got {self.ema_eps}")
        if self.beta < 0:
            raise ConfigError(f"--beta must be non-negative, got {self.beta}")

    def build_model(self, shape: tuple[int, int, int]) -> VQModel:
        h, w = self.latent_size(shape)  # type: ignore[attr-defined]
        channels, width, f = shape[0], self.width, self.downsample  # type: ignore[attr-defined]
        quantizer = VectorQuantizer(self.codebook_size, self.code_dim, self.beta,
                                    ema=self.codebook == "ema", decay=self.decay,
                                    eps=self.ema_eps, dead_window=self.dead_window)
        return VQModel(shape, (self.code_dim, h, w), Encoder(channels, width, f, self.code_dim),
                       Decoder(channels, width, f, self.code_dim), quantizer)


# --- data ----------------------------------------------------------------------------------------

def load_data(cfg: AutoencoderConfig) -> Dataset:
    """The config's images, checked: values in [0, 1], sides divisible by ``--downsample``."""
    data = load_dataset(cfg.dataset)
    if data.kind != "image":
        raise ConfigError(f"{cfg.METHOD} encodes images; {cfg.dataset} holds points")
    if not (data.x_train.min() >= 0 and data.x_train.max() <= 1):
        raise DatasetError(f"{cfg.dataset}: image values must lie in [0, 1]")
    _, height, width = data.sample_shape
    if height % cfg.downsample or width % cfg.downsample:
        raise ConfigError(f"--downsample {cfg.downsample} does not divide the {height}x{width} "
                          f"images of {cfg.dataset}")
    return data


# --- training ------------------------------------------------------------------------------------

@torch.no_grad()
def reconstruct(model: Autoencoder, x: torch.Tensor) -> torch.Tensor:
    """Reconstructions of (N, C, H, W) images in eval mode, clipped to [0, 1], on the CPU; the
    model is put back in the mode it was in."""
    training, device = model.training, next(model.parameters()).device
    model.eval()
    out = torch.cat([model.decode(model.encode(x[i:i + EVAL_BATCH].to(device))).cpu()
                     for i in range(0, len(x), EVAL_BATCH)])
    model.train(training)
    return out.clamp(0, 1)


def train(cfg: AutoencoderConfig, run: Run | None = None, progress: bool | None = None) -> Run:
    """Train (or, given a run with a checkpoint, resume) any autoencoder of the family."""
    run = run or Run.create(cfg.METHOD, cfg)
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    generator = seed_everything(cfg.seed)
    model = cfg.build_model(data.sample_shape).to(device)
    critic = cfg.build_critic(data.sample_shape)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    precision = Precision(cfg.precision, device)
    objects = {"model": model, "optimizer": optimizer, "rng": generator, "precision": precision}
    if critic is not None:
        critic = critic.to(device)
        critic_optimizer = cfg.critic_optimizer(critic)
        critic_precision = Precision(cfg.precision, device)
        objects |= {"critic": critic, "critic_optimizer": critic_optimizer,
                    "critic_precision": critic_precision}
        compile_module(critic, cfg.compile)
    compile_module(model.encoder, cfg.compile)
    compile_module(model.decoder, cfg.compile)
    x_train, x_held = data.x_train.to(device), data.x_test[:EVAL_BATCH]
    batches = EpochBatches(len(x_train), cfg.batch_size, cfg.seed)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        x = x_train[distributed.shard(batches(step)).to(device)]
        with precision.autocast():
            out = model(x, generator)
            loss, metrics = cfg.loss(model, x, out, step, critic)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer, model.parameters(), cfg.grad_clip)
        if out.quantized is not None:
            metrics["restarted"] = torch.tensor(
                float(model.quantizer.restart_dead(out.quantized.z, generator)))
        if critic is not None and cfg.critic_step(step):
            with critic_precision.autocast():
                critic_loss, critic_metrics = cfg.critic_loss(critic, x, out.x_hat.detach())
            critic_optimizer.zero_grad(set_to_none=True)
            critic_precision.backward(critic_loss)
            critic_precision.step(critic_optimizer, critic.parameters(), cfg.grad_clip)
            metrics |= critic_metrics
        if step % cfg.log_every == 0 or step == cfg.steps:
            # Shown beside the training loss so overfitting is seen; never used to select.
            metrics["test_mse"] = F.mse_loss(reconstruct(model, x_held), x_held)
        return metrics

    fit(run, step_fn, total_steps=cfg.steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
        objects=objects, progress=progress)
    if not distributed.is_main():
        return run
    rows = [r for r in run.metrics if "test_mse" in r]
    names = ["rec_mse", "test_mse"] + (["usage", "perplexity"] if isinstance(model, VQModel)
                                       else [])
    run.save_figure(metric_curves(rows, names, title=f"{cfg.METHOD} on {cfg.dataset}"),
                    "loss.png")
    run.write_summary({"train/steps": cfg.steps, "train/rec_mse": run.last_row()["rec_mse"]})
    if cfg.eval_samples:
        evaluate(run, n=cfg.eval_samples, progress=progress)
    return run


# --- a trained run -------------------------------------------------------------------------------

def load_model(run: Run) -> tuple[AutoencoderConfig, Dataset, Autoencoder]:
    """The run's config, data and trained model (eval mode, on the run's device)."""
    cfg = run.load_config()
    if not isinstance(cfg, AutoencoderConfig):
        raise RunError(f"{run.dir} is a {run.method} run, not an autoencoder's")
    data = load_data(cfg)
    model = cfg.build_model(data.sample_shape)
    run.load_weights(model, "model")
    return cfg, data, model.to(resolve_device(cfg.device)).eval()


def load_autoencoder(run: Run) -> Autoencoder:
    """The trained autoencoder of an ``autoencoder``, ``vqvae`` or ``vqgan`` run, in eval mode
    on the run's device; a RunError for a run of another method."""
    return load_model(run)[2]


# --- an autoencoder as the first stage of a two-stage model -------------------------------------

FIRST_STAGE_DIR = "autoencoder"


def open_first_stage(directory: str | Path, dataset: str, methods: Sequence[str],
                     option: str) -> Run:
    """The finished run in ``directory`` of one of ``methods``, trained on ``dataset``: the first
    stage of a model of its latents (the VQ prior's codes, latent diffusion's latents)."""
    return open_stage(directory, option, methods, dataset, "this needs the latents of")


def train_first_stage(run: Run, stage_cfg: AutoencoderConfig, module: ModuleType,
                      progress: bool | None = None) -> Run:
    """The autoencoder ``stage_cfg`` trained (or resumed, or found finished) in the folder
    ``<run>/autoencoder/`` nested inside a second stage's run."""
    return train_stage(run.path(FIRST_STAGE_DIR), stage_cfg, module, progress)


def held_out_images(data: Dataset, n: int, seed: int) -> torch.Tensor:
    """n held-out images in an order drawn with ``seed``; a ConfigError if there are fewer."""
    if n > len(data.x_test):
        raise ConfigError(f"--n {n}: {data.name} has only {len(data.x_test)} held-out images")
    index = torch.randperm(len(data.x_test), generator=torch.Generator().manual_seed(seed))
    return data.x_test[index[:n]]


def sample(run: Run, n: int = 64, seed: int = 0, progress: bool | None = None) -> torch.Tensor:
    """Reconstructions (N, C, H, W) in [0, 1] of n held-out images drawn with ``seed``: a VQ model
    alone has no prior over its codes (``vq_transformer`` learns one and samples codes)."""
    _, data, model = load_model(run)
    return reconstruct(model, held_out_images(data, n, seed))


def reconstructions_figure(x: torch.Tensor, x_hat: torch.Tensor, title: str):
    """Originals (left) beside their reconstructions (right), 8 to a row."""
    import matplotlib.pyplot as plt

    rows = math.ceil(len(x) / 8)
    fig, axes = plt.subplots(1, 2, figsize=(8, max(2.0, 0.5 * rows * x.shape[-2] / 8)))
    for ax, images, name in zip(axes, (x, x_hat), ("held-out images", "reconstructions"),
                                strict=True):
        show_images(ax, images, 8)
        ax.set_title(name)
    fig.suptitle(title)
    return fig


def codebook_figure(counts: torch.Tensor, title: str):
    """Bars of the held-out code counts, codes sorted from most to least used."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(range(len(counts)), counts.sort(descending=True).values.numpy(), width=1.0)
    ax.set_xlabel("code (sorted by use)")
    ax.set_ylabel("held-out positions")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def psnr(mse: float) -> float:
    """10 log10(1 / MSE) in dB, for pixels in [0, 1]."""
    return 10 * math.log10(1 / mse) if mse > 0 else math.inf


def evaluate(run: Run, n: int | None = None, seed: int = 0,
             progress: bool | None = None) -> dict:
    """Score the reconstructions of the whole held-out split and of n held-out images (None: the
    run's ``eval_samples``; see the module docstring), write ``reconstructions.png`` (and
    ``codebook.png`` for a VQ model); the metrics go to summary.json as ``eval/<name>``, the
    mean-image baseline's as ``baseline/<name>``."""
    cfg, data, model = load_model(run)
    n = cfg.eval_samples if n is None else n
    if n and n < min_samples("image"):
        raise ConfigError(f"--n must be 0 or at least {min_samples('image')}, got {n}")
    x = data.x_test
    mse = float(F.mse_loss(reconstruct(model, x), x))
    metrics: dict = {"test_mse": mse, "test_psnr": psnr(mse), "test_examples": len(x)}
    device = next(model.parameters()).device
    with torch.no_grad():
        z = torch.cat([model.encode(x[i:i + EVAL_BATCH].to(device)).cpu()
                       for i in range(0, len(x), EVAL_BATCH)])
    metrics["latent_std"] = float(z.std())
    metrics["scaling_factor"] = 1 / metrics["latent_std"]
    if isinstance(model, VQModel):
        with torch.no_grad():
            indices = torch.cat([model.encode_indices(x[i:i + EVAL_BATCH].to(device)).cpu()
                                 for i in range(0, len(x), EVAL_BATCH)])
        counts = code_counts(indices, model.codebook_size)
        metrics["test_code_usage"] = float(usage(counts))
        metrics["test_perplexity"] = float(perplexity(counts))
        run.save_figure(codebook_figure(counts, f"{cfg.METHOD}: held-out use of the "
                                                f"{model.codebook_size} codes"), "codebook.png")
    if n:
        originals = held_out_images(data, n, seed)
        x_hat = reconstruct(model, originals)
        metrics.update(score_samples(x_hat, data))
        # The originals' own scores: the floor n images can reach against the split they are from.
        metrics.update({f"originals_{k}": v for k, v in score_samples(originals, data).items()
                        if k in ("frechet_distance", "precision", "recall")})
        run.save_figure(reconstructions_figure(originals[:64], x_hat[:64],
                                               f"{cfg.METHOD} on {cfg.dataset}"),
                        "reconstructions.png")
    run.write_evaluation(metrics)
    baseline = float(F.mse_loss(data.x_train.mean(0).expand_as(x), x))
    run.write_evaluation({"test_mse": baseline, "test_psnr": psnr(baseline),
                          "model": "the mean training image"}, prefix="baseline")
    return {**metrics, "baseline_test_mse": baseline}
