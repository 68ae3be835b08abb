r"""SPP-net (He et al. 2014): a classifier that takes images of any size through spatial pyramid
pooling.

A convolutional trunk maps an image of any size a x a to a map of size about a/4 x a/4. Spatial
pyramid pooling (:func:`mlatlas.vision.pooling.spp`) max-pools that map into n x n bins for
each level n in ``levels`` (default 1, 2, 4), so the vector always has C sum_n n^2 entries, and
a fully connected classifier reads it:

    logits = MLP(SPP(conv(x)))          L = CE(logits, y)

A fixed-size network (flatten, then a linear layer) accepts only the size it was built for. Here
the same weights score any size. With ``train_sizes`` of several sides, each step resizes its
batch to the next side in turn (the paper's multi-size training, with bilinear resizing standing
in for its crops). The evaluation measures accuracy at the training sides and at sides never
seen (``test_sizes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mlatlas.core import distributed
from mlatlas.core.config import BatchConfig, ConfigError, require_at_least
from mlatlas.core.optim import set_lr, warmup_cosine_lr
from mlatlas.core.plots import metric_curves
from mlatlas.core.precision import Precision, compile_module
from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import resolve_device, seed_everything
from mlatlas.data import Dataset, EpochBatches, load_dataset
from mlatlas.vision.pooling import spp


def parse_ints(text: str, flag: str, minimum: int) -> tuple[int, ...]:
    """``"20,28,36"`` -> (20, 28, 36); a ConfigError naming ``flag`` unless every entry is an
    integer of at least ``minimum``."""
    try:
        values = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if min(values) < minimum:
        raise ConfigError(f"{flag} entries must be at least {minimum}, got {text!r}")
    return values


def parse_sides(text: str, flag: str) -> tuple[int, ...]:
    return parse_ints(text, flag, 8)


def parse_levels(text: str) -> tuple[int, ...]:
    return parse_ints(text, "--levels", 1)


class SPPNet(nn.Module):
    """conv trunk (stride 4) -> SPP over ``levels`` -> MLP -> class logits."""

    def __init__(self, channels: int, classes: int, width: int, levels: tuple[int, ...]):
        super().__init__()
        self.levels = levels
        w = width
        self.trunk = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.ReLU())
        features = 2 * w * sum(n * n for n in levels)
        self.classifier = nn.Sequential(nn.Linear(features, 128), nn.ReLU(),
                                        nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(spp(self.trunk(x), self.levels))


@dataclass
class Config(BatchConfig):
    METHOD: ClassVar[str] = "spp_net"
    RESUMABLE: ClassVar[frozenset[str]] = BatchConfig.RESUMABLE | {"test_sizes"}

    dataset: str = "mnist"
    """Labelled image data: a name from `mlatlas list` or an image folder."""
    train_sizes: str = "20,28,36"
    """Image sides the training batches are resized to, in turn."""
    test_sizes: str = "14,20,28,36,44,56"
    """Image sides the evaluation measures accuracy at (sides outside train_sizes are unseen)."""
    levels: str = "1,2,4"
    """Pyramid levels: each n pools the map into n x n bins."""
    steps: int = 1200
    """Optimisation steps."""
    batch_size: int = 64
    """Images per step."""
    lr: float = 2e-3
    """Peak learning rate of Adam (linear warm-up over min(50, steps / 5) steps, then cosine)."""
    width: int = 32
    """Channels of the first convolutions (2 width after the second stride)."""

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "width")
        levels = parse_levels(self.levels)
        for flag, text in (("--train-sizes", self.train_sizes),
                           ("--test-sizes", self.test_sizes)):
            smallest = min(parse_sides(text, flag))
            if -(-smallest // 4) < max(levels):
                raise ConfigError(f"{flag}: a {smallest}-pixel image gives a "
                                  f"{-(-smallest // 4)}-wide map, too small for the "
                                  f"{max(levels)}x{max(levels)} level")

    def check_data(self) -> None:
        load_data(self)


def load_data(cfg: Config) -> Dataset:
    data = load_dataset(cfg.dataset)
    if data.kind != "image" or not data.num_classes:
        raise ConfigError(f"spp_net needs labelled images; {cfg.dataset} is not")
    return data


def resize(x: torch.Tensor, side: int) -> torch.Tensor:
    """Images resized to side x side (bilinear, antialiased when shrinking)."""
    if x.shape[-1] == side and x.shape[-2] == side:
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True,
                         align_corners=False)


def build_model(cfg: Config, data: Dataset) -> SPPNet:
    return SPPNet(data.sample_shape[0], data.num_classes, cfg.width, parse_levels(cfg.levels))


def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    """Train (or resume) the classifier, cycling through ``train_sizes``."""
    run = run or Run.create(cfg.METHOD, cfg)
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    generator = seed_everything(cfg.seed)
    model = build_model(cfg, data).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    precision = Precision(cfg.precision, device)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    batches = EpochBatches(len(x_train), cfg.batch_size, cfg.seed)
    sides = parse_sides(cfg.train_sizes, "--train-sizes")
    compile_module(model, cfg.compile)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        set_lr(optimizer, warmup_cosine_lr(cfg.lr, step, cfg.steps, min(50, cfg.steps // 5)))
        index = distributed.shard(batches(step)).to(device)
        x = resize(x_train[index], sides[(step - 1) % len(sides)])
        with precision.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y_train[index])
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer, model.parameters(), 0.0)
        accuracy = (logits.argmax(1) == y_train[index]).float().mean()
        return {"loss": loss.detach(), "accuracy": accuracy}

    fit(run, step_fn, total_steps=cfg.steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
        objects={"model": model, "optimizer": optimizer, "rng": generator,
                 "precision": precision}, progress=progress)
    if not distributed.is_main():
        return run
    run.save_figure(metric_curves(run.metrics, ["loss", "accuracy"], log=False,
                                  title="spp_net: training"), "loss.png")
    run.write_summary({"train/steps": cfg.steps, "train/loss": run.last_row()["loss"],
                       "train/feature_length": 2 * cfg.width * sum(
                           n * n for n in parse_levels(cfg.levels))})
    evaluate(run, progress=progress)
    return run


@torch.no_grad()
def accuracy(model: SPPNet, x: torch.Tensor, y: torch.Tensor, side: int,
             batch: int = 500) -> float:
    device = next(model.parameters()).device
    right = sum(int((model(resize(x[i:i + batch].to(device), side)).argmax(1).cpu()
                     == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return right / len(x)


def evaluate(run: Run, n: int | None = None, seed: int = 0, progress: bool | None = None) -> dict:
    """Test accuracy at every side of ``test_sizes`` and ``train_sizes`` (n test images, None:
    all); writes accuracy.png and ``eval/accuracy_<side>`` (``eval/unseen_sides`` lists the
    sides not trained at)."""
    cfg = run.load_config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"{run.dir} is a {run.method} run, not spp_net's")
    data = load_data(cfg)
    model = build_model(cfg, data)
    run.load_weights(model, "model")
    model = model.to(resolve_device(cfg.device)).eval()
    x, y = data.x_test[:n], data.y_test[:n]
    trained = parse_sides(cfg.train_sizes, "--train-sizes")
    sides = sorted(set(parse_sides(cfg.test_sizes, "--test-sizes")) | set(trained))
    scores = {side: accuracy(model, x, y, side) for side in sides}
    metrics = {f"accuracy_{side}": v for side, v in scores.items()}
    unseen = [s for s in sides if s not in trained]
    metrics["unseen_sides"] = ",".join(map(str, unseen))
    if unseen:
        metrics["unseen_accuracy"] = sum(scores[s] for s in unseen) / len(unseen)
    run.save_figure(_accuracy_figure(scores, trained, cfg), "accuracy.png")
    run.write_evaluation(metrics)
    return metrics


def _accuracy_figure(scores: dict[int, float], trained: tuple[int, ...], cfg: Config):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    sides = list(scores)
    ax.plot(sides, [scores[s] for s in sides], "o-", c="C0")
    for s in sides:
        ax.scatter([s], [scores[s]], c="C1" if s in trained else "C3", zorder=3)
    ax.scatter([], [], c="C1", label="trained side")
    ax.scatter([], [], c="C3", label="unseen side")
    ax.set_xlabel("image side (pixels)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"spp_net on {cfg.dataset}, levels {cfg.levels}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
