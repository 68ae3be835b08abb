"""The small CNN classifiers whose features image metrics are computed on.

Frechet distance and precision/recall need a feature space in which real images of one class lie
together. Inception (as in FID) does not fit 8x8 or 28x28 digits and cannot be downloaded here,
so the project trains one small CNN per image dataset and ships its weights in
``mlatlas/eval/weights/<dataset>.safetensors``, the test accuracy in the file's metadata. Each
grayscale net is trained on grayscale and binarised images alike, so one net serves ``<dataset>``
and ``<dataset>-binary``. Colour sets (``shapes``: 3 channels, 4 shape classes) have no binarised
variant, so their nets see only the colour images and record no binarised accuracy. Reproduce
the shipped weights with ``mlatlas classifier digits mnist fashion-mnist shapes``
(``make classifiers``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mlatlas.core.io import load_tensors, read_metadata, save_tensors
from mlatlas.core.progress import progress_bar
from mlatlas.data import Dataset, EpochBatches, load_dataset

WEIGHTS_DIR = Path(__file__).parent / "weights"
FEATURE_DIM = 128
TRAIN_STEPS = {"digits": 1500, "mnist": 3000, "fashion-mnist": 4000, "shapes": 500}
# Shapes (32x32 RGB) cost ~0.18 s a step on one core: a higher rate reaches 0.99 in 500 steps.
LEARNING_RATE = {"shapes": 2e-3}


class FeatureNet(nn.Module):
    """conv32 -> conv64/2 -> conv128/2 -> global average -> 128-d features -> classes."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(128, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * 2 - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def base_name(dataset: str) -> str:
    return dataset.removesuffix("-binary")


def weights_path(dataset: str) -> Path:
    return WEIGHTS_DIR / f"{base_name(dataset)}.safetensors"


@torch.no_grad()
def accuracy(net: FeatureNet, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((net(x).argmax(1) == y).double().mean())


def train_classifier(dataset: Dataset, steps: int, seed: int = 0, batch_size: int = 128,
                     lr: float = 1e-3, progress: bool | None = None,
                     augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                     ) -> tuple[FeatureNet, dict]:
    """Train a FeatureNet on ``dataset`` (images in [0, 1]); for one-channel images half of
    each batch is binarised, so the net also serves the ``-binary`` variant. ``augment(x,
    generator)``, if given, transforms each batch (see :func:`augmentation`)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = FeatureNet(dataset.sample_shape[0], dataset.num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    batches = EpochBatches(len(dataset.x_train), batch_size, seed)
    # Thresholding each channel of a colour image changes its colour: only grayscale has -binary.
    grayscale = dataset.sample_shape[0] == 1
    for step in progress_bar(range(1, steps + 1), desc=f"classifier {dataset.name}",
                             progress=progress):
        idx = batches(step)
        x, y = dataset.x_train[idx], dataset.y_train[idx]
        if grayscale:
            binary = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(binary[:, None, None, None], (x > 0.5).float(), x)
        if augment is not None:
            x = augment(x, generator)
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    stats = {"test_accuracy": accuracy(net, dataset.x_test, dataset.y_test)}
    if grayscale:
        stats["test_accuracy_binary"] = accuracy(net, (dataset.x_test > 0.5).float(),
                                                 dataset.y_test)
    stats.update(steps=steps, seed=seed, dataset=dataset.name)
    if lr != 1e-3:
        stats["lr"] = lr
    if augment is not None:
        stats["augmentation"] = augment.__name__
    return net, stats


def save_classifier(net: FeatureNet, stats: dict, path: Path) -> None:
    save_tensors(path, net.state_dict(), metadata={k: str(v) for k, v in stats.items()})


def load_feature_net(dataset: str) -> FeatureNet:
    """The shipped feature network for an image dataset (or its binarised variant)."""
    path = weights_path(dataset)
    if not path.is_file():
        raise FileNotFoundError(
            f"no feature network ships for {dataset!r}; Frechet distance and precision/recall "
            "are available for "
            f"{', '.join(p.stem for p in sorted(WEIGHTS_DIR.glob('*.safetensors')))}")
    tensors = load_tensors(path)
    net = FeatureNet(tensors["body.0.weight"].shape[1], tensors["head.weight"].shape[0])
    net.load_state_dict(tensors)
    return net.eval()


def classifier_info(dataset: str) -> dict[str, str]:
    return read_metadata(weights_path(dataset))


@torch.no_grad()
def image_features(net: FeatureNet, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([net.features(images[i:i + batch_size])
                      for i in range(0, len(images), batch_size)])


def augmentation(dataset: str) -> Callable | None:
    """The batch augmentation a dataset's net trains with: shapes are recoloured, so the net
    judges the outline and not the colour (some colour-shape pairs are held out of training)."""
    if base_name(dataset) == "shapes":
        from mlatlas.eval.shapes import recolour  # imports this module: import it only here

        return recolour
    return None


def main(names: list[str], out_dir: Path = WEIGHTS_DIR) -> None:
    for name in names:
        dataset = load_dataset(base_name(name))
        net, stats = train_classifier(dataset, TRAIN_STEPS.get(dataset.name, 2000),
                                      lr=LEARNING_RATE.get(dataset.name, 1e-3),
                                      augment=augmentation(dataset.name))
        path = out_dir / f"{dataset.name}.safetensors"
        save_classifier(net, stats, path)
        binarised = (f" (binarised {stats['test_accuracy_binary']:.4f})"
                     if "test_accuracy_binary" in stats else "")
        print(f"{dataset.name}: test accuracy {stats['test_accuracy']:.4f}{binarised} -> {path}")
