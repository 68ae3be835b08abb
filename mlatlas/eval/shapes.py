"""Does an image show what its caption asks? The shape and colour of captioned shapes.

Scores samples of a text-to-image model trained on :mod:`mlatlas.data.shapes` by reading back
the two attributes every caption names:

* colour: the foreground F of an image x (3, 32, 32) is the pixels p that differ from the
  background b = 0.08 by more than a tolerance in some channel,
  F = {p : max_c |x_c(p) - b| > tol}; its mean colour m = (1/|F|) sum_{p in F} x(p) is matched to
  the nearest palette colour, argmin_k ||m - COLOURS_k||_2 (-1 when F is empty);
* shape: the argmax of the shipped shapes feature net (``weights/shapes.safetensors``), trained
  with :func:`recolour` so it judges the outline whatever the colour, held-out colour-shape
  pairs included.

:func:`caption_agreement` gives the share of images whose shape, colour and both match the asked
ones; :func:`parse_caption` turns a caption (any template, synonym or plural of
``shapes.caption``, or a user's prompt such as "a red circle") into the asked (shape, colour).
"""

from __future__ import annotations

import re

import torch

from mlatlas.data.shapes import COLOURS, IMAGE_SIZE, SHAPES
from mlatlas.eval.classifier import load_feature_net

BACKGROUND = 0.08
# Palette colours differ from the background by >= 0.67 in their brightest channel; 0.2 leaves
# room for a sampler's noise without counting noisy background as shape.
FOREGROUND_TOLERANCE = 0.2
PALETTE = torch.tensor(list(COLOURS.values()))
COLOUR_WORDS = {name: i for i, name in enumerate(COLOURS)}
SHAPE_WORDS = {word: i for i, shape in enumerate(SHAPES)
               for word in (shape, shape + ("es" if shape.endswith("s") else "s"))}


def check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a tensor, got {type(images).__name__}")
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"images must have shape (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}), "
                         f"got {tuple(images.shape)}")
    if len(images) == 0:
        raise ValueError("images is empty: need at least one image")
    return images.float()


def foreground(images: torch.Tensor, tolerance: float = FOREGROUND_TOLERANCE) -> torch.Tensor:
    """(N, 32, 32) bool: the pixels differing from the background by > tolerance somewhere."""
    return ((images - BACKGROUND).abs() > tolerance).any(dim=1)


def colour_of(images: torch.Tensor, tolerance: float = FOREGROUND_TOLERANCE) -> torch.Tensor:
    """(N,) long: the index into COLOURS nearest to each image's mean foreground colour; -1 for
    an image with no foreground."""
    images = check_images(images)
    mask = foreground(images, tolerance).unsqueeze(1)
    count = mask.sum(dim=(2, 3))
    mean = (images * mask).sum(dim=(2, 3)) / count.clamp(min=1)
    nearest = torch.cdist(mean, PALETTE).argmin(dim=1)
    return torch.where(count.view(-1) > 0, nearest, -1)


@torch.no_grad()
def shape_of(images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """(N,) long: the index into SHAPES that the shipped shapes net gives each image."""
    images = check_images(images)
    net = load_feature_net("shapes")
    return torch.cat([net(images[i:i + batch_size]).argmax(1)
                      for i in range(0, len(images), batch_size)])


def _asked(value: int | torch.Tensor, n: int, name: str, choices: int) -> torch.Tensor:
    """An asked attribute as (n,) indices; one int asks the same of every image."""
    asked = torch.as_tensor(value)
    if asked.is_floating_point() or asked.is_complex() or asked.dtype == torch.bool:
        raise ValueError(f"{name} must be integer indices, got {asked.dtype}")
    asked = asked.long().expand(n) if asked.ndim == 0 else asked.long()
    if asked.shape != (n,):
        raise ValueError(f"{name} must be one index or {n} indices (one per image), "
                         f"got shape {tuple(asked.shape)}")
    if asked.min() < 0 or asked.max() >= choices:
        raise ValueError(f"{name} indices must lie in [0, {choices - 1}], "
                         f"got [{int(asked.min())}, {int(asked.max())}]")
    return asked


def caption_agreement(images: torch.Tensor, shape: int | torch.Tensor,
                      colour: int | torch.Tensor) -> dict:
    """The share of images showing the asked shape, the asked colour, and both; ``shape`` and
    ``colour`` are indices into SHAPES and COLOURS, one per image or one for all."""
    images = check_images(images)
    n = len(images)
    shape = _asked(shape, n, "shape", len(SHAPES))
    colour = _asked(colour, n, "colour", len(COLOURS))
    shape_ok, colour_ok = shape_of(images) == shape, colour_of(images) == colour
    return {"shape_accuracy": float(shape_ok.double().mean()),
            "colour_accuracy": float(colour_ok.double().mean()),
            "both_accuracy": float((shape_ok & colour_ok).double().mean()), "n": n}


def parse_caption(text: str) -> tuple[int, int]:
    """(shape, colour) indices into SHAPES and COLOURS named by a caption.

    Reads words, not templates, so every template, size synonym and plural of
    ``shapes.caption`` parses, and so does a user's prompt such as "A red circle.". A caption
    must name exactly one shape and one colour (repeating a word is fine)."""
    if not isinstance(text, str):
        raise ValueError(f"a caption must be a string, got {type(text).__name__}")
    words = re.findall(r"[a-z]+", text.lower())
    shapes = {SHAPE_WORDS[w] for w in words if w in SHAPE_WORDS}
    colours = {COLOUR_WORDS[w] for w in words if w in COLOUR_WORDS}
    for found, kind, names in ((shapes, "shape", SHAPES), (colours, "colour", tuple(COLOURS))):
        if not found:
            raise ValueError(f"caption {text!r} names no {kind} (known: {', '.join(names)})")
        if len(found) > 1:
            raise ValueError(f"caption {text!r} names {len(found)} {kind}s "
                             f"({', '.join(names[i] for i in sorted(found))}); ask for one")
    return shapes.pop(), colours.pop()


def recolour(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation of the shapes net: each image's foreground is painted one random
    colour (brightest channel in [0.5, 1], so it stays foreground). Without it the net reads
    shape from colour, since some (colour, shape) pairs never occur in training, and misnames
    the zero-shot pairs (6% right instead of 98%)."""
    n = len(images)
    colour = torch.rand(n, 3, generator=generator)
    brightest = colour.argmax(dim=1)
    colour[torch.arange(n), brightest] = 0.5 + 0.5 * torch.rand(n, generator=generator)
    mask = foreground(images).unsqueeze(1)
    return torch.where(mask, colour.view(n, 3, 1, 1), images)
