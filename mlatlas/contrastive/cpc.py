"""CPC: contrastive predictive coding on sequences (van den Oord, Li and Vinyals 2018).

An encoder maps each step x_t of a sequence to a latent z_t = g_enc(x_t); an autoregressive
network summarises the past into a context c_t = g_ar(z_<=t) (a GRU). For every horizon
k = 1..K a linear map W_k predicts the future latent, scored log-bilinearly,

    f_k(x_{t+k}, c_t) = exp(z_{t+k}^T W_k c_t),

and the InfoNCE loss asks the true z_{t+k} to win against N - 1 negatives z_j,

    L_k = -E[ log( f_k(x_{t+k}, c_t) / sum_{x_j in X} f_k(x_j, c_t) ) ],   L = 1/K sum_k L_k.

Minimising L_k maximises a lower bound on the mutual information between the future step and
the context, I(x_{t+k}; c_t) >= log N - L_k, which can never exceed log N.

Negatives here are the *other sequences of the batch at the same time step*: at each t the B
predictions W_k c_t (one per sequence) and the B latents z_{t+k} form a B x B score matrix whose
diagonal holds the positives, so N = B. Same-time negatives keep the task about what tells one
sequence from another (its waveform, its digit) rather than where in a sequence a step lies.

Data-parallel, rank r holds n = B / W of the B sequences and scores its own predictions against
the latents of all B, gathered with their gradient (``all_gather_with_grad``): its loss L_k,r
averages the cross-entropy of its n (T - k) rows over B columns (labels r n + i), so the mean
over ranks is the whole batch's L_k, with N = B as in one process.

The encoder is a stack of strided 1-D convolutions padded on the left only, so z_t sees the raw
samples of windows <= t and nothing later; the GRU is causal too, so c_t depends on x_<=t alone.
Sequences are digit images read top to bottom, one row per step (mnist 28x28, the default;
digits 8x8), or generated signals (``mlatlas.data.signals``; 1024 samples, 16 per step).

``evaluate`` fits a linear probe (logistic regression) on the frozen features, the time-averaged
context mean_t c_t and latent mean_t z_t, for the trained model and for the same architecture
randomly initialised with the same seed; the probe accuracies, the test-set accuracy of picking
the positive and the bound log N - L_k per k go to ``summary.json`` (``eval/`` for the trained
model, ``baseline/`` for the random one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mlatlas.contrastive.common import (
    check_grad_clip,
    held_out,
    optimizer_step,
    train_scores,
    write_scores,
)
from mlatlas.contrastive.distributed import all_gather_with_grad
from mlatlas.core import distributed
from mlatlas.core.config import BatchConfig, ConfigError, closest, require_at_least
from mlatlas.core.optim import set_lr, warmup_cosine_lr
from mlatlas.core.plots import metric_curves, plt
from mlatlas.core.precision import Precision, compile_module
from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import resolve_device, seed_everything
from mlatlas.data import DatasetError, EpochBatches, load_digits, load_mnist
from mlatlas.data.signals import CLASSES as SIGNAL_CLASSES
from mlatlas.data.signals import load_signals

# (kernel sizes, strides) of g_enc per dataset: signals are downsampled 16x (one step per 16
# samples, overlapping windows as in the paper's speech encoder); image rows are one step each,
# so the encoder is a per-row MLP (kernel 1).
ENCODERS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "signals": ((8, 4, 4), (4, 2, 2)),
    "mnist": ((1, 1, 1), (1, 1, 1)),
    "digits": ((1, 1, 1), (1, 1, 1)),
}


@dataclass
class Config(BatchConfig):
    METHOD: ClassVar[str] = "cpc"
    SHARDED: ClassVar[tuple[str, ...]] = ("batch_size",)

    dataset: str = "mnist"
    """Sequences: mnist (28 rows of 28 pixels, read top to bottom), digits (8 rows of 8 pixels)
    or signals (generated waveforms in noise, 64 steps of 16 samples, 12 classes)."""
    n_train: int = 4000
    """Training signals generated for dataset=signals (the digit sets have fixed sizes)."""
    n_test: int = 1000
    """Test signals generated for dataset=signals."""
    prediction_steps: int = 4
    """K: predict z_{t+1} .. z_{t+K} from c_t, one linear map W_k each."""
    hidden: int = 64
    """Channels of the encoder's hidden convolutions."""
    z_dim: int = 64
    """Width of the latents z_t (encoder output)."""
    c_dim: int = 64
    """Width of the context c_t (GRU state)."""
    batch_size: int = 64
    """Sequences per step; the negatives of each positive are the other B - 1, so N = B and
    the bound log N - L_k is at most log B."""
    lr: float = 2e-3
    """Peak Adam learning rate."""
    warmup_steps: int = 50
    """Linear warm-up steps before the cosine decay."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this before each optimizer step (0: no clipping)."""
    steps: int = 600
    log_every: int = 25
    ckpt_every: int = 200

    def check(self) -> None:
        super().check()
        # The sequence sets are named in code (nothing is read), so the name is checked for
        # Python callers too, with the command line's message.
        self.check_data()
        require_at_least(self, 1, "prediction_steps", "hidden", "z_dim", "c_dim")
        require_at_least(self, 2, "batch_size", "n_train", "n_test")
        check_grad_clip(self)

    def check_data(self) -> None:
        """The sequence sets are not image datasets: the command line asks the config."""
        if self.dataset not in ENCODERS:
            raise DatasetError(f"unknown CPC dataset {self.dataset!r}"
                               f"{closest(self.dataset, ENCODERS)} (known: {', '.join(ENCODERS)})")


# --- the loss ----------------------------------------------------------------------------------

def cpc_loss(c: torch.Tensor, z: torch.Tensor, w: torch.Tensor, across_ranks: bool = False,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPC's InfoNCE with same-time negatives from the other sequences of the batch.

    ``c`` (B, T, D_c) contexts, ``z`` (B, T, D_z) latents, ``w`` (K, D_z, D_c) the maps W_k.
    Returns the mean loss L = 1/K sum_k L_k, the per-k losses L_k (K,) and the per-k share of
    (sequence, t) pairs whose positive scores highest (K,). Each L_k averages the cross-entropy
    of the B x B scores z_{t+k}^T W_k c_t over t = 0 .. T-k-1 (the rows of one t are
    ``info_nce(W_k c_t, z_{t+k}, temperature=1, normalize=False)``).

    ``across_ranks`` (training in a data-parallel job): the columns are every rank's latents,
    all-gathered with their gradient, and the B rows are this rank's share of them, so the mean
    over ranks of the returned values is their value for the global batch.
    """
    if c.dim() != 3 or z.dim() != 3 or c.shape[:2] != z.shape[:2]:
        raise ValueError(f"cpc_loss needs c (B, T, D_c) and z (B, T, D_z) with the same B and "
                         f"T, got {tuple(c.shape)} and {tuple(z.shape)}")
    if w.dim() != 3 or w.shape[1:] != (z.shape[2], c.shape[2]):
        raise ValueError(f"cpc_loss needs w (K, D_z, D_c) = (K, {z.shape[2]}, {c.shape[2]}), "
                         f"got {tuple(w.shape)}")
    (b, t_len, _), k_max = c.shape, len(w)
    # The keys z_j: this batch's latents, or every rank's, this rank's rows from ``first`` on.
    keys = all_gather_with_grad(z) if across_ranks else z
    first = distributed.rank() * b if across_ranks else 0
    if len(keys) < 2:
        raise ValueError(f"cpc_loss needs at least 2 sequences (one positive, one negative), "
                         f"got {len(keys)}")
    if k_max >= t_len:
        raise ValueError(f"cpc_loss: K={k_max} prediction steps need sequences longer than K "
                         f"steps, got T={t_len}")
    losses, accuracies = [], []
    for k in range(1, k_max + 1):
        prediction = c[:, :t_len - k] @ w[k - 1].T                           # W_k c_t
        # scores[t, i, j] = z_{j, t+k}^T W_k c_{i, t}: row i's positive is column first + i.
        scores = torch.einsum("itd,jtd->tij", prediction, keys[:, k:])
        labels = torch.arange(first, first + b, device=c.device).expand(t_len - k, b)
        losses.append(F.cross_entropy(scores.reshape(-1, len(keys)), labels.reshape(-1)))
        accuracies.append((scores.argmax(-1) == labels).float().mean())
    losses_k = torch.stack(losses)
    return losses_k.mean(), losses_k, torch.stack(accuracies).detach()


def mi_lower_bound(loss: torch.Tensor | float, n: int) -> torch.Tensor | float:
    """InfoNCE's bound on the mutual information, log N - L (nats); at most log N."""
    return math.log(n) - loss


# --- the model ---------------------------------------------------------------------------------

class CausalConv1d(nn.Conv1d):
    """A 1-D convolution padded by kernel - stride on the left only: output step i sees input
    samples up to the end of its own stride block (i + 1) * stride - 1, never later ones."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int):
        if kernel < stride:
            raise ValueError(f"kernel {kernel} shorter than stride {stride} would skip samples")
        super().__init__(in_channels, out_channels, kernel, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.kernel_size[0] - self.stride[0], 0)))


class CPC(nn.Module):
    """g_enc (causal strided convolutions), g_ar (a GRU) and the prediction maps W_k."""

    def __init__(self, in_channels: int, kernels: tuple[int, ...], strides: tuple[int, ...],
                 hidden: int, z_dim: int, c_dim: int, prediction_steps: int):
        super().__init__()
        widths = [in_channels] + [hidden] * (len(kernels) - 1) + [z_dim]
        layers: list[nn.Module] = []
        for i, (kernel, stride) in enumerate(zip(kernels, strides, strict=True)):
            layers += [CausalConv1d(widths[i], widths[i + 1], kernel, stride), nn.ReLU()]
        # No ReLU on z: the bilinear scores want latents of either sign.
        self.g_enc = nn.Sequential(*layers[:-1])
        self.g_ar = nn.GRU(z_dim, c_dim, batch_first=True)
        self.w = nn.Parameter(torch.randn(prediction_steps, z_dim, c_dim) / math.sqrt(c_dim))
        self.in_channels = in_channels
        self.samples_per_step = math.prod(strides)

    @property
    def prediction_steps(self) -> int:
        return len(self.w)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """z = g_enc(x): raw sequences (B, C, L) -> latents (B, T, D_z), T = L / stride."""
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"CPC expects sequences (B, {self.in_channels}, L), got "
                             f"{tuple(x.shape)}")
        if x.shape[2] % self.samples_per_step:
            raise ValueError(f"sequence length {x.shape[2]} is not a multiple of the encoder's "
                             f"{self.samples_per_step} samples per step")
        return self.g_enc(x).transpose(1, 2)

    def context(self, z: torch.Tensor) -> torch.Tensor:
        """c_t = g_ar(z_<=t): (B, T, D_z) -> (B, T, D_c)."""
        return self.g_ar(z)[0]

    def forward(self, x: torch.Tensor, across_ranks: bool = False,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L, L_k per k, accuracy per k) of a batch of sequences (B, C, L), the scores in
        float32 whatever autocast the networks ran under; ``across_ranks``: see ``cpc_loss``."""
        z = self.encode(x)
        c = self.context(z)
        with torch.autocast(x.device.type, enabled=False):
            return cpc_loss(c.float(), z.float(), self.w, across_ranks)

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch_size: int = 500) -> dict[str, torch.Tensor]:
        """Frozen representations for a probe: mean_t c_t and mean_t z_t."""
        c_mean, z_mean = [], []
        for i in range(0, len(x), batch_size):
            z = self.encode(x[i:i + batch_size])
            c_mean.append(self.context(z).mean(1))
            z_mean.append(z.mean(1))
        return {"c": torch.cat(c_mean), "z": torch.cat(z_mean)}


# --- data --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SequenceData:
    """Sequences (N, C, L) with class labels (N,)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]

    @property
    def channels(self) -> int:
        return self.x_train.shape[1]


def load_sequences(cfg: Config) -> SequenceData:
    if cfg.dataset == "signals":
        train, test = load_signals(cfg.n_train, cfg.n_test, seed=cfg.seed)
        return SequenceData("signals", train.x, train.y, test.x, test.y, SIGNAL_CLASSES)
    ds = load_mnist() if cfg.dataset == "mnist" else load_digits()

    def rows(images: torch.Tensor) -> torch.Tensor:
        # (N, 1, H, W) -> (N, W, H): the W pixels of a row are the channels, rows are time.
        return images[:, 0].transpose(1, 2).contiguous()

    return SequenceData(ds.name, rows(ds.x_train), ds.y_train, rows(ds.x_test), ds.y_test,
                        ds.classes)


def build_model(cfg: Config, data: SequenceData) -> CPC:
    kernels, strides = ENCODERS[cfg.dataset]
    model = CPC(data.channels, kernels, strides, cfg.hidden, cfg.z_dim, cfg.c_dim,
                cfg.prediction_steps)
    steps = data.x_train.shape[2] // model.samples_per_step
    if cfg.prediction_steps >= steps:
        raise ConfigError(f"--prediction-steps must be below the {steps} steps of a "
                          f"{cfg.dataset} sequence, got {cfg.prediction_steps}")
    return model


def random_model(cfg: Config, data: SequenceData) -> CPC:
    """The architecture as ``train`` initialises it (same seed), never trained: the baseline."""
    seed_everything(cfg.seed)
    return build_model(cfg, data)


# --- training and evaluation -------------------------------------------------------------------

def metric_names(k_max: int) -> list[str]:
    return [f"{kind}_k{k}" for kind in ("mi_bound", "accuracy") for k in range(1, k_max + 1)]


def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    """Minimise the CPC loss over batches of training sequences, then ``report``."""
    run = run or Run.create(cfg.METHOD, cfg)
    data = load_sequences(cfg)
    if cfg.batch_size > len(data.x_train):
        raise ConfigError(f"--batch-size {cfg.batch_size} exceeds the {len(data.x_train)} "
                          f"training sequences of {cfg.dataset}")
    device = resolve_device(cfg.device)
    model = random_model(cfg, data).to(device)
    for network in (model.g_enc, model.g_ar):
        compile_module(network, cfg.compile)
    precision = Precision(cfg.precision, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    x = data.x_train.to(device)
    batches = EpochBatches(len(x), cfg.batch_size, cfg.seed)
    log_n = math.log(cfg.batch_size)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        set_lr(optimizer, warmup_cosine_lr(cfg.lr, step, cfg.steps, cfg.warmup_steps))
        with precision.autocast():
            loss, losses_k, accuracies = model(x[distributed.shard(batches(step)).to(device)],
                                               across_ranks=True)
        optimizer_step(optimizer, loss, cfg.grad_clip, precision)
        bounds = log_n - losses_k.detach()
        return {"loss": loss.detach(),
                **{f"mi_bound_k{k + 1}": v for k, v in enumerate(bounds)},
                **{f"accuracy_k{k + 1}": v for k, v in enumerate(accuracies)}}

    fit(run, step_fn, total_steps=cfg.steps, objects={"model": model, "optimizer": optimizer,
                                                       "precision": precision},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress)
    if not distributed.is_main():
        return run  # the figures and the evaluation are rank 0's
    run.save_figure(metric_curves(run.metrics, ["loss"], title="CPC training loss"), "loss.png")
    report(run, cfg, model.cpu(), data)
    return run


@torch.no_grad()
def prediction_scores(model: CPC, x: torch.Tensor, batch_size: int) -> dict[str, list[float]]:
    """Per-k test loss L_k, bound log N - L_k and accuracy of picking the positive, averaged
    over consecutive batches of ``batch_size`` sequences (N = batch_size, as in training)."""
    n_batches = len(x) // batch_size
    if n_batches == 0:
        raise ValueError(f"need at least {batch_size} sequences to score, got {len(x)}")
    losses = torch.zeros(model.prediction_steps)
    accuracies = torch.zeros(model.prediction_steps)
    for i in range(n_batches):
        _, losses_k, accuracies_k = model(x[i * batch_size:(i + 1) * batch_size])
        losses += losses_k / n_batches
        accuracies += accuracies_k / n_batches
    return {"loss": losses.tolist(),
            "mi_bound": [mi_lower_bound(v, batch_size) for v in losses.tolist()],
            "accuracy": accuracies.tolist()}


def scores(model: CPC, data: SequenceData, x_test: torch.Tensor, y_test: torch.Tensor,
           batch: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Linear probes of mean_t c_t and mean_t z_t (trained on every training sequence, scored
    on ``x_test``) and the per-k test accuracy of picking the positive and bound log N - L_k
    over batches of ``batch`` sequences; also the per-k lists the figure draws."""
    from mlatlas.eval.metrics import linear_probe_accuracy

    train_f, test_f = model.features(data.x_train), model.features(x_test)
    out = {f"linear_probe_accuracy{suffix}": linear_probe_accuracy(
        train_f[name], data.y_train, test_f[name], y_test) for name, suffix in (("c", ""),
                                                                               ("z", "_z"))}
    per_k = prediction_scores(model, x_test, batch)
    for kind in ("mi_bound", "accuracy"):
        for k, value in enumerate(per_k[kind], 1):
            out[f"{kind}_k{k}"] = value
    return out, per_k


def report(run: Run, cfg: Config, model: CPC, data: SequenceData, n: int | None = None,
           seed: int = 0) -> dict[str, float]:
    """Probes and per-k prediction scores of the trained model (``eval/``) and of the same
    architecture at its random initialisation (``baseline/``) on ``n`` held-out test sequences
    drawn with ``seed`` (see :func:`evaluate`); writes ``summary.json`` and ``prediction.png``
    and returns the trained model's scores."""
    model.eval()
    index = held_out(len(data.x_test), n, seed)
    x_test, y_test = data.x_test[index], data.y_test[index]
    if len(x_test) < 2:
        raise ValueError(f"CPC's evaluation needs at least 2 test sequences, got {len(x_test)}")
    batch = min(cfg.batch_size, len(x_test))
    trained, per_k = scores(model, data, x_test, y_test, batch)
    random, random_per_k = scores(random_model(cfg, data).eval(), data, x_test, y_test, batch)
    context = {"examples": len(x_test), "seed": seed, "batch_size": batch,
               "log_n": math.log(batch), "probe_chance": 1 / len(data.classes)}
    write_scores(run, train_scores(run, data.name), {**trained, **context}, random)
    run.save_figure(prediction_figure(per_k, random_per_k, batch, data.name,
                                      trained["linear_probe_accuracy"],
                                      random["linear_probe_accuracy"]), "prediction.png")
    return trained


def prediction_figure(trained: dict[str, list[float]], random: dict[str, list[float]], n: int,
                      dataset: str, probe: float, random_probe: float):
    """Accuracy of picking the positive among N and the bound log N - L_k, per k (test set)."""
    ks = list(range(1, len(trained["accuracy"]) + 1))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, kind, top, label in ((axes[0], "accuracy", 1 / n, f"chance 1/N = 1/{n}"),
                                 (axes[1], "mi_bound", math.log(n), f"log N = {math.log(n):.2f}")):
        ax.plot(ks, trained[kind], "o-", label="CPC")
        ax.plot(ks, random[kind], "s--", label="random init")
        ax.axhline(top, color="grey", lw=0.8, ls=":", label=label)
        ax.set_xlabel("prediction step k")
        ax.set_xticks(ks)
        # From zero, so that a model at chance does not look like a trend.
        ax.set_ylim(bottom=min(0.0, *random[kind]) - 0.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("accuracy of picking z_{t+k}")
    axes[1].set_ylabel("log N - L_k (nats)")
    fig.suptitle(f"CPC on {dataset}: linear probe {probe:.1%} (random init "
                 f"{random_probe:.1%})")
    fig.tight_layout()
    return fig


def load_model(run: Run) -> tuple[Config, CPC, SequenceData]:
    cfg = run.load_config(Config)
    data = load_sequences(cfg)
    model = build_model(cfg, data)
    run.load_weights(model)
    return cfg, model, data


def evaluate(run: Run, n: int | None = None, seed: int = 0,
             progress: bool | None = None) -> dict[str, float]:
    """Linear probes of mean_t c_t and mean_t z_t and the per-k test accuracy and bound
    log N - L_k (N = min(batch size, n)) from the run's checkpoint, on ``n`` held-out test
    sequences (None: all of the test split, ``n_test`` for signals); the same scores of the
    architecture at its initialisation (rebuilt from the run's seed) go to ``summary.json`` as
    ``baseline/``. ``seed`` draws which ``n`` sequences (with all of them, nothing is drawn;
    consecutive sequences form the batches whose other members are the negatives); the probes
    (L-BFGS from zero on a convex loss) and the encoders are deterministic. Returns the trained
    model's scores (``eval/`` in the summary)."""
    cfg, model, data = load_model(run)
    return report(run, cfg, model, data, n, seed)
