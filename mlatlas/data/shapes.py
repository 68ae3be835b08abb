"""Captioned shapes: generated image-text pairs with structure to test composition.

Each 32x32 RGB image shows ``count`` (1-3) copies of one shape (circle, square, triangle, cross)
in one colour (6) and one size (small, large), placed independently at random on a dark
background (copies may touch or overlap, as objects in photographs do). The
caption names them from one of several templates and synonyms ("two large red circles", "a
picture of two big red circles", ...), and a single shape's side ("a tiny blue square on the
left"), so a model must read attributes, not memorise strings.

Zero-shot splits: a seeded choice of (colour, shape) combinations never appears in the train
split; the ``zero-shot`` split holds only those combinations, each attribute having been seen in
training with other partners. ``corrupt`` replaces a share of the captions with the caption of
another image (CapFilt's noisy web text), and says which.

Everything is a function of the seed: the same arguments give the same images and captions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95),
           "yellow": (0.95, 0.85, 0.1), "purple": (0.6, 0.2, 0.8), "orange": (1.0, 0.55, 0.0)}
SIZES = ("small", "large")
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
TEMPLATES = ("{count} {size} {colour} {shape}", "a picture of {count} {size} {colour} {shape}",
             "an image with {count} {colour} {shape}, {size}", "{count} {colour} {size} {shape}")
RADIUS = {"small": 3.5, "large": 6.5}
IMAGE_SIZE = 32
HELD_OUT_SHARE = 0.25


@dataclass
class CaptionedShapes:
    """``images`` (N, 3, 32, 32) in [0, 1]; ``captions`` N strings; ``attributes`` name -> (N,)
    indices into SHAPES, COLOURS, SIZES, the count (1-3) and whether the (first) shape is left
    of centre; ``corrupted`` (N,) bool marks the captions that describe another image."""

    images: torch.Tensor
    captions: list[str]
    attributes: dict[str, torch.Tensor]
    corrupted: torch.Tensor

    def __len__(self) -> int:
        return len(self.captions)


def held_out_pairs(seed: int = 0) -> set[tuple[int, int]]:
    """The (colour, shape) index pairs kept out of training: a quarter, chosen so that every
    colour and every shape still appears in training with another partner."""
    rng = np.random.default_rng(seed)
    n_colours, n_shapes = len(COLOURS), len(SHAPES)
    while True:
        pairs = {(c, s) for c in range(n_colours) for s in range(n_shapes)
                 if rng.random() < HELD_OUT_SHARE}
        seen_colours = {c for c in range(n_colours) for s in range(n_shapes)
                        if (c, s) not in pairs}
        seen_shapes = {s for c in range(n_colours) for s in range(n_shapes)
                       if (c, s) not in pairs}
        if pairs and len(seen_colours) == n_colours and len(seen_shapes) == n_shapes:
            return pairs


def caption(shape: int, colour: int, size: int, count: int, template: int, word: int,
            left: bool) -> str:
    noun = SHAPES[shape] + ("es" if SHAPES[shape] == "cross" and count > 1
                            else "s" if count > 1 else "")
    text = TEMPLATES[template].format(count=COUNT_WORDS[count], colour=list(COLOURS)[colour],
                                      size=SIZE_WORDS[SIZES[size]][word], shape=noun)
    if count == 1:
        text += " on the left" if left else " on the right"
    return text


def shape_mask(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor,
               radius: torch.Tensor) -> torch.Tensor:
    """The pixels each shape covers: ``shape`` (N,) indices into SHAPES; ``dx``, ``dy`` (N, H, W)
    offsets of the pixel centres from the shape's centre (y pointing down); ``radius`` (N, 1, 1)
    or anything broadcasting to (N, H, W). Returns (N, H, W) bool. The one formula that
    captioned shapes and :mod:`mlatlas.data.detection` both draw with."""
    kinds = torch.stack([
        dx.square() + dy.square() <= radius.square(),                      # circle
        (dx.abs() <= radius * 0.85) & (dy.abs() <= radius * 0.85),          # square
        (dy <= radius * 0.8) & (dx.abs() <= (dy + radius) * 0.55),          # triangle
        ((dx.abs() <= radius * 0.3) | (dy.abs() <= radius * 0.3))          # cross
        & (dx.abs() <= radius) & (dy.abs() <= radius),
    ])
    return kinds[shape, torch.arange(len(shape))]


def render(shape: torch.Tensor, colour: torch.Tensor, size: torch.Tensor, count: torch.Tensor,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 32, 32) images of the attributes, drawn at random positions (vectorised over N;
    the loop runs over the at most 3 copies), and whether the first copy is left of centre."""
    n = len(shape)
    grid = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    y, x = grid.view(1, -1, 1), grid.view(1, 1, -1)
    radius = torch.tensor([RADIUS[s] for s in SIZES])[size].view(n, 1, 1)
    mask = torch.zeros(n, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    for copy in range(3):
        margin = radius.view(n) + 0.5
        cx = margin + torch.rand(n, generator=generator) * (IMAGE_SIZE - 2 * margin)
        cy = margin + torch.rand(n, generator=generator) * (IMAGE_SIZE - 2 * margin)
        dx, dy = x - cx.view(n, 1, 1), y - cy.view(n, 1, 1)
        drawn = shape_mask(shape, dx, dy, radius)
        mask |= drawn & (copy < count).view(n, 1, 1)
        if copy == 0:
            left = cx < IMAGE_SIZE / 2
    rgb = torch.tensor(list(COLOURS.values()))[colour].view(n, 3, 1, 1)
    background = torch.full((n, 3, 1, 1), 0.08)
    images = torch.where(mask.unsqueeze(1), rgb, background)
    return images.expand(n, 3, IMAGE_SIZE, IMAGE_SIZE).contiguous(), left


def captioned_shapes(n: int, seed: int = 0,
                     split: Literal["train", "test", "zero-shot"] = "train",
                     corrupt: float = 0.0, holdout_seed: int = 0) -> CaptionedShapes:
    """``n`` image-caption pairs of ``split``: 'train' and 'test' avoid the held-out (colour,
    shape) pairs of ``held_out_pairs(holdout_seed)``, 'zero-shot' has only those. ``corrupt``
    is the share of captions swapped for another image's."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if split not in ("train", "test", "zero-shot"):
        raise ValueError(f"split must be train, test or zero-shot, got {split!r}")
    if not 0.0 <= corrupt <= 1.0:
        raise ValueError(f"corrupt must be in [0, 1], got {corrupt}")
    # Train and test draw from disjoint seeds so that no test image is a train image.
    offset = {"train": 0, "test": 1, "zero-shot": 2}[split]
    generator = torch.Generator().manual_seed(seed * 3 + offset)
    held = torch.zeros(len(COLOURS), len(SHAPES), dtype=torch.bool)
    for c, s in held_out_pairs(holdout_seed):
        held[c, s] = True
    allowed = held if split == "zero-shot" else ~held
    pairs = allowed.nonzero()
    pick = pairs[torch.randint(len(pairs), (n,), generator=generator)]
    colour, shape = pick[:, 0], pick[:, 1]
    size = torch.randint(len(SIZES), (n,), generator=generator)
    count = torch.randint(1, 4, (n,), generator=generator)
    template = torch.randint(len(TEMPLATES), (n,), generator=generator)
    word = torch.randint(3, (n,), generator=generator)
    images, left = render(shape, colour, size, count, generator)
    captions = [caption(*map(int, a)) for a in zip(shape, colour, size, count, template, word,
                                                    left, strict=True)]
    corrupted = torch.rand(n, generator=generator) < corrupt
    if corrupted.any() and n > 1:
        # A corrupted caption is another image's (shifted by 1..n-1, so never its own).
        shift = torch.randint(1, n, (n,), generator=generator)
        source = (torch.arange(n) + shift) % n
        captions = [captions[int(source[i])] if corrupted[i] else captions[i] for i in range(n)]
    else:
        corrupted = torch.zeros(n, dtype=torch.bool)
    return CaptionedShapes(images, captions, {"shape": shape, "colour": colour, "size": size,
                                              "count": count, "left": left}, corrupted)
