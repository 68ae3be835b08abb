r"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"): a frozen latent diffusion model steered by a spatial control image c (edges, a mask,
a skeleton) through a trainable copy of its UNet's encoder.

With F(x; Theta) a block of the frozen base, Z a 1x1 convolution whose weights and bias start
at zero, and Theta_c a trainable copy of Theta (eq. 2 of the paper):

    y_c = F(x; Theta) + Z(F(x + Z(c; Theta_z1); Theta_c); Theta_z2).

Here the copy is the base UNet's whole encoder (its down path, middle block, time embedding and
cross-attention, initialised from the base's weights). The control image is encoded to the
latent resolution by a small convolutional net H whose last convolution is zero, c_f = H(c),
and added after the copy's stem. The copy's feature at every skip connection k and at the
middle block passes a zero convolution and is added to the base's:

    skip_k <- skip_k + s * keep_i * Z_k(h_k^copy),   middle <- middle + s * keep_i * Z_m(h_m^copy),

s the control scale (``--control-scale``) and keep_i the guidance window of diffusers' pipelines
at sampler step i of N: keep_i = 1 unless i / N < start or (i + 1) / N > end
(``--control-start``, ``--control-end``). At initialisation every Z is zero, so the controlled
model is the base model exactly, and yet dL/dW_Z = dL/dy h^T is not zero, so training starts
moving Z at once. Training minimises the base's own diffusion loss with the base frozen; only
H, the copy and the Z learn. The condition (caption or label) is dropped to the null one with
probability ``label_dropout``, as ControlNet drops 50% of its prompts, so the control alone
must carry the layout.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from mlatlas.core import distributed
from mlatlas.core.config import (
    BatchConfig,
    ConfigError,
    require_at_least,
    require_unit,
)
from mlatlas.core.plots import plt, show_images
from mlatlas.core.precision import Precision
from mlatlas.core.run import Run, fit, open_stage, prefixed, train_stage
from mlatlas.core.runtime import seed_everything
from mlatlas.data import Dataset, EpochBatches, load_dataset
from mlatlas.data.control import control_image, mask_iou, shape_mask
from mlatlas.eval.samples import min_samples, score_samples
from mlatlas.generative.diffusion import latent
from mlatlas.generative.diffusion.guidance import classifier_free
from mlatlas.generative.diffusion.loop import optimise
from mlatlas.nn.unet import Residuals, UNet

BASE_DIR = "base"


# --- the maths -----------------------------------------------------------------------------------

def zero_conv(channels: int) -> nn.Conv2d:
    """Z: a 1x1 convolution with weights and bias zero."""
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def control_keep(steps: int, start: float, end: float) -> torch.Tensor:
    """keep_i for the sampler steps i = 0..steps-1: 1 unless i / N < start or (i + 1) / N > end
    (diffusers' ``controlnet_keep``)."""
    i = torch.arange(steps, dtype=torch.float64)
    return 1.0 - ((i / steps < start) | ((i + 1) / steps > end)).double()


class HintEncoder(nn.Module):
    """H: the control image (B, c, H, W) to (B, base, H / f, W / f), f a power of 2, through
    conv-SiLU blocks halving the side f times; the last convolution is zero."""

    def __init__(self, in_channels: int, out_channels: int, factor: int, width: int = 16):
        super().__init__()
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"the control's downsampling factor must be a power of 2, got "
                             f"{factor}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU()]
        for _ in range(int(math.log2(factor))):
            layers += [nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU()]
        last = nn.Conv2d(width, out_channels, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)
        self.factor = factor

    def forward(self, control: torch.Tensor) -> torch.Tensor:
        return self.net(control)


class ControlNet(nn.Module):
    """The trainable copy of ``base``'s encoder, the hint encoder H and the zero convolutions;
    ``forward`` gives the residuals for the base's skips and middle block."""

    def __init__(self, base: UNet, control_channels: int, factor: int):
        super().__init__()
        self.copy = copy.deepcopy(base).requires_grad_(True)
        # Only the encoder is copied: the base's decoder consumes the residuals.
        self.copy.up, self.copy.upsample, self.copy.out = nn.ModuleList(), nn.ModuleList(), None
        if base.context_dim:
            self.copy.up_cross = nn.ModuleList()
        self.hint = HintEncoder(control_channels, base.base, factor)
        self.zero_skips = nn.ModuleList(zero_conv(w) for w in base.widths)
        self.zero_middle = zero_conv(base.widths[-1])
        self.control_channels = control_channels

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None,
                control: torch.Tensor) -> Residuals:
        emb = self.copy.embed(t, None, len(x), x.device)
        h, skips = self.copy.encode(x, emb, context, hint=self.hint(control))
        return Residuals([z(s) for z, s in zip(self.zero_skips, skips, strict=True)],
                         self.zero_middle(h))


def controlled_output(base: latent.LatentDenoiser, controlnet: ControlNet, x: torch.Tensor,
                      t: torch.Tensor, y: torch.Tensor | None, control: torch.Tensor,
                      scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """eps of the base with the ControlNet's residuals times ``scale`` added; a ``control`` of
    fewer rows than x (a guided batch of conditional and null rows) is repeated to fit."""
    if len(x) != len(control):
        if len(x) % len(control):
            raise ValueError(f"{len(control)} control images for a batch of {len(x)}")
        control = control.repeat(len(x) // len(control), 1, 1, 1)
    context = base.context(y, len(x), x.device)
    unet = base.unet
    emb = unet.embed(t, None, len(x), x.device)
    h, skips = unet.encode(x, emb, context)
    residuals = controlnet(x, t, context, control).scaled(scale)
    return unet.decode(h, skips, emb, context, residuals)


class Controlled:
    """The controlled denoiser with its control images bound, called as every network of the
    framework, ``net(x, t, y)``; the scale follows the guidance window: the step of a call is
    the sampler step whose network time is nearest ``t``."""

    def __init__(self, base: latent.LatentDenoiser, controlnet: ControlNet,
                 control: torch.Tensor, scale: float = 1.0,
                 window: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.base, self.controlnet, self.control = base, controlnet, control
        self.scale, self.window = scale, window

    def null_condition(self, y: torch.Tensor) -> torch.Tensor:
        return self.base.null_condition(y)

    def step_scale(self, t: torch.Tensor) -> float:
        if self.window is None:
            return self.scale
        times, keep = self.window
        return self.scale * float(keep[(times - float(t[0])).abs().argmin()])

    def __call__(self, x: torch.Tensor, t: torch.Tensor,
                 y: torch.Tensor | None = None) -> torch.Tensor:
        scale = self.step_scale(t)
        if scale == 0:  # outside the window the base alone runs: no ControlNet pass to pay
            return self.base(x, t, y)
        return controlled_output(self.base, self.controlnet, x, t, y, self.control, scale)


def network_times(formulation, steps: int, sampler: str) -> torch.Tensor:
    """The network's time input at each sampler step's noise level (VP: t(sigma))."""
    sigmas = formulation.sigmas(steps, sampler)[:steps]
    return torch.tensor([formulation.schedule.sigma_to_t(float(s)) for s in sigmas])


# --- config --------------------------------------------------------------------------------------

@dataclass
class Config(BatchConfig):
    """A ControlNet on a frozen latent diffusion run."""

    METHOD: ClassVar[str] = "controlnet"
    RESUMABLE: ClassVar[frozenset[str]] = BatchConfig.RESUMABLE | {"eval_samples"}

    base_run: str = ""
    """A finished latent_diffusion run to control; empty: train one first, in <run>/base/."""
    dataset: str = "shapes"
    """Training images (the base run's dataset); their control images are computed from them."""
    base_steps: int = 2000
    """Steps of the base trained when no --base-run is given (its autoencoder: its default)."""
    control: Literal["mask", "canny", "sobel", "skeleton"] = "mask"
    """The control image computed from each training image: the shapes' mask, Canny or Sobel
    edges, or the skeleton of the strokes (digits)."""
    steps: int = 2000
    """Optimisation steps of the ControlNet."""
    batch_size: int = 128
    """Images per optimisation step."""
    lr: float = 1e-3
    """Adam learning rate after warm-up."""
    warmup_steps: int = 100
    """Linear learning-rate warm-up from 0."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    ema_decay: float = 0.995
    """Decay of the exponential moving average of the ControlNet's weights used for sampling."""
    label_dropout: float = 0.5
    """The share of examples trained with the null caption or label, so the control alone must
    carry the layout (ControlNet drops half its prompts)."""
    eval_samples: int = 200
    """Samples drawn at the end of training for the figures and metrics (0 skips)."""

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "batch_size", "base_steps")
        require_unit(self, "label_dropout")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"--ema-decay must lie in [0, 1), got {self.ema_decay}")
        if self.grad_clip < 0:
            raise ConfigError(f"--grad-clip cannot be negative, got {self.grad_clip}")
        if self.eval_samples and self.eval_samples < min_samples("image"):
            raise ConfigError(f"--eval-samples must be 0 or at least {min_samples('image')}, "
                              f"got {self.eval_samples}")

    def check_data(self) -> None:
        data = load_dataset(self.dataset)
        if data.kind != "image":
            raise ConfigError(f"--dataset {self.dataset} holds points; ControlNet steers "
                              "images")
        if self.base_run:
            open_base_run(self.base_run, self.dataset)


# --- the base ------------------------------------------------------------------------------------

def open_base_run(directory: str | Path, dataset: str) -> Run:
    return open_stage(directory, "--base-run", (latent.Config.METHOD,), dataset,
                      "ControlNet steers")


def base_run(run: Run, cfg: Config, progress: bool | None = None) -> Run:
    """The base's run: ``base_run``, or ``<run>/base/`` trained (or resumed) here."""
    if cfg.base_run:
        return open_base_run(cfg.base_run, cfg.dataset)
    base_cfg = latent.Config(dataset=cfg.dataset, seed=cfg.seed, device=cfg.device,
                             steps=cfg.base_steps, log_every=cfg.log_every,
                             ckpt_every=cfg.ckpt_every, precision=cfg.precision,
                             compile=cfg.compile, eval_samples=0)
    return train_stage(run.path(BASE_DIR), base_cfg, latent, progress)


def open_base(run: Run, cfg: Config) -> Run:
    return open_base_run(cfg.base_run, cfg.dataset) if cfg.base_run else \
        Run.open(run.path(BASE_DIR))


def build_controlnet(trained: latent.Trained, image_shape: tuple[int, ...]) -> ControlNet:
    factor = image_shape[-1] // trained.ae.latent_shape[-1]
    return ControlNet(trained.model.unet, 1, factor)


# --- training ------------------------------------------------------------------------------------

def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    """Train (or resume) the base if needed, then the ControlNet on the base's frozen model."""
    run = run or Run.create(cfg.METHOD, cfg)
    base = latent.load_model(base_run(run, cfg, progress))
    base.model.requires_grad_(False)
    data, device = base.data, base.device
    z_train = latent.encode_images(base.ae, data.x_train) * base.model.latent_scale
    controls = control_image(cfg.control, data.x_train).to(device)
    conditions = latent.train_conditions(base.cfg, data, base.tokenizer)
    conditions = conditions.to(device) if conditions is not None else None
    formulation = base.cfg.formulation()
    generator = seed_everything(cfg.seed)
    controlnet = build_controlnet(base, data.sample_shape).to(device)
    ema = copy.deepcopy(controlnet).requires_grad_(False)
    optimizer = torch.optim.Adam(controlnet.parameters(), lr=cfg.lr)
    precision = Precision(cfg.precision, device)
    batches = EpochBatches(len(z_train), cfg.batch_size, cfg.seed)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        index = distributed.shard(batches(step)).to(device)
        y = latent.dropped(base.model.condition, conditions, index, cfg.label_dropout,
                           generator)
        control = controls[index]

        def net(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
            return controlled_output(base.model, controlnet, x, t, y, control)

        with precision.autocast():
            loss = formulation.loss(net, z_train[index], y, generator)
        optimise(cfg, controlnet, ema, optimizer, loss, step, precision)
        return {"loss": loss.detach()}

    fit(run, step_fn, total_steps=cfg.steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
        objects={"model": controlnet, "ema": ema, "optimizer": optimizer, "rng": generator,
                 "precision": precision}, progress=progress)
    if not distributed.is_main():
        return run
    latent.write_training_summary(run, cfg)
    if cfg.eval_samples:
        evaluate(run, n=cfg.eval_samples, progress=progress)
    return run


# --- a trained run -------------------------------------------------------------------------------

@dataclass
class Trained:
    cfg: Config
    base: latent.Trained
    controlnet: ControlNet


def load_model(run: Run) -> Trained:
    cfg = run.load_config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"{run.dir} is a {run.method} run, not a controlnet run")
    base = latent.load_model(open_base(run, cfg))
    controlnet = build_controlnet(base, base.data.sample_shape)
    run.load_weights(controlnet, "ema")
    return Trained(cfg, base, controlnet.to(base.device).eval())


@dataclass
class SampleOptions(latent.SampleOptions):
    """How to sample a ControlNet run; zeros and empty strings take the run's settings."""

    control: str = ""
    """An image file (png/jpg) or .npy whose control is computed as the run's (--control of
    training) and used for every sample; empty: the controls of held-out images in turn."""
    control_scale: float = 1.0
    """s: the ControlNet's residuals are multiplied by it (0: the base model alone)."""
    control_start: float = 0.0
    """Share of the sampler's steps, from the start, before the control applies."""
    control_end: float = 1.0
    """Share of the sampler's steps after which the control stops applying."""

    def check_window(self) -> None:
        if not 0 <= self.control_start < self.control_end <= 1:
            raise ConfigError(f"need 0 <= --control-start < --control-end <= 1, got "
                              f"{self.control_start}, {self.control_end}")
        if self.control_scale < 0:
            raise ConfigError(f"--control-scale cannot be negative, got {self.control_scale}")


def read_control_source(path: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The image ``--control`` names, as (1, C, H, W) in [0, 1]: a png/jpg or a .npy of one
    image; a ConfigError when it is missing or not of the run's image size."""
    import numpy as np

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--control: no such file: {file}")
    if file.suffix == ".npy":
        array = np.load(file, allow_pickle=False).astype(np.float32)
        array = array / 255.0 if array.max() > 1 else array
    else:
        from PIL import Image

        try:
            image = Image.open(file)
            image = image.convert("L" if shape[0] == 1 else "RGB")
        except OSError as err:
            raise ConfigError(f"--control: {file} is not a readable image ({err})") from None
        array = np.asarray(image, dtype=np.float32) / 255.0
    x = torch.from_numpy(np.ascontiguousarray(array))
    if x.ndim == 2:
        x = x[None].expand(shape[0], -1, -1) if shape[0] in (1, 3) else x[None]
    elif x.ndim == 3 and x.shape[-1] in (1, 3) and x.shape[0] not in (1, 3):
        x = x.permute(2, 0, 1)
    if tuple(x.shape) != tuple(shape):
        raise ConfigError(f"--control: {file} is {'x'.join(map(str, x.shape))}; this run's "
                          f"images are {'x'.join(map(str, shape))} (channels x height x width)")
    return x[None].contiguous()


def sample_controls(kind: str, data: Dataset, n: int, path: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``kind`` controls of n samples and the images they were computed from: those of the
    image at ``path`` (``--control``) for all, or of the first held-out images in turn."""
    if path:
        source = read_control_source(path, data.sample_shape).expand(n, -1, -1, -1)
    else:
        source = data.x_test[torch.arange(n) % len(data.x_test)]
    return control_image(kind, source), source


def draw(trained: Trained, n: int, seed: int, options: SampleOptions,
         progress: bool | None = None, conditions: torch.Tensor | None = None,
         controls: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """n images for ``conditions`` (default: the options') under ``controls`` (default: the
    options'), at control scale ``scale`` (default: the options')."""
    base = trained.base
    y = conditions if conditions is not None else latent.sample_conditions(base, n, options)[0]
    if controls is None:
        controls = sample_controls(trained.cfg.control, base.data, n, options.control)[0]
    formulation = base.cfg.formulation()
    keep = control_keep(options.steps, options.control_start, options.control_end)
    window = (network_times(formulation, options.steps, options.sampler), keep)
    net = Controlled(base.model, trained.controlnet, controls.to(base.device),
                     options.control_scale if scale is None else scale, window)
    if y is not None:
        y = y.to(base.device)
    guided = classifier_free(net, y, options.guidance)
    x = latent.generate(formulation, guided, base.ae, float(base.model.latent_scale), n,
                        options, seed, base.device, progress)
    return x.cpu().clamp(0, 1)


def resolve(trained: Trained, options: SampleOptions | None) -> SampleOptions:
    options = (options or SampleOptions()).resolve(trained.base.cfg, trained.base.data)
    options.check_window()
    return options


def sample(run: Run, n: int = 64, seed: int = 0, progress: bool | None = None,
           options: SampleOptions | None = None) -> torch.Tensor:
    """n images under the options' control image (or held-out images' controls)."""
    trained = load_model(run)
    return draw(trained, n, seed, resolve(trained, options), progress)


def sample_figure(x: torch.Tensor, title: str, run: Run, options: SampleOptions):
    """The samples beside the control they were drawn under (``mlatlas sample`` writes it)."""
    # The controls alone: no model to load (``sample`` has checked the options).
    cfg = run.load_config()
    control = options.control if options is not None else ""
    controls = sample_controls(cfg.control, load_dataset(cfg.dataset), len(x), control)[0]
    return control_figure(controls, x, title)


def control_figure(controls: torch.Tensor, x: torch.Tensor, title: str, columns: int = 8):
    """Pairs of rows: the control images, then the samples drawn under them."""
    k = min(len(x), columns * 4)
    rows = []
    for start in range(0, k, columns):
        rows += [controls[start:start + columns].expand(-1, x.shape[1], -1, -1),
                 x[start:start + columns]]
    fig, ax = plt.subplots(figsize=(1.0 * columns, 1.0 * len(rows) + 0.6))
    show_images(ax, torch.cat(rows), columns)
    ax.set_title(f"{title}\nrows in pairs: control, samples", fontsize=9)
    return fig


def evaluate(run: Run, n: int | None = None, seed: int = 0, progress: bool | None = None,
             options: SampleOptions | None = None) -> dict:
    """Samples under the controls of n held-out images (None: the run's ``eval_samples``), for
    their own captions or labels: does the sample's shape mask overlap the mask of the image its
    control came from (IoU), beside the base model's samples for the same conditions and noise
    (control scale 0, ``base/``); and their Frechet distance to the held-out images."""
    trained = load_model(run)
    data = trained.base.data
    n = trained.cfg.eval_samples if n is None else n
    if n < min_samples("image"):
        raise ConfigError(f"--n must be at least {min_samples('image')}, got {n}")
    options = resolve(trained, options)
    y, _ = latent.sample_conditions(trained.base, n, options)
    controls, source = sample_controls(trained.cfg.control, data, n, options.control)
    x = draw(trained, n, seed, options, progress, conditions=y, controls=controls)
    x_base = draw(trained, n, seed, options, progress, conditions=y, controls=controls, scale=0.0)
    target = shape_mask(source)
    metrics = {"mask_iou": float(mask_iou(shape_mask(x), target).mean()),
               "base/mask_iou": float(mask_iou(shape_mask(x_base), target).mean()),
               "control": trained.cfg.control, "control_scale": options.control_scale,
               "control_start": options.control_start, "control_end": options.control_end,
               "guidance": options.guidance, "sampler": options.sampler,
               "sampler_steps": options.steps}
    metrics.update(score_samples(x, data))
    metrics.update(prefixed(score_samples(x_base, data), "base/"))
    title = f"controlnet ({trained.cfg.control}), {options.describe()}"
    run.save_figure(control_figure(controls, x, title), "samples.png")
    run.save_figure(control_figure(controls, x_base, f"the base alone, {options.describe()}"),
                    "base_samples.png")
    run.write_evaluation(metrics)
    return metrics

