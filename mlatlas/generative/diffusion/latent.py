r"""Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models"): the diffusion model of ``formulations.py`` trained and sampled in the latent space of
a trained autoencoder, and conditioned through cross-attention.

First stage. A KL or VQ autoencoder (``generative/vq``: ``autoencoder``, ``vqvae``, ``vqgan``)
maps an image x to z = E(x) (the KL posterior's mean, VQ's quantised z_q) and back, x ~ D(z).
The diffusion model sees the latents scaled to unit variance,

    s = 1 / std(E(x_train)),        z_0 = s E(x),

as Stable Diffusion's s = 0.18215 was computed from its training images; s is stored in the
run's checkpoint and summary. The first stage is ``--ae-run RUN`` or, with none, trained first
in the nested folder ``<run>/autoencoder/``.

Second stage. VP diffusion (DDPM's eps prediction, betas linear from beta_1 to beta_T, as LDM
trains) on z_0,

    L = E_{z_0, eps, t} || eps - eps_theta(sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps,
                                          t, tau(y)) ||^2,

sampled by every sampler of ``samplers.py`` (ddpm, ddim, euler, heun) unchanged, the sample
decoded as x = D(z_0 / s).

Conditioning. tau(y) is the sequence the UNet's cross-attention reads (``nn.unet``):

    labels    tau(y) = e_y, one learned token per class (LDM's class-conditional models)
    captions  tau(y) = the per-token outputs of a text encoder over the caption: a Transformer
              trained with the denoiser (``learned``, as LDM's text-to-image model trains
              its own), or frozen: the text tower of a CLIP / SigLIP run, or MiniLM

Classifier-free guidance (Ho & Salimans 2022) trains with the condition replaced by the null
one (the null label, or the empty caption "") with probability ``label_dropout`` and samples

    eps~ = eps(z, t, null) + (1 + w) (eps(z, t, tau(y)) - eps(z, t, null))

through ``guidance.classifier_free``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from mlatlas.core import distributed
from mlatlas.core.config import ConfigError, require_at_least
from mlatlas.core.plots import metric_curves, samples_figure
from mlatlas.core.precision import Precision, compile_module
from mlatlas.core.run import Run, fit, prefixed
from mlatlas.core.runtime import resolve_device, seed_everything
from mlatlas.data import Dataset, EpochBatches, load_dataset
from mlatlas.eval.samples import score_samples
from mlatlas.generative.diffusion.configs import (
    DiffusionConfig,
    SampleConfig,
    Sampler,
    check_eval_count,
    check_vp,
    vp_formulation,
)
from mlatlas.generative.diffusion.formulations import VP, Formulation
from mlatlas.generative.diffusion.guidance import classifier_free, diversity, label_accuracy
from mlatlas.generative.diffusion.loop import optimise
from mlatlas.generative.diffusion.samplers import Callback
from mlatlas.generative.vq import autoencoder, vqgan, vqvae
from mlatlas.generative.vq.common import (
    FIRST_STAGE_DIR,
    Autoencoder,
    load_autoencoder,
    open_first_stage,
    train_first_stage,
)
from mlatlas.nn.tokenizers import PAD
from mlatlas.nn.unet import LabelEmbedding, UNet

# The first stages whose latents the model can diffuse in, by method name.
FIRST_STAGES = {"autoencoder": autoencoder, "vqvae": vqvae, "vqgan": vqgan}
# Images encoded per forward pass of the autoencoder.
ENCODE_BATCH = 500
TOKENIZER = "tokenizer.json"
Condition = Literal["none", "label", "caption"]


# --- config --------------------------------------------------------------------------------------

@dataclass
class Config(DiffusionConfig):
    """VP diffusion in an autoencoder's latent space, conditioned by cross-attention."""

    METHOD: ClassVar[str] = "latent_diffusion"

    T: int = 1000
    """Number of diffusion steps."""
    schedule: Literal["linear", "cosine"] = "linear"
    """Betas linear from beta_1 to beta_T (Ho et al.) or cosine (Nichol & Dhariwal)."""
    beta_1: float = 1e-4
    """First forward-process variance beta_1 (linear schedule)."""
    beta_T: float = 0.02
    """Last forward-process variance beta_T (linear schedule)."""
    prediction: Literal["eps", "x0", "v"] = "eps"
    """What the network predicts: the noise, the clean latent or v = alpha eps - sigma z_0."""
    sampler: Sampler = "ddim"
    """Sampler for the samples drawn at the end of training and the default of `mlatlas sample`
    (ddpm, ddim, euler or heun)."""
    sample_steps: int = 50
    """Sampler steps (DDPM's ancestral sampler takes every one of the T steps)."""

    dataset: str = "shapes"
    """Training images: shapes (captioned: caption-conditioned), digits / mnist / fashion-mnist
    (by label), or a path to an image folder or .npy file."""
    steps: int = 2000
    """Optimisation steps of the denoiser."""
    channels: int = 32
    """UNet base width (levels of 1x and 2x this, a cross-attention block after each ResBlock)."""
    conditional: bool = True
    """Condition on the captions of a captioned dataset, else on the class labels."""
    clip_x0: bool = False
    """Clip the predicted z_0 to [-1, 1] when sampling (latents are not bounded: off)."""
    text_encoder: str = "learned"
    """Caption encoder: learned (a Transformer trained with the denoiser), minilm (frozen; pip
    install 'mlatlas[minilm]') or the folder of a clip or siglip run (its frozen text tower)."""
    text_width: int = 64
    """Width of the learned text encoder."""
    text_depth: int = 2
    """Transformer blocks of the learned text encoder."""
    vocab_size: int = 256
    """BPE vocabulary of the learned text encoder, trained on the training captions."""
    max_len: int = 16
    """Tokens per caption, <bos> and <eos> included."""
    ae_run: str = ""
    """A finished autoencoder, vqvae or vqgan run on the same data; empty: train one first, in
    <run>/autoencoder/."""
    ae_method: Literal["autoencoder", "vqvae", "vqgan"] = "autoencoder"
    """The first stage trained when no --ae-run is given."""
    ae_steps: int = 1000
    """Steps of the first stage trained when no --ae-run is given."""
    ae_width: int = 16
    """Channels of the first level of the first stage trained when no --ae-run is given."""
    ae_downsample: int = 4
    """Downsampling factor f of the first stage trained when no --ae-run is given."""

    def check(self) -> None:
        check_vp(self)
        super().check()
        require_at_least(self, 1, "text_width", "text_depth", "ae_steps", "ae_width",
                         "ae_downsample")
        if self.max_len < 3:
            raise ConfigError(f"--max-len must be at least 3 (<bos>, a token, <eos>), got "
                              f"{self.max_len}")
        if self.classifier_steps:
            raise ConfigError("latent_diffusion guides with classifier-free guidance only; "
                              "leave --classifier-steps at 0")

    def check_data(self) -> None:
        data = load_dataset(self.dataset)
        if data.kind != "image":
            raise ConfigError(f"--dataset {self.dataset} holds points; latent diffusion models "
                              "images through an autoencoder")
        if self.conditional and not (data.captions_train or data.num_classes):
            raise ConfigError(f"--conditional needs captions or class labels and "
                              f"{self.dataset} has neither")
        if self.eval_samples:
            check_eval_count(self.eval_samples, data, "--eval-samples; 0 skips the evaluation")
        if self.ae_run:
            open_ae_run(self.ae_run, self.dataset)
        if condition_kind(self, data) == "caption" and self.text_encoder not in ("learned",
                                                                                 "minilm"):
            open_text_run(self.text_encoder)

    def formulation(self) -> VP:
        return vp_formulation(self, "posterior")


def condition_kind(cfg: Config, data: Dataset) -> Condition:
    """What the run conditions on: the captions of a captioned dataset, else its labels."""
    if not cfg.conditional:
        return "none"
    return "caption" if data.captions_train else "label"


# --- the first stage -----------------------------------------------------------------------------

def open_ae_run(directory: str | Path, dataset: str) -> Run:
    return open_first_stage(directory, dataset, tuple(FIRST_STAGES), "--ae-run")


def first_stage_config(cfg: Config):
    """The first stage trained when no ``ae_run`` is given: this run's data, seed, device,
    logging, precision and compilation, its own defaults otherwise (no evaluation: latent
    diffusion scores its reconstructions)."""
    return FIRST_STAGES[cfg.ae_method].Config(
        dataset=cfg.dataset, seed=cfg.seed, device=cfg.device, steps=cfg.ae_steps,
        downsample=cfg.ae_downsample, width=cfg.ae_width, log_every=cfg.log_every,
        ckpt_every=cfg.ckpt_every, precision=cfg.precision, compile=cfg.compile, eval_samples=0)


def first_stage(run: Run, cfg: Config, progress: bool | None = None) -> Run:
    if cfg.ae_run:
        return open_ae_run(cfg.ae_run, cfg.dataset)
    return train_first_stage(run, first_stage_config(cfg), FIRST_STAGES[cfg.ae_method], progress)


def frozen_autoencoder(source: Run, device: torch.device) -> Autoencoder:
    """The first stage's autoencoder, fixed: eval mode, no gradients, on ``device``."""
    return load_autoencoder(source).to(device).eval().requires_grad_(False)


def load_first_stage(run: Run, cfg: Config, device: torch.device) -> Autoencoder:
    source = open_ae_run(cfg.ae_run, cfg.dataset) if cfg.ae_run else \
        Run.open(run.path(FIRST_STAGE_DIR))
    return frozen_autoencoder(source, device)


@torch.no_grad()
def encode_images(ae: Autoencoder, x: torch.Tensor) -> torch.Tensor:
    """z = E(x) of (N, C, H, W) images in [0, 1], in batches, on the autoencoder's device."""
    device = next(ae.parameters()).device
    return torch.cat([ae.encode(x[i:i + ENCODE_BATCH].to(device))
                      for i in range(0, len(x), ENCODE_BATCH)])


def latent_scale(z: torch.Tensor) -> float:
    """s = 1 / std(z) over every element of the encoded training set."""
    std = float(z.float().std())
    if not std > 0:
        raise ConfigError("the autoencoder maps every training image to the same latent; "
                          "train it longer")
    return 1.0 / std


# --- conditions ----------------------------------------------------------------------------------

class LabelCondition(nn.Module):
    """tau(y) = e_y, a (B, 1, width) sequence of one token; the null label is ``num_classes``."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.num_classes, self.width = num_classes, width
        self.labels = LabelEmbedding(num_classes, width)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.labels.table(y)[:, None]

    def null(self, y: torch.Tensor) -> torch.Tensor:
        return torch.full_like(y, self.num_classes)

    def empty(self, batch: int) -> torch.Tensor:
        return torch.full((batch,), self.num_classes, device=self.labels.table.weight.device)

    def drop(self, y: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        return torch.where(drop, self.num_classes, y)


class TextCondition(nn.Module):
    """tau(y) = the text encoder's (B, L, width) token outputs over caption ids (B, L); the null
    condition is the empty caption's ids. A frozen encoder runs without gradients."""

    def __init__(self, tower: nn.Module, null_ids: torch.Tensor, frozen: bool):
        super().__init__()
        self.tower, self.frozen, self.width = tower, frozen, tower.width
        self.register_buffer("null_ids", null_ids.clone())
        if frozen:
            tower.requires_grad_(False).eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.tower.tokens(ids, ids != PAD)

    def train(self, mode: bool = True) -> TextCondition:
        super().train(mode)
        if self.frozen:
            self.tower.eval()
        return self

    def null(self, ids: torch.Tensor) -> torch.Tensor:
        return self.null_ids.expand_as(ids).clone()

    def empty(self, batch: int) -> torch.Tensor:
        return self.null_ids.expand(batch, -1).clone()

    def drop(self, ids: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        return torch.where(drop[:, None], self.null_ids, ids)


class LatentDenoiser(nn.Module):
    """The UNet on scaled latents, the condition's encoder and the latent scale s: called as
    every network of the framework, ``net(z, t, y)``, with y labels (B,), caption ids (B, L)
    or None (the null condition)."""

    def __init__(self, unet: UNet, condition: LabelCondition | TextCondition | None,
                 scale: float):
        super().__init__()
        self.unet, self.condition = unet, condition
        self.register_buffer("latent_scale", torch.tensor(float(scale)))

    def null_condition(self, y: torch.Tensor) -> torch.Tensor:
        """Null conditions shaped like ``y``, for classifier-free guidance."""
        return self.condition.null(y)

    def context(self, y: torch.Tensor | None, batch: int,
                device: torch.device) -> torch.Tensor | None:
        if self.condition is None:
            return None
        return self.condition(self.condition.empty(batch) if y is None else y.to(device))

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, t, context=self.context(y, len(x), x.device))


def open_text_run(directory: str | Path) -> Run:
    from mlatlas.contrastive.clip import CONFIGS

    try:
        source = Run.open(directory)
    except Exception as err:  # noqa: BLE001 - any unreadable folder is the flag's error
        raise ConfigError(f"--text-encoder: learned, minilm or a clip/siglip run folder; "
                          f"{err}") from None
    if source.method not in CONFIGS:
        raise ConfigError(f"--text-encoder: {directory} is a {source.method} run; its text "
                          f"tower must come from a {' or '.join(CONFIGS)} run")
    return source


def text_encoder(run: Run, cfg: Config, data: Dataset):
    """The caption tokenizer and text tower: trained here (``learned``), MiniLM's, or a
    clip/siglip run's. The run's tokenizer is saved beside it (read back on resume)."""
    from mlatlas.contrastive.common import run_tokenizer
    from mlatlas.contrastive.text import MiniLMTower, TextTower

    if cfg.text_encoder in ("learned", "minilm"):
        minilm = cfg.text_encoder == "minilm"
        tokenizer = run_tokenizer(run, list(data.captions_train), cfg.vocab_size, cfg.max_len,
                                  minilm=minilm)
        tower = MiniLMTower() if minilm else TextTower(
            tokenizer.vocab_size, cfg.max_len, cfg.text_width, cfg.text_depth)
        return tokenizer, tower, minilm
    from mlatlas.contrastive.clip import load_model as load_dual_encoder

    _, model, tokenizer, _ = load_dual_encoder(open_text_run(cfg.text_encoder))
    return tokenizer, model.text_tower, True


def build_model(run: Run, cfg: Config, data: Dataset, latent_shape: tuple[int, ...],
                scale: float):
    """The denoiser (UNet, condition encoder, s) and the caption tokenizer (None without
    captions)."""
    kind, tokenizer = condition_kind(cfg, data), None
    condition: LabelCondition | TextCondition | None = None
    if kind == "label":
        condition = LabelCondition(data.num_classes, cfg.channels)
    elif kind == "caption":
        tokenizer, tower, frozen = text_encoder(run, cfg, data)
        condition = TextCondition(tower, tokenizer.encode([""])[0][0], frozen)
    side = latent_shape[-1]
    unet = UNet(latent_shape[0], base=cfg.channels, channel_mults=(1, 2) if side % 2 == 0
                else (1,), attention=False, time_scale=cfg.formulation().time_scale,
                context_dim=condition.width if condition is not None else 0)
    return LatentDenoiser(unet, condition, scale), tokenizer


def train_conditions(cfg: Config, data: Dataset, tokenizer) -> torch.Tensor | None:
    """The condition of every training image: its label, or its caption's ids."""
    kind = condition_kind(cfg, data)
    if kind == "label":
        return data.y_train
    if kind == "caption":
        return tokenizer.encode(list(data.captions_train))[0]
    return None


# --- training ------------------------------------------------------------------------------------

def dropped(condition: LabelCondition | TextCondition | None, conditions: torch.Tensor | None,
            index: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor | None:
    """The conditions of this rank's rows ``index`` of the batch, each replaced by the null one
    with probability p (the draw is the global batch's, so it does not depend on the ranks)."""
    if conditions is None:
        return None
    drop = distributed.rand((len(index),), generator=generator).to(index.device) < p
    return condition.drop(conditions[index], drop)


def write_training_summary(run: Run, cfg, extra: dict | None = None) -> None:
    """The loss curve and the training part of summary.json."""
    run.save_figure(metric_curves(run.metrics, ["loss"], title=f"{cfg.METHOD} training loss"),
                    "loss.png")
    run.write_summary({"train/steps": cfg.steps, "train/loss": run.last_row()["loss"],
                       **(extra or {})})


def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    """Train (or resume) the first stage if needed, then the denoiser on its scaled latents."""
    run = run or Run.create(cfg.METHOD, cfg)
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.dataset)
    ae = frozen_autoencoder(first_stage(run, cfg, progress), device)
    z = encode_images(ae, data.x_train)
    scale = latent_scale(z)
    z_train = z * scale
    formulation = cfg.formulation()
    generator = seed_everything(cfg.seed)
    model, tokenizer = build_model(run, cfg, data, ae.latent_shape, scale)
    model = model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    compile_module(model.unet, cfg.compile)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    precision = Precision(cfg.precision, device)
    conditions = train_conditions(cfg, data, tokenizer)
    conditions = conditions.to(device) if conditions is not None else None
    batches = EpochBatches(len(z_train), cfg.batch_size, cfg.seed)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        index = distributed.shard(batches(step)).to(device)
        y = dropped(model.condition, conditions, index, cfg.label_dropout, generator)
        with precision.autocast():
            loss = formulation.loss(model, z_train[index], y, generator)
        optimise(cfg, model, ema, optimizer, loss, step, precision)
        return {"loss": loss.detach()}

    fit(run, step_fn, total_steps=cfg.steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
        objects={"model": model, "ema": ema, "optimizer": optimizer, "rng": generator,
                 "precision": precision}, progress=progress)
    if not distributed.is_main():
        return run
    write_training_summary(run, cfg, {"train/latent_scale": scale,
                                      "train/latent_shape": list(ae.latent_shape)})
    if cfg.eval_samples:
        evaluate(run, n=cfg.eval_samples, progress=progress)
    return run


# --- a trained run -------------------------------------------------------------------------------

@dataclass
class Trained:
    cfg: Config
    data: Dataset
    ae: Autoencoder
    model: LatentDenoiser
    tokenizer: object | None
    device: torch.device

    @property
    def kind(self) -> Condition:
        return condition_kind(self.cfg, self.data)


def load_model(run: Run) -> Trained:
    """The run's config, data, autoencoder, EMA denoiser (eval mode) and tokenizer."""
    cfg = run.load_config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"{run.dir} is a {run.method} run, not a latent_diffusion run")
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.dataset)
    ae = load_first_stage(run, cfg, device)
    model, tokenizer = build_model(run, cfg, data, ae.latent_shape, 1.0)
    run.load_weights(model, "ema")
    return Trained(cfg, data, ae, model.to(device).eval(), tokenizer, device)


@dataclass
class SampleOptions(SampleConfig):
    """How to sample a latent diffusion run; zeros and empty strings take the run's settings."""

    prompt: str = ""
    """Caption every sample is drawn for (caption-conditioned runs); empty: the held-out
    captions in turn."""

    def resolve(self, cfg: Config, data: Dataset) -> SampleOptions:
        out = super().resolve(cfg, data)
        kind = condition_kind(cfg, data)
        if out.prompt and kind != "caption":
            raise ConfigError(f"--prompt needs a caption-conditioned run; this one is "
                              f"{'label-conditioned' if kind == 'label' else 'unconditional'}")
        if out.label >= 0 and kind != "label":
            raise ConfigError("--label needs a label-conditioned run")
        if out.prompt:
            check_prompt(out.prompt, data)
        return out


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def check_prompt(prompt: str, data: Dataset) -> None:
    """A ConfigError for a prompt none of whose words the training captions hold."""
    known = {w for caption in data.captions_train for w in words(caption)}
    if not set(words(prompt)) & known:
        examples = "; ".join(f'"{c}"' for c in data.captions_train[:3])
        raise ConfigError(f"--prompt {prompt!r}: none of its words appear in the training "
                          f"captions of {data.name} (e.g. {examples})")


def sample_conditions(trained: Trained, n: int, options: SampleOptions
                      ) -> tuple[torch.Tensor | None, list[str] | None]:
    """The conditions of n samples (labels, or caption ids with their captions)."""
    if trained.kind == "label":
        labels = torch.full((n,), options.label) if options.label >= 0 else \
            torch.arange(n) % trained.data.num_classes
        return labels, None
    if trained.kind == "caption":
        captions = [options.prompt] * n if options.prompt else \
            [trained.data.captions_test[i % len(trained.data.captions_test)] for i in range(n)]
        return trained.tokenizer.encode(captions)[0], captions
    return None, None


def generate(formulation: Formulation, net, ae: Autoencoder, scale: float, n: int,
             options: SampleConfig, seed: int, device: torch.device,
             progress: bool | None = None, callback: Callback = None) -> torch.Tensor:
    """n latents drawn by the options' sampler from the noise of ``seed``, decoded:
    x = D(z_0 / s), in the autoencoder's [0, 1] scale (not clipped)."""
    z = formulation.sample(net, (n, *ae.latent_shape), options.sampler, options.steps,
                           torch.Generator().manual_seed(seed), device, clip=formulation.clip_x0,
                           progress=progress, callback=callback, **options.sampler_options())
    with torch.no_grad():
        return torch.cat([ae.decode(z[i:i + ENCODE_BATCH] / scale)
                          for i in range(0, n, ENCODE_BATCH)])


def draw(trained: Trained, n: int, seed: int, options: SampleOptions,
         progress: bool | None = None, conditions: torch.Tensor | None = None,
         unconditional: bool = False) -> torch.Tensor:
    """n images in [0, 1] for ``conditions`` (default: the options'); ``unconditional`` draws
    them with the null condition instead, for the baseline of the evaluation."""
    model = trained.model
    y = conditions if conditions is not None else sample_conditions(trained, n, options)[0]
    if y is not None:
        y = y.to(trained.device)
        if unconditional:
            y = model.null_condition(y)
    net = classifier_free(model, y, 0.0 if unconditional else options.guidance)
    x = generate(trained.cfg.formulation(), net, trained.ae, float(model.latent_scale), n,
                 options, seed, trained.device, progress)
    return x.cpu().clamp(0, 1)


def sample(run: Run, n: int = 64, seed: int = 0, progress: bool | None = None,
           options: SampleOptions | None = None) -> torch.Tensor:
    """n images decoded from latents drawn for the options' prompt, label or held-out
    captions."""
    trained = load_model(run)
    options = (options or SampleOptions()).resolve(trained.cfg, trained.data)
    return draw(trained, n, seed, options, progress)


def sample_figure(x: torch.Tensor, title: str, run: Run, options: SampleOptions | None):
    """``mlatlas sample``'s grid, titled with what the samples were drawn for."""
    if options is not None and options.prompt:
        title += f' for "{options.prompt}"'
    if options is not None and options.guidance:
        title += f", guidance {options.guidance}"
    return samples_figure(x, title)


def caption_scores(x: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Whether each image shows the shape and colour its caption asks for (the shipped shapes
    recogniser)."""
    from mlatlas.eval.shapes import caption_agreement, parse_caption

    parsed = [parse_caption(c) for c in captions]
    shape = torch.tensor([p[0] for p in parsed])
    colour = torch.tensor([p[1] for p in parsed])
    return caption_agreement(x, shape, colour)


def evaluate(run: Run, n: int | None = None, seed: int = 0, progress: bool | None = None,
             options: SampleOptions | None = None) -> dict:
    """Draw n samples (None: the run's ``eval_samples``) and score them against the held-out
    images; a conditional run's samples also by whether they show what was asked, beside the
    same score of samples drawn with the null condition (``unconditional/``) and, on the
    shapes, for captions of the (colour, shape) pairs held out of training (``zero_shot/``)."""
    from mlatlas.generative.diffusion.plots import captions_figure

    trained = load_model(run)
    cfg, data = trained.cfg, trained.data
    n = cfg.eval_samples if n is None else n
    check_eval_count(n, data, "--n, or the run's --eval-samples")
    options = (options or SampleOptions()).resolve(cfg, data)
    y, captions = sample_conditions(trained, n, options)
    x = draw(trained, n, seed, options, progress, conditions=y)
    metrics = score_samples(x, data)
    metrics.update(sampler=options.sampler, sampler_steps=options.steps,
                   guidance=options.guidance, latent_scale=float(trained.model.latent_scale))
    if y is not None:
        baseline = draw(trained, n, seed, options, progress, conditions=y, unconditional=True)
        if trained.kind == "label":
            metrics.update(label_accuracy(x, y, data))
            metrics.update(diversity(x, y, data))
            metrics.update(prefixed(label_accuracy(baseline, y, data), "unconditional/"))
        elif data.name == "shapes":
            metrics.update(caption_scores(x, captions))
            metrics.update(prefixed(caption_scores(baseline, captions), "unconditional/"))
            if not options.prompt:
                metrics.update(prefixed(zero_shot(trained, n, seed, options, progress),
                                        "zero_shot/"))
    title = f"{cfg.METHOD} samples, {cfg.dataset}, {options.describe()}"
    run.save_figure(samples_figure(x, title), "samples.png")
    if captions is not None:
        run.save_figure(captions_figure(x, captions, title), "captions.png")
    run.write_evaluation(metrics)
    return metrics


def zero_shot(trained: Trained, n: int, seed: int, options: SampleOptions,
              progress: bool | None = None) -> dict:
    """Caption agreement of samples for captions of the held-out (colour, shape) pairs."""
    from mlatlas.data.shapes import captioned_shapes

    captions = captioned_shapes(n, seed=seed, split="zero-shot").captions
    ids = trained.tokenizer.encode(captions)[0]
    return caption_scores(draw(trained, n, seed, options, progress, conditions=ids), captions)
