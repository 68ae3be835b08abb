"""SimCLR (Chen et al. 2020): learn an image encoder by matching two random views of each image.

Each image x of a batch of N is augmented twice by transformations t, t' ~ T drawn
independently, x~_i = t(x), x~_j = t'(x). The base encoder f and the projection head g give

    h_i = f(x~_i),   z_i = g(h_i) = W2 ReLU(W1 h_i),

and the NT-Xent loss scores each view against the 2N - 1 others, its partner being the positive,

    l(i, j) = -log exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau),
    L = 1 / (2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)],   sim(u, v) = u . v / (|u| |v|).

T (the paper's section 3) is a random resized crop (area share s ~ U(crop_scale, 1), aspect
ratio r ~ log-U(3/4, 4/3)) with a horizontal flip, then with probability 0.8 a colour jitter of
strength s_c (brightness, contrast and saturation factors in 1 +- 0.8 s_c, hue shifted by up to
0.2 s_c of a turn), then grayscale with probability 0.2. One-channel digits are not mirror
images of themselves, so they get a small rotation and pixel noise instead of the flip and the
colours. Every view of a batch is one ``affine_grid`` + ``grid_sample`` call whose per-image
parameters come from the run's generator, so runs are deterministic and resume exactly.

Data-parallel, each of W ranks augments and encodes n = N / W images of the global batch. Its
augmentations draw the parameters of the whole batch's views and keep its rows
(``random=mlatlas.core.distributed``), so the generator, and every view, are those of a
one-process run; the loss is NT-Xent over all 2N views (``mlatlas.contrastive.distributed``: rank
r's 2n views against the all-gathered 2N, whose mean over ranks is the one-process loss). Neither
f nor g has batch normalisation, so nothing else couples the images of a batch.

The representation kept is h (f's output), not z: the paper finds a linear classifier on h
far better than on z, since g learns to discard what the augmentations change. ``summary.json``
holds the linear-probe accuracy of h and of z (``eval/``) and the same probes of the model at its
initialisation (``baseline/``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mlatlas.contrastive.common import (
    ContrastiveConfig,
    encode_batched,
    held_out_data,
    optimizer_step,
    train_scores,
    write_scores,
)
from mlatlas.contrastive.data import CaptionedData, load_captioned
from mlatlas.contrastive.distributed import nt_xent_distributed
from mlatlas.contrastive.evaluation import PROBE_TRAIN
from mlatlas.contrastive.towers import image_tower
from mlatlas.core import distributed
from mlatlas.core.config import ConfigError, require_at_least, require_unit
from mlatlas.core.optim import set_lr, warmup_cosine_lr
from mlatlas.core.plots import image_grid, metric_curves
from mlatlas.core.precision import Precision, compile_module
from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import resolve_device, seed_everything
from mlatlas.data import EpochBatches
from mlatlas.eval.metrics import linear_probe_accuracy

# ITU-R BT.601 luma, as torchvision's grayscale.
LUMA = (0.299, 0.587, 0.114)


@dataclass
class Config(ContrastiveConfig):
    METHOD: ClassVar[str] = "simclr"

    projection_dim: int = 64
    """Dimension of z = g(h), where the loss is computed."""
    temperature: float = 0.5
    """NT-Xent temperature tau."""
    crop_scale: float = 0.3
    """Smallest area share of the random resized crop."""
    jitter: float = 0.5
    """Colour-jitter strength s (brightness, contrast, saturation 0.8 s; hue 0.2 s)."""
    grayscale: float = 0.2
    """Probability that an RGB view is turned to grayscale."""
    rotation: float = 15.0
    """Largest rotation (degrees) of one-channel views (RGB views are flipped instead)."""
    noise: float = 0.05
    """Standard deviation of the pixel noise added to one-channel views."""
    steps: int = 1000

    def check(self) -> None:
        super().check()
        require_at_least(self, 8, "projection_dim")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be positive, got {self.temperature}")
        require_unit(self, "crop_scale", low_open=True)
        require_unit(self, "grayscale")
        if self.jitter < 0 or self.rotation < 0 or self.noise < 0:
            raise ConfigError("--jitter, --rotation and --noise must be non-negative")


# --- augmentations ------------------------------------------------------------------------------

# Every draw below is ``random.rand`` or ``random.randn`` of ``generator``, ``random`` being
# ``torch`` (the draws of this batch) or ``mlatlas.core.distributed`` (this rank's rows of the
# draws of the global batch, in a data-parallel job).

def _uniform(n: int, low: float, high: float, generator: torch.Generator,
             random: ModuleType) -> torch.Tensor:
    return low + (high - low) * random.rand((n,), generator=generator)


def crop_affine(n: int, crop_scale: float, flip: bool, rotation: float,
                generator: torch.Generator, random: ModuleType = torch) -> torch.Tensor:
    """(n, 2, 3) matrices for ``F.affine_grid``: a random resized crop (area share
    s ~ U(crop_scale, 1), aspect r ~ log-U(3/4, 4/3)), mirrored with probability 1/2 if ``flip``,
    rotated by up to ``rotation`` degrees. They map output coordinates in [-1, 1] to input ones."""
    s = _uniform(n, crop_scale, 1.0, generator, random)
    log_r = _uniform(n, math.log(3 / 4), math.log(4 / 3), generator, random)
    # Crop sides as shares of the image side; clamped so that the crop stays inside the image.
    w = (s * log_r.exp()).sqrt().clamp(max=1.0)
    h = (s / log_r.exp()).sqrt().clamp(max=1.0)
    cx = (1 - w) * _uniform(n, -1.0, 1.0, generator, random)
    cy = (1 - h) * _uniform(n, -1.0, 1.0, generator, random)
    mirror = random.rand((n,), generator=generator) < 0.5
    sx = torch.where(mirror & flip, -w, w)
    angle = torch.deg2rad(_uniform(n, -rotation, rotation, generator, random))
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([torch.stack([cos * sx, -sin * h, cx], 1),
                        torch.stack([sin * sx, cos * h, cy], 1)], 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    luma = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * luma).sum(1, keepdim=True)


def _rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Shift each image's hue by ``turns`` of a full turn: a rotation of the chroma plane of
    YIQ, which keeps the luma Y (a linear stand-in for HSV's hue shift)."""
    rgb_to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                               [0.211, -0.523, 0.312]], dtype=x.dtype, device=x.device)
    theta = 2 * math.pi * turns
    cos, sin, one, zero = theta.cos(), theta.sin(), torch.ones_like(theta), torch.zeros_like(theta)
    rotation = torch.stack([torch.stack([one, zero, zero], 1), torch.stack([zero, cos, -sin], 1),
                            torch.stack([zero, sin, cos], 1)], 1)
    m = torch.linalg.inv(rgb_to_yiq) @ rotation @ rgb_to_yiq
    return torch.einsum("nij,njhw->nihw", m, x)


def colour_jitter(x: torch.Tensor, strength: float, generator: torch.Generator,
                  p: float = 0.8, random: ModuleType = torch) -> torch.Tensor:
    """SimCLR's colour distortion, applied to each image with probability ``p``: brightness,
    contrast and saturation factors ~ U(1 - 0.8 s, 1 + 0.8 s) and a hue shift ~ U(-0.2 s, 0.2 s)
    turns (the last two only for RGB), clamped to [0, 1] after each."""
    n, c = x.shape[:2]
    spread = 0.8 * strength
    brightness, contrast, saturation = (
        _uniform(n, max(0.0, 1 - spread), 1 + spread, generator, random).view(n, 1, 1, 1).to(x)
        for _ in range(3))
    hue = _uniform(n, -0.2 * strength, 0.2 * strength, generator, random).to(x)
    apply = (random.rand((n,), generator=generator) < p).view(n, 1, 1, 1).to(x.device)
    y = (x * brightness).clamp(0, 1)
    mean = (_gray(y) if c == 3 else y).mean((1, 2, 3), keepdim=True)
    y = ((y - mean) * contrast + mean).clamp(0, 1)
    if c == 3:
        gray = _gray(y)
        y = ((y - gray) * saturation + gray).clamp(0, 1)
        y = _rotate_hue(y, hue).clamp(0, 1)
    return torch.where(apply, y, x)


def augment(x: torch.Tensor, generator: torch.Generator, *, crop_scale: float = 0.3,
            jitter: float = 0.5, grayscale: float = 0.2, rotation: float = 15.0,
            noise: float = 0.05, random: ModuleType = torch) -> torch.Tensor:
    """One random view t(x) of every image of a (N, C, H, W) batch in [0, 1], all drawn from
    ``generator`` (on the CPU, whatever the images' device): crop + flip + colour jitter +
    grayscale for RGB, crop + rotation + brightness/contrast + noise for one channel. With
    ``random=mlatlas.core.distributed``, ``x`` is this rank's rows of the global batch and the
    views are the ones the global batch's draws give them."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"augment needs (N, 1 or 3, H, W) images, got {tuple(x.shape)}")
    n, c = x.shape[:2]
    rgb = c == 3
    theta = crop_affine(n, crop_scale, flip=rgb, rotation=0.0 if rgb else rotation,
                        generator=generator, random=random).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    view = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    view = colour_jitter(view, jitter, generator, random=random)
    if rgb:
        to_gray = (random.rand((n,), generator=generator) < grayscale).view(n, 1, 1, 1)
        view = torch.where(to_gray.to(x.device), _gray(view).expand_as(view), view)
    else:
        view = (view + noise * random.randn(view.shape, generator=generator).to(x)).clamp(0, 1)
    return view


def views(cfg: Config, x: torch.Tensor, generator: torch.Generator,
          random: ModuleType = torch) -> torch.Tensor:
    return augment(x, generator, crop_scale=cfg.crop_scale, jitter=cfg.jitter,
                   grayscale=cfg.grayscale, rotation=cfg.rotation, noise=cfg.noise,
                   random=random)


# --- model ----------------------------------------------------------------------------------

class SimCLR(nn.Module):
    """Base encoder f (an image tower) and projection head g (a one-hidden-layer MLP)."""

    def __init__(self, encoder: nn.Module, projection_dim: int):
        super().__init__()
        self.encoder = encoder
        width = encoder.width
        self.projection = nn.Sequential(nn.Linear(width, width), nn.ReLU(),
                                        nn.Linear(width, projection_dim))

    def forward(self, x_i: torch.Tensor, x_j: torch.Tensor, temperature: float) -> torch.Tensor:
        """NT-Xent of the projections of two views of the same images (this rank's L_r against
        the global batch's views; in float32 whatever autocast the networks ran under)."""
        z = self.projection(self.encoder(torch.cat([x_i, x_j])))
        z_i, z_j = z.chunk(2)
        with torch.autocast(z.device.type, enabled=False):
            return nt_xent_distributed(z_i.float(), z_j.float(), temperature)


def build_model(cfg: Config, image_shape: tuple[int, int, int]) -> SimCLR:
    channels, size, _ = image_shape
    return SimCLR(image_tower(cfg.image_tower, channels, size, cfg.width, cfg.cnn_stages),
                  cfg.projection_dim)


def load_data(cfg: Config) -> CaptionedData:
    return load_captioned(cfg.dataset, n_train=cfg.n_train, seed=cfg.seed)


def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    run = run or Run.create(cfg.METHOD, cfg)
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    generator = seed_everything(cfg.seed)
    model = build_model(cfg, data.image_shape).to(device)
    for network in (model.encoder, model.projection):
        compile_module(network, cfg.compile)
    precision = Precision(cfg.precision, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    images = data.train.images.to(device)
    batches = EpochBatches(len(images), cfg.batch_size, cfg.seed)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        set_lr(optimizer, warmup_cosine_lr(cfg.lr, step, cfg.steps, cfg.warmup_steps))
        x = images[distributed.shard(batches(step)).to(device)]
        x_i = views(cfg, x, generator, random=distributed)
        x_j = views(cfg, x, generator, random=distributed)
        with precision.autocast():
            loss = model(x_i, x_j, cfg.temperature)
        optimizer_step(optimizer, loss, cfg.grad_clip, precision)
        return {"loss": loss.detach()}

    fit(run, step_fn, total_steps=cfg.steps, objects={"model": model, "optimizer": optimizer,
                                                       "rng": generator, "precision": precision},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress)
    if not distributed.is_main():
        return run  # the figures and the evaluation are rank 0's
    run.save_figure(metric_curves(run.metrics, ["loss"], title="simclr NT-Xent loss"), "loss.png")
    report(run, cfg, model.cpu(), data)
    return run


def probe(encode, data: CaptionedData) -> float:
    """Linear-probe test accuracy of frozen features ``encode(images)`` on the class labels
    (trained on the first ``PROBE_TRAIN`` training images, scored on ``data.test``)."""
    train = data.train.images[:PROBE_TRAIN]
    return linear_probe_accuracy(encode_batched(encode, train), data.train.labels[:PROBE_TRAIN],
                                 encode_batched(encode, data.test.images), data.test.labels)


def probes(model: SimCLR, data: CaptionedData) -> dict[str, float]:
    """Linear probes of h = f(x) and of z = g(f(x))."""
    return {"linear_probe_accuracy": probe(model.encoder, data),
            "projection_probe_accuracy": probe(lambda x: model.projection(model.encoder(x)),
                                               data)}


def report(run: Run, cfg: Config, model: SimCLR, data: CaptionedData, n: int | None = None,
           seed: int = 0) -> dict[str, float]:
    """Probe h and z of the trained model (``eval/``) and of the same model at initialisation
    (``baseline/``) on ``n`` held-out test images drawn with ``seed`` (see :func:`evaluate`);
    write ``summary.json`` and ``views.png``; return the trained model's scores."""
    model.eval()
    held = held_out_data(data, n, seed)
    seed_everything(cfg.seed)
    # The model as the run started: the same seed builds the same initial weights.
    initial = build_model(cfg, data.image_shape).eval()
    scores = probes(model, held)
    write_scores(run, train_scores(run, data.name),
                 {**scores, "examples": len(held.test), "seed": seed}, probes(initial, held))
    run.save_figure(views_figure(cfg, held.test.images[:8], seed), "views.png")
    model.train()
    return scores


def views_figure(cfg: Config, images: torch.Tensor, seed: int = 0):
    """The images (top row) and two random views of each (rows 2 and 3)."""
    generator = torch.Generator().manual_seed(seed)
    rows = [images, views(cfg, images, generator), views(cfg, images, generator)]
    return image_grid(torch.cat(rows), ncols=len(images),
                      title="simclr: images (top) and two augmented views")


def load_model(run: Run) -> tuple[Config, SimCLR, CaptionedData]:
    cfg = run.load_config(Config)
    data = load_data(cfg)
    model = build_model(cfg, data.image_shape)
    run.load_weights(model)
    return cfg, model.eval(), data


def load_encoder(run: Run) -> tuple[Config, nn.Module]:
    """The trained base encoder f of a SimCLR run (what LiT locks as its image tower)."""
    cfg = run.load_config(Config)
    data = load_data(cfg)
    encoder = build_model(cfg, data.image_shape).encoder
    run.load_weights(encoder, name="model.encoder")
    return cfg, encoder.eval()


def evaluate(run: Run, n: int | None = None, seed: int = 0,
             progress: bool | None = None) -> dict[str, float]:
    """Linear-probe test accuracy of h (``linear_probe_accuracy``) and of z
    (``projection_probe_accuracy``) from the run's checkpoint, on ``n`` held-out test images
    (None: all of them); the same probes of the model at its initialisation (rebuilt from the
    run's seed) go to ``summary.json`` as ``baseline/``. ``seed`` draws which ``n`` test images
    (with all of them, nothing is drawn) and the augmentations shown in ``views.png``; the
    probes (L-BFGS from zero on a convex loss, on the first 5,000 training images) and the
    encoders are deterministic. Returns the trained model's scores (``eval/`` in the summary)."""
    cfg, model, data = load_model(run)
    return report(run, cfg, model, data, n, seed)
