r"""The Transformer prior over VQ codes: stage two of "compress, then generate" (Esser et al.
2021, VQGAN's Transformer; van den Oord et al. 2017 fit a PixelCNN over VQ-VAE codes alike).

A trained VQ autoencoder (``vqvae`` or ``vqgan``) maps an image x to a grid z_q of h x w codebook
vectors, each named by its index. Read in raster order the indices are a sequence
s = (s_1, ..., s_L), L = h w, s_i in {0, ..., K-1} for a codebook of K vectors. The prior is a
decoder-only (GPT-style) Transformer over those sequences,

    p_theta(s | c) = prod_{i=1}^{L} p_theta(s_i | s_<i, c),

with c the class of a conditional run, or the null class C (one index past the C classes) for
an unconditional one; the conditioning token is also the start token. The input tokens are

    t_0 = K + c,   t_i = s_i  (i = 1, ..., L-1),
    h_i = E[t_i] + P_i,        logits_i = W_out Transformer_causal(h)_i,

learned token (E, K + C + 1 rows: the codes, then the classes, then the null class) and position
(P, L rows) embeddings, and ``logits_i`` (K values) scores s_{i+1}; the causal mask lets position
i see positions <= i only. While training, h_i is multiplied by m_i / (1 - p), m_i ~
Bernoulli(1 - p)^width: (inverted) dropout of rate p = ``dropout`` on the embeddings, drawn for
the global batch from the run's generator, so a data-parallel run drops what a one-process run
drops. Training minimises the cross-entropy of the next code,

    L(theta) = -1/(B L) sum_b sum_i log softmax(logits_{b,i-1})[s_{b,i}]   nats per code,

reported also as bits per code, L / ln 2: a prior that has learnt nothing (uniform codes) scores
log K nats per code. A conditional run trains on the null class with probability
``label_dropout``, so one network is both p(s | c) and p(s). Sampling draws s_1, ..., s_L in turn
from the logits, through :func:`mlatlas.nn.sampling.sample_token` (temperature, top-k, top-p), for
all samples at once, and decodes the grid with the autoencoder: x = D(codebook[s]). A
conditional run samples with classifier-free guidance of weight w (``--guidance``) from the
logits (1 + w) l(s_<i, c) - w l(s_<i, C).

The first stage is a finished run (``vq_run``) or, with none, a vqvae or vqgan run trained first
in a folder nested inside this run (``<run>/autoencoder/``), so a resumed run resumes whichever
stage was interrupted. The training and test sets are encoded to codes once (batched, without
gradients) and held in memory.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mlatlas.core import distributed
from mlatlas.core.config import (
    BatchConfig,
    ConfigError,
    check_options,
    require_at_least,
    require_unit,
)
from mlatlas.core.plots import metric_curves, samples_figure
from mlatlas.core.precision import Precision, compile_module
from mlatlas.core.run import Run, fit, prefixed
from mlatlas.core.runtime import resolve_device, seed_everything
from mlatlas.data import Dataset, EpochBatches, load_dataset
from mlatlas.eval.classifier import accuracy, load_feature_net
from mlatlas.eval.samples import min_samples, score_samples
from mlatlas.generative.vq import vqgan, vqvae
from mlatlas.generative.vq.common import (
    FIRST_STAGE_DIR,
    AutoencoderConfig,
    VQModel,
    load_autoencoder,
    open_first_stage,
    train_first_stage,
)
from mlatlas.nn.sampling import sample_token
from mlatlas.nn.transformer import Transformer

LN2 = math.log(2.0)
# The first stages the prior can model the codes of, by method name.
FIRST_STAGES = {"vqvae": vqvae, "vqgan": vqgan}
# Images encoded (or code sequences scored) per forward pass.
EVAL_BATCH = 500


# --- config --------------------------------------------------------------------------------------

@dataclass
class Config(BatchConfig):
    """The prior's Transformer and where its VQ autoencoder comes from."""

    METHOD: ClassVar[str] = "vq_transformer"
    RESUMABLE: ClassVar[frozenset[str]] = BatchConfig.RESUMABLE | {"eval_samples"}

    dataset: str = "digits"
    """Training images: a name from `mlatlas list` or a path to an image folder or .npy file
    (the first stage's dataset)."""
    steps: int = 1200
    """Optimisation steps of the prior."""
    batch_size: int = 64
    """Code sequences per optimisation step."""
    lr: float = 1e-3
    """Adam learning rate of the prior."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 turns clipping off)."""
    width: int = 64
    """Width of the Transformer's tokens."""
    depth: int = 2
    """Transformer blocks."""
    heads: int = 4
    """Attention heads (they divide --width)."""
    dropout: float = 0.3
    """Dropout rate p in [0, 1) on the token and position embeddings while training (the prior
    sees the same few thousand code grids every epoch)."""
    conditional: bool = False
    """Condition on the class label, given as the first token: p(s | c)."""
    label_dropout: float = 0.1
    """With --conditional, the share of sequences trained with the null class (the prior p(s))."""
    vq_run: str = ""
    """A finished vqvae or vqgan run whose codes the prior models; empty: train one first, in
    <run>/autoencoder/."""
    vq_method: Literal["vqvae", "vqgan"] = "vqvae"
    """The first stage trained when no --vq-run is given."""
    vq_steps: int = 1000
    """Steps of the first stage trained when no --vq-run is given."""
    eval_samples: int = 500
    """Samples drawn by the evaluation at the end of training (0 skips it); as many
    reconstructions and grids of random codes are scored beside them."""

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "batch_size", "width", "depth", "heads", "vq_steps")
        if self.width % self.heads:
            raise ConfigError(f"--heads {self.heads} must divide --width {self.width}")
        if self.grad_clip < 0:
            raise ConfigError(f"--grad-clip cannot be negative, got {self.grad_clip}")
        require_unit(self, "label_dropout")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.eval_samples and self.eval_samples < min_samples("image"):
            raise ConfigError(f"--eval-samples must be 0 or at least {min_samples('image')}, "
                              f"got {self.eval_samples}")

    def check_data(self) -> None:
        data = load_dataset(self.dataset)
        if data.kind != "image":
            raise ConfigError(f"--dataset {self.dataset} holds points; the VQ prior models "
                              "the codes of images")
        if self.conditional and not data.num_classes:
            raise ConfigError(f"--conditional needs class labels and {self.dataset} has none")
        if self.vq_run:
            open_vq_run(self.vq_run, self.dataset)


# --- the first stage -----------------------------------------------------------------------------

def open_vq_run(directory: str | Path, dataset: str) -> Run:
    """The finished vqvae or vqgan run ``--vq-run`` names, trained on ``dataset``."""
    return open_first_stage(directory, dataset, tuple(FIRST_STAGES), "--vq-run")


def first_stage_config(cfg: Config) -> AutoencoderConfig:
    """The vqvae / vqgan config trained when no ``vq_run`` is given: this run's data, seed,
    device, logging, precision and compilation, ``vq_steps`` steps, the method's own defaults
    otherwise (its evaluation is skipped: the prior scores its reconstructions)."""
    return FIRST_STAGES[cfg.vq_method].Config(
        dataset=cfg.dataset, seed=cfg.seed, device=cfg.device, steps=cfg.vq_steps,
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, precision=cfg.precision,
        compile=cfg.compile, eval_samples=0)


def first_stage(run: Run, cfg: Config, progress: bool | None = None) -> Run:
    """The autoencoder's run: ``vq_run``, or the nested ``<run>/autoencoder/`` trained (or
    resumed) here."""
    if cfg.vq_run:
        return open_vq_run(cfg.vq_run, cfg.dataset)
    return train_first_stage(run, first_stage_config(cfg), FIRST_STAGES[cfg.vq_method], progress)


def load_first_stage(run: Run, cfg: Config) -> VQModel:
    """The trained VQ autoencoder of a prior's run (eval mode, on the run's device)."""
    source = open_vq_run(cfg.vq_run, cfg.dataset) if cfg.vq_run else \
        Run.open(run.path(FIRST_STAGE_DIR))
    return load_autoencoder(source).to(resolve_device(cfg.device)).eval()


@torch.no_grad()
def encode_codes(vq: VQModel, x: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1] -> their code indices in raster order, (N, L), on the CPU;
    batched, without gradients."""
    device = next(vq.parameters()).device
    return torch.cat([vq.encode_indices(chunk.to(device)).flatten(1).cpu()
                      for chunk in x.split(EVAL_BATCH)])


@torch.no_grad()
def decode_codes(vq: VQModel, s: torch.Tensor) -> torch.Tensor:
    """Code indices (N, L) in raster order -> images (N, C, H, W) in [0, 1], on the CPU."""
    _, h, w = vq.latent_shape
    device = next(vq.parameters()).device
    return torch.cat([vq.decode_indices(chunk.view(-1, h, w).to(device)).clamp(0, 1).cpu()
                      for chunk in s.split(EVAL_BATCH)])


# --- the prior -----------------------------------------------------------------------------------

class CodePrior(nn.Module):
    """p_theta(s_i | s_<i, c) over sequences of ``length`` codes of a codebook of
    ``codebook_size`` (K) vectors, for ``num_classes`` (C) classes plus the null class C."""

    def __init__(self, codebook_size: int, length: int, num_classes: int, width: int,
                 depth: int, heads: int):
        super().__init__()
        self.codebook_size, self.length, self.num_classes = codebook_size, length, num_classes
        # Rows 0..K-1 the codes, K..K+C-1 the classes, K+C the null class (the start token).
        self.token = nn.Embedding(codebook_size + num_classes + 1, width)
        self.position = nn.Parameter(torch.randn(length, width) * 0.02)
        self.transformer = Transformer(width, depth, heads)
        self.head = nn.Linear(width, codebook_size)

    @property
    def null(self) -> int:
        return self.num_classes

    def embed(self, prefix: torch.Tensor, c: torch.Tensor,
              keep: torch.Tensor | None = None) -> torch.Tensor:
        """h = (E[t] + P) o keep for t = (K + c, prefix): (B, T) codes, T < L, and (B,) classes
        in 0..C (C: null) -> (B, T + 1, width); ``keep`` is dropout's m / (1 - p), (B, T + 1,
        width) (None: no dropout)."""
        if prefix.shape[1] >= self.length:
            raise ValueError(f"a prefix of {prefix.shape[1]} codes; the prior models "
                             f"{self.length}, so at most {self.length - 1} come before one")
        tokens = torch.cat([self.codebook_size + c[:, None], prefix], dim=1)
        h = self.token(tokens) + self.position[: tokens.shape[1]]
        return h if keep is None else h * keep

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Embedded tokens (B, T, width) -> next-code logits (B, T, K) under the causal mask."""
        return self.head(self.transformer(h, causal=True))

    def forward(self, prefix: torch.Tensor, c: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) codes, (B,) classes -> (B, T + 1, K): row i scores the code after prefix[:i]."""
        return self.logits(self.embed(prefix, c, keep))


def dropout_keep(shape: tuple[int, ...], p: float, generator: torch.Generator,
                 device: torch.device) -> torch.Tensor:
    """Inverted dropout's factors m / (1 - p), m ~ Bernoulli(1 - p), of this rank's rows of the
    global batch's draw (:func:`mlatlas.core.distributed.rand`)."""
    u = distributed.rand(shape, generator=generator).to(device)
    return (u >= p).float() / (1 - p)


def code_loss(model: CodePrior, s: torch.Tensor, c: torch.Tensor,
              keep: torch.Tensor | None = None) -> torch.Tensor:
    """L = -1/(B L) sum_{b,i} log p(s_{b,i} | s_{b,<i}, c_b): (B, L) codes, (B,) classes (and
    dropout's factors ``keep``, (B, L, width)) -> the mean cross-entropy in nats per code."""
    logits = model(s[:, :-1], c, keep)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), s.reshape(-1))


@torch.no_grad()
def code_nll(model: CodePrior, s: torch.Tensor, c: torch.Tensor) -> float:
    """The held-out NLL of (N, L) codes under classes (N,), in nats per code, in eval mode (the
    model is put back in the mode it was in)."""
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = sum(float(code_loss(model, s_b.to(device), c_b.to(device))) * len(s_b)
                for s_b, c_b in zip(s.split(EVAL_BATCH), c.split(EVAL_BATCH), strict=True))
    model.train(training)
    return total / len(s)


def conditions(cfg: Config, labels: torch.Tensor | None, n: int, null: int) -> torch.Tensor:
    """The (n,) conditioning classes: the labels of a conditional run, else the null class."""
    if cfg.conditional and labels is not None:
        return labels.long()
    return torch.full((n,), null, dtype=torch.long)


@torch.no_grad()
def guided_logits(logits_c: torch.Tensor, logits_null: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance of the next code's logits, (1 + w) l(s_<i, c) - w l(s_<i, C):
    log p(s_i | s_<i, c) + w log[p(s_i | s_<i, c) / p(s_i | s_<i)] up to normalisation, the
    autoregressive form of Ho & Salimans' rule (w = 0: the conditional model)."""
    return (1 + w) * logits_c - w * logits_null


def draw_codes(model: CodePrior, c: torch.Tensor, generator: torch.Generator,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               guidance: float = 0.0) -> torch.Tensor:
    """Ancestral sampling s_i ~ p(s_i | s_<i, c), i = 1..L, for all (n,) classes at once -> (n, L)
    codes, the logits guided by :func:`guided_logits` when ``guidance`` > 0 (the null class's
    logits of the same prefixes computed in the same batch). Each position recomputes its prefix
    (L is a few dozen codes)."""
    device = next(model.parameters()).device
    c = c.to(device)
    n = len(c)
    if guidance:
        c = torch.cat([c, torch.full_like(c, model.null)])
    s = torch.zeros((n, 0), dtype=torch.long, device=device)
    for _ in range(model.length):
        logits = model(s.repeat(2, 1) if guidance else s, c)[:, -1]
        if guidance:
            logits = guided_logits(logits[:n], logits[n:], guidance)
        s_i = sample_token(logits, temperature, top_p, generator, top_k=top_k)
        s = torch.cat([s, s_i[:, None]], dim=1)
    return s.cpu()


# --- training ------------------------------------------------------------------------------------

def build_prior(cfg: Config, vq: VQModel, data: Dataset) -> CodePrior:
    _, h, w = vq.latent_shape
    return CodePrior(vq.codebook_size, h * w, data.num_classes if cfg.conditional else 0,
                     cfg.width, cfg.depth, cfg.heads)


def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    """Train (or resume) the first stage when it is nested, then the prior; returns the run."""
    run = run or Run.create(cfg.METHOD, cfg)
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.dataset)
    first_stage(run, cfg, progress)
    vq = load_first_stage(run, cfg)
    s_train, s_test = encode_codes(vq, data.x_train), encode_codes(vq, data.x_test)
    generator = seed_everything(cfg.seed)
    model = build_prior(cfg, vq, data).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    precision = Precision(cfg.precision, device)
    c_train = conditions(cfg, data.y_train, len(s_train), model.null).to(device)
    c_test = conditions(cfg, data.y_test, len(s_test), model.null)[:EVAL_BATCH]
    s_train = s_train.to(device)
    batches = EpochBatches(len(s_train), cfg.batch_size, cfg.seed)
    compile_module(model, cfg.compile)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        index = distributed.shard(batches(step)).to(device)
        c = c_train[index]
        if cfg.conditional:
            # The global batch's draw, so a data-parallel run drops the labels a one-process
            # run drops.
            drop = distributed.rand((len(index),), generator=generator).to(device) < \
                cfg.label_dropout
            c = torch.where(drop, model.null, c)
        keep = dropout_keep((len(index), model.length, cfg.width), cfg.dropout, generator,
                            device) if cfg.dropout else None
        with precision.autocast():
            loss = code_loss(model, s_train[index], c, keep)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer, model.parameters(), cfg.grad_clip)
        metrics = {"nll_per_code": loss.detach()}
        if step % cfg.log_every == 0 or step == cfg.steps:
            # Shown beside the training loss so overfitting is seen; never used to select.
            metrics["test_nll_per_code"] = torch.tensor(
                code_nll(model, s_test[:EVAL_BATCH], c_test))
        return metrics

    fit(run, step_fn, total_steps=cfg.steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
        objects={"model": model, "optimizer": optimizer, "rng": generator,
                 "precision": precision},
        progress=progress)
    if not distributed.is_main():
        return run
    run.save_figure(metric_curves([r for r in run.metrics if "test_nll_per_code" in r],
                                  ["nll_per_code", "test_nll_per_code"], log=False,
                                  title=f"{cfg.METHOD}: training and held-out NLL (nats per "
                                        f"code; uniform codes: log K = "
                                        f"{math.log(vq.codebook_size):.3f})"), "loss.png")
    run.write_summary({"train/steps": cfg.steps,
                       "train/nll_per_code": run.last_row()["nll_per_code"]})
    if cfg.eval_samples:
        evaluate(run, n=cfg.eval_samples, progress=progress)
    return run


# --- a trained run -------------------------------------------------------------------------------

@dataclass
class SampleOptions:
    """How to sample from a trained prior."""

    SIGNED: ClassVar[frozenset[str]] = frozenset({"label"})

    temperature: float = 1.0
    """Sampling temperature T of the code logits (0: greedy, the most likely code)."""
    top_k: int = 0
    """Draw each code among the k most likely only (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of most likely codes whose mass reaches p, in (0, 1]."""
    label: int = -1
    """Class to sample for a conditional run; -1 cycles through the classes."""
    guidance: float = 0.0
    """Classifier-free guidance weight w of a conditional run: logits (1 + w) l(c) - w l(null)."""

    def __post_init__(self) -> None:
        check_options(self)
        if self.guidance < 0:
            raise ConfigError(f"--guidance cannot be negative, got {self.guidance}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature cannot be negative, got {self.temperature}")
        require_unit(self, "top_p", low_open=True)
        if self.label < -1:
            raise ConfigError(f"--label must be a class or -1 (every class), got {self.label}")


def sample_labels(n: int, options: SampleOptions, conditional: bool,
                  num_classes: int) -> torch.Tensor | None:
    """The (n,) classes to sample for (None for an unconditional run)."""
    if not conditional:
        if options.label >= 0:
            raise ConfigError("--label needs a run trained with --conditional")
        return None
    if options.label >= num_classes:
        raise ConfigError(f"--label must be below {num_classes}, got {options.label}")
    if options.label >= 0:
        return torch.full((n,), options.label, dtype=torch.long)
    return torch.arange(n) % num_classes


@dataclass(frozen=True)
class Trained:
    cfg: Config
    data: Dataset
    vq: VQModel
    model: CodePrior


def load_model(run: Run) -> Trained:
    """The run's config, data, autoencoder and trained prior (eval mode, on the run's device)."""
    cfg = run.load_config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"{run.dir} is a {run.method} run, not a vq_transformer's")
    data = load_dataset(cfg.dataset)
    vq = load_first_stage(run, cfg)
    model = build_prior(cfg, vq, data)
    run.load_weights(model, "model")
    return Trained(cfg, data, vq, model.to(resolve_device(cfg.device)).eval())


def draw(trained: Trained, n: int, seed: int, options: SampleOptions
         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n decoded samples (n, C, H, W) and the classes they were drawn for (None: none)."""
    labels = sample_labels(n, options, trained.cfg.conditional, trained.data.num_classes)
    if options.guidance and not trained.cfg.conditional:
        raise ConfigError("--guidance needs a run trained with --conditional")
    c = conditions(trained.cfg, labels, n, trained.model.null)
    s = draw_codes(trained.model, c, torch.Generator().manual_seed(seed), options.temperature,
                   options.top_k, options.top_p, options.guidance)
    return decode_codes(trained.vq, s), labels


def sample(run: Run, n: int = 64, seed: int = 0, progress: bool | None = None,
           options: SampleOptions | None = None) -> torch.Tensor:
    """n images: codes drawn from the prior, decoded by the run's autoencoder."""
    x, _ = draw(load_model(run), n, seed, options or SampleOptions())
    return x


def evaluate(run: Run, n: int | None = None, seed: int = 0, progress: bool | None = None,
             options: SampleOptions | None = None) -> dict:
    """The held-out NLL of the test set's codes (nats and bits per code), then n samples (None:
    the run's ``eval_samples``) scored by :func:`mlatlas.eval.samples.score_samples` beside the
    same scores of the autoencoder's reconstructions of n training images (``reconstruction_``,
    the best the prior can reach through this decoder) and, as the ``baseline/`` of
    summary.json, of n grids of uniformly random codes (whose NLL is log K); the class a
    conditional run's samples were drawn for is compared with the shipped classifier's
    (``label_accuracy``). The sample grid goes to samples.png."""
    trained = load_model(run)
    cfg, data, vq = trained.cfg, trained.data, trained.vq
    options = options or SampleOptions()
    n = cfg.eval_samples if n is None else n
    if n and n < min_samples("image"):
        raise ConfigError(f"--n must be 0 or at least {min_samples('image')} to score samples, "
                          f"got {n}")
    s_test = encode_codes(vq, data.x_test)
    nll = code_nll(trained.model, s_test, conditions(cfg, data.y_test, len(s_test),
                                                     trained.model.null))
    K, L = vq.codebook_size, s_test.shape[1]
    metrics = {"test_nll_per_code": nll, "test_bits_per_code": nll / LN2,
               "test_nll_per_image": nll * L, "codebook_size": K, "codes_per_image": L,
               "temperature": options.temperature, "top_k": options.top_k,
               "top_p": options.top_p}
    baseline = {"test_nll_per_code": math.log(K), "test_bits_per_code": math.log2(K),
                "model": "uniform codes, decoded by the same autoencoder"}
    if n:
        x, labels = draw(trained, n, seed, options)
        metrics.update(score_samples(x, data))
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(len(data.x_train), generator=generator)[:n]
        reconstructions = decode_codes(vq, encode_codes(vq, data.x_train[index]))
        metrics.update(prefixed(score_samples(reconstructions, data), "reconstruction_"))
        random_codes = torch.randint(K, (n, L), generator=generator)
        baseline.update(score_samples(decode_codes(vq, random_codes), data))
        if labels is not None:
            # User data has no shipped classifier (score_samples notes it).
            with contextlib.suppress(FileNotFoundError):
                metrics["label_accuracy"] = accuracy(load_feature_net(data.name), x, labels)
        title = f"{cfg.METHOD} samples, {cfg.dataset}, T = {options.temperature:g}"
        run.save_figure(samples_figure(x, title, data.x_test), "samples.png")
    run.write_evaluation(metrics)
    run.write_evaluation(baseline, prefix="baseline")
    return {**metrics, **prefixed(baseline, "random_codes_")}
