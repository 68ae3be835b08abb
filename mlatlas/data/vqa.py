"""Generated image-question-answer sets whose answers can be checked from the pixels.

Six tasks (``CATEGORIES``), drawn with the shapes and colours of :mod:`mlatlas.data.shapes`
(``shape_mask``, ``COLOURS``) on its dark background (0.08), and the real 8x8 handwritten
digits of :func:`mlatlas.data.load_digits`:

==========  ==========================================  ========================================
task        image                                       question -> answer (options)
==========  ==========================================  ========================================
count       1-4 copies of one shape in one colour       "how many circles are there?" -> "3"
                                                        (the four counts 1-4)
colour      1-3 copies of one shape in one colour       "what colour is the square?" -> "red"
                                                        (the answer and 3 other colours)
shape       one shape                                   "what shape is shown?" -> "triangle"
                                                        (the four shapes)
position    two objects differing in shape or colour    "where is the red circle relative to
                                                        the blue cross?" -> "left" (left, right,
                                                        above, below)
compare     two shapes, counts c_a != c_b, c_a + c_b    "are there more circles or squares?"
            <= 5, each kind in one colour (the two      -> the kind with more (the four shapes)
            colours may agree)
ocr         2-4 digits (at most W / 8) side by side,    "what number is written?" -> "384" (the
            scale 1x or 2x, in a colour: pixel =        answer and 3 strings, all four one digit
            0.08 + v (c - 0.08) for digit intensity v   away from a hidden centre, so that the
                                                        options alone do not tell the answer)
==========  ==========================================  ========================================

Every question comes from one of a few templates, so a model must read the words. The answer
rules, for centres (x, y) in pixels with y pointing down: count is the number of copies; the
position of A relative to B, d = c_A - c_B, is "left" when d_x < 0 and |d_x| > 2 |d_y|, "right"
when d_x > 0 and |d_x| > 2 |d_y|, "above" when d_y < 0 and |d_y| > 2 |d_x|, "below" when d_y > 0
and |d_y| > 2 |d_x| (the relation is drawn first, and B placed so that it holds, so the dominant
axis is never ambiguous). Each image has a caption from the same attributes ("three red
circles", "a blue square left of a green cross", "two red circles and three green squares",
"the number 384 in yellow") for caption pre-training. An OCR answer is the digit string as
drawn, leading zeros kept ("07"); its L digits are uniform, each written with a uniform image
of its class, at 2x with probability 1/2 where 16 L <= W, the strip's top-left pixel uniform
among those that keep it inside the image.

**Geometry.** All objects of an image share one radius r, uniform in [min(3, r_max), r_max] with

    r_max = min(6, sqrt(H W / (16 K)), (min(H, W) - 3) / 6.56)   (the last only for K >= 2)

for K the most objects the task draws (count 4, colour 3, shape 1, position 2, compare 5, so
that the radius says nothing about the count): the second bound keeps K of them from crowding
the image, the third lets two
objects stack along the short side with room to spare (2 (r + 0.5) of border, 2.56 r + 2
between centres, 2 r of slack). A centre keeps r + 0.5 pixels from the border, so no object is
cut, and two centres are at least 2.56 r + 2 apart: every shape lies within 1.28 r of its centre
(the triangle's base corners), so the pixels of different copies are at least 2 pixels apart
and the copies are separate 8-connected components, which makes counting checkable. Centres
are placed one copy after another, each the first of 128 uniform candidates that keeps its
distance; an image whose copy finds no candidate is placed again (its radius kept). The two
objects of a position question are placed as a pair instead: the offset along the relation's
axis uniform between the separation and the room there, across it uniform below half of that,
the pair then shifted uniformly within the image.

**Sizes.** H and W are multiples of 8 (4-pixel patches and a 2x2 pixel shuffle) between 24 and
64 (24 so two objects of radius 3 stack with their gap). ``TRAIN_SIZES`` are the sizes of the
train and test splits; ``UNSEEN_SIZES``, none of them a train size, are larger or of other
aspect ratios, for the claim that accuracy holds at native resolutions not seen in training.
Each item's size is uniform among the sizes of its split.

**Splits.** 'train' and 'test' are drawn from different seeds and at ``TRAIN_SIZES``; 'unseen'
from a third seed at ``UNSEEN_SIZES``. OCR images of 'train' use only the 1,437 digits of the
digits train split, 'test' and 'unseen' only its 360 test digits (the stratified split of
:func:`mlatlas.data.load_digits`, fixed seed 0; no test digit equals a train digit pixel for
pixel). A shapes image of the test split is a fresh draw, not checked against the train split:
a single-object image can coincide with a train image by chance, rarely.

**Determinism.** Everything is a function of (n, seed, split, sizes, categories): the same call
gives the same images, questions, options and their order. ``vqa_set`` balances the categories
(n // C each, the first n mod C one more), and returns the items in a seeded random order.

**Multiple choice.** ``options`` hold the answer at a random position (``answer_index``);
:func:`write_mmbench_tsv` writes them in the MMBench TSV layout of
:mod:`mlatlas.eval.circular` (one row per question: CircularEval's rotations are built when the
file is read), the image as a base64 PNG.
"""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mlatlas.core.config import closest
from mlatlas.core.io import atomic_path
from mlatlas.data.shapes import COLOURS, SHAPES, shape_mask
from mlatlas.eval import circular

CATEGORIES = ("count", "colour", "shape", "position", "compare", "ocr")
L2_CATEGORIES = {"count": "perception", "colour": "perception", "shape": "perception",
                 "position": "reasoning", "compare": "reasoning", "ocr": "reasoning"}
SPLITS = ("train", "test", "unseen")
TRAIN_SIZES = ((32, 32), (32, 48), (48, 32), (48, 48), (24, 48))
UNSEEN_SIZES = ((64, 64), (32, 64), (64, 40), (40, 56), (56, 32), (24, 64))
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 24, 64, 8
RELATIONS = ("left", "right", "above", "below")
RELATION_WORDS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUND = 0.08
MAX_COUNT = 4
MAX_COLOUR_COPIES = 3
MAX_COMPARE_TOTAL = 5
OCR_DIGITS = (2, 4)
R_MIN, R_MAX = 3.0, 6.0
CROWDING = 16.0
# Every shape of shape_mask lies within 1.28 r of its centre (the triangle's base corners at
# (+-0.99 r, 0.8 r)); a gap of 2 pixels keeps copies from touching even diagonally.
EXTENT, GAP = 1.28, 2.0
CANDIDATES = 128
RESTARTS = 64
N_OPTIONS = 4
_SPLIT_OFFSET = {"train": 0, "test": 1, "unseen": 2}

TEMPLATES = {
    "count": ("how many {nouns} are there?", "count the {nouns} in the image.",
              "what is the number of {nouns} in the picture?"),
    "colour": ("what colour {be} the {noun}?", "which colour {be} the {noun} in the image?",
               "name the colour of the {noun}."),
    "shape": ("what shape is shown?", "which shape is in the image?",
              "name the shape in the picture."),
    "position": ("where is the {a} relative to the {b}?",
                 "is the {a} left of, right of, above or below the {b}?",
                 "where is the {a} placed with respect to the {b}?"),
    "compare": ("are there more {nouns_a} or {nouns_b}?",
                "which are more numerous, {nouns_a} or {nouns_b}?",
                "which shape appears more often: {noun_a} or {noun_b}?"),
    "ocr": ("what number is written?", "read the digits in the image.",
            "what number does the image show?"),
}


@dataclass
class VQASet:
    """``images`` (3, H_i, W_i) float tensors in [0, 1]; per item the ``questions``,
    ``answers``, ``captions``, ``categories`` (a name of CATEGORIES), ``options`` (N_OPTIONS
    texts, the answer among them) and ``answer_index`` (the answer's position in its options);
    ``attributes`` what was drawn: for shapes tasks ``shapes``, ``colours`` (names per object),
    ``centres`` ((x, y) per object, pixels) and ``radius``; for ocr ``digits`` (the string),
    ``digit_ids`` (indices into :func:`digit_pool` of the split), ``scale``, ``origin`` (x, y
    of the strip's top-left pixel) and ``colour``."""

    images: list[torch.Tensor]
    questions: list[str]
    answers: list[str]
    captions: list[str]
    categories: list[str]
    options: list[tuple[str, ...]]
    answer_index: list[int]
    attributes: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.questions)

    def subset(self, indices: Sequence[int]) -> VQASet:
        """The items at ``indices``, in that order (images shared, not copied)."""
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not -len(self) <= i < len(self)]
        if bad:
            raise IndexError(f"index {bad[0]} out of range for a VQASet of {len(self)} items")
        picked = [[getattr(self, f)[i] for i in indices] for f in (
            "images", "questions", "answers", "captions", "categories", "options",
            "answer_index")]
        # A set built by hand may come without attributes.
        attributes = [self.attributes[i] for i in indices] if self.attributes else []
        return VQASet(*picked, attributes)


# --- sizes, names ----------------------------------------------------------------------------

def check_sizes(sizes: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """``sizes`` as a tuple of (H, W) int pairs; ValueError unless each side is a multiple of
    8 between 24 and 64."""
    if isinstance(sizes, (str, bytes)) or not len(sizes):
        raise ValueError(f"sizes must be a non-empty sequence of (H, W) pairs, got {sizes!r}")
    checked = []
    for size in sizes:
        if (not isinstance(size, Sequence) or len(size) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in size)):
            raise ValueError(f"each size must be an (H, W) pair of ints, got {size!r}")
        h, w = size
        if not all(MIN_SIDE <= s <= MAX_SIDE and s % SIDE_MULTIPLE == 0 for s in (h, w)):
            raise ValueError(f"image size {h}x{w}: each side must be a multiple of "
                             f"{SIDE_MULTIPLE} between {MIN_SIDE} and {MAX_SIDE}")
        checked.append((h, w))
    return tuple(checked)


def _check_name(name: str, known: Sequence[str], what: str) -> None:
    if name not in known:
        raise ValueError(f"unknown {what} {name!r}{closest(str(name), known)} "
                         f"(known: {', '.join(known)})")


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _noun(shape: str, count: int) -> str:
    return shape if count == 1 else plural(shape)


def article(word: str) -> str:
    """'a' or 'an', as ``word`` is pronounced (every colour and shape name is spelt as said)."""
    return "an" if word[0] in "aeiou" else "a"


def _phrase(count: int, colour: str, shape: str) -> str:
    number = article(colour) if count == 1 else NUMBER_WORDS[count]
    return f"{number} {colour} {_noun(shape, count)}"


# --- geometry --------------------------------------------------------------------------------

def max_radius(height: int, width: int, k: int) -> float:
    """r_max of the module docstring for K = ``k`` objects in an H x W image."""
    crowded = math.sqrt(height * width / (CROWDING * k))
    if k == 1:
        return min(R_MAX, crowded)
    return min(R_MAX, crowded, (min(height, width) - 3) / (4 + 2 * EXTENT))


def draw_radius(n: int, height: int, width: int, k: int,
                generator: torch.Generator) -> torch.Tensor:
    """(n,) radii uniform in [min(3, r_max), r_max]."""
    high = max_radius(height, width, k)
    low = min(R_MIN, high)
    return low + torch.rand(n, generator=generator) * (high - low)


def relation_holds(relation: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Whether A - B = ``d`` (..., 2) as (dx, dy) is ``relation`` (...,) (indices into
    RELATIONS) with its axis dominant by a factor 2. Returns (...,) bool."""
    dx, dy = d[..., 0], d[..., 1]
    horizontal, vertical = dx.abs() > 2 * dy.abs(), dy.abs() > 2 * dx.abs()
    table = torch.stack([horizontal & (dx < 0), horizontal & (dx > 0),
                         vertical & (dy < 0), vertical & (dy > 0)], -1)
    return table.gather(-1, relation.unsqueeze(-1)).squeeze(-1)


def place(radius: torch.Tensor, present: torch.Tensor, height: int, width: int,
          generator: torch.Generator) -> torch.Tensor:
    """Centres (N, K, 2) as (x, y) for N images of up to K objects (``present`` (N, K) bool) of
    ``radius`` (N,): inside the image by r + 0.5 and the present ones pairwise at least
    2 EXTENT r + GAP apart. Copies are placed in turn, each the first of CANDIDATES uniform
    candidates that fits (an absent copy fits anywhere); images left without one are placed
    again, up to RESTARTS times."""
    n, k = present.shape
    if radius.shape != (n,):
        raise ValueError(f"radius must have shape ({n},), got {tuple(radius.shape)}")
    centres = torch.empty(n, k, 2)
    todo = torch.arange(n)
    for _ in range(RESTARTS):
        m = len(todo)
        r = radius[todo].view(m, 1)
        low = r + 0.5
        span = torch.tensor([width, height], dtype=torch.float32) - 2 * low  # (m, 2)
        separation = (2 * EXTENT * r + GAP).view(m, 1, 1)
        placed = torch.empty(m, k, 2)
        fits = torch.ones(m, dtype=torch.bool)
        for j in range(k):
            u = torch.rand(m, CANDIDATES, 2, generator=generator)
            candidate = low.unsqueeze(1) + u * span.unsqueeze(1)  # (m, CANDIDATES, 2)
            dist = (candidate.unsqueeze(2) - placed[:, None, :j]).norm(dim=-1)
            apart = (dist >= separation) | ~present[todo, None, :j]
            valid = apart.all(-1) | ~present[todo, j].view(m, 1)
            fits &= valid.any(1)
            placed[:, j] = candidate[torch.arange(m), valid.to(torch.uint8).argmax(1)]
        centres[todo[fits]] = placed[fits]
        todo = todo[~fits]
        if not len(todo):
            return centres
    raise RuntimeError(f"could not place {k} objects in a {height}x{width} image after "
                       f"{RESTARTS} tries")


def place_pair(radius: torch.Tensor, relation: torch.Tensor, height: int, width: int,
               generator: torch.Generator) -> torch.Tensor:
    """Centres (N, 2, 2) as (x, y) of A (object 0) and B (object 1) with A - B in
    ``relation`` (N,) to B: along the relation's axis |d| uniform in [2 EXTENT r + GAP, room],
    across it uniform below |d| / 2 (and the room), the pair then shifted uniformly within the
    image (r + 0.5 from the border). Needs room >= 2 EXTENT r + GAP on the relation's axis,
    which ``max_radius`` ensures."""
    n = len(radius)
    if radius.shape != (n,) or relation.shape != (n,):
        raise ValueError(f"radius and relation must have one shape (N,), got "
                         f"{tuple(radius.shape)} and {tuple(relation.shape)}")
    low = radius + 0.5
    room = torch.stack([width - 2 * low, height - 2 * low], -1)  # (n, 2) as (x, y)
    axis = (relation >= 2).long()  # 0: left/right along x, 1: above/below along y
    sign = torch.where(relation % 2 == 0, -1.0, 1.0)  # left, above: A has the smaller coordinate
    separation = 2 * EXTENT * radius + GAP
    main_room = room.gather(1, axis.view(n, 1)).view(n)
    cross_room = room.gather(1, (1 - axis).view(n, 1)).view(n)
    u = torch.rand(n, 3, generator=generator)
    along = separation + u[:, 0] * (main_room - separation)
    across = torch.minimum(u[:, 1] * along / 2, cross_room) * torch.where(u[:, 2] < 0.5, -1, 1)
    d = torch.zeros(n, 2)
    d[torch.arange(n), axis] = sign * along
    d[torch.arange(n), 1 - axis] = across
    # Shift the pair so that both centres lie in [low, low + room] on each axis.
    corner = low.view(n, 1) + torch.rand(n, 2, generator=generator) * (room - d.abs())
    b = corner + torch.clamp(-d, min=0)
    return torch.stack([b + d, b], 1)


def paint(shape: torch.Tensor, colour: torch.Tensor, centres: torch.Tensor,
          radius: torch.Tensor, present: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 3, H, W) images: object j of image i (``shape``, ``colour`` (N, K) indices into
    SHAPES, COLOURS; ``centres`` (N, K, 2); ``present`` (N, K) bool) filled in its colour on
    the background, ``radius`` (N,)."""
    n, k = shape.shape
    y = (torch.arange(height, dtype=torch.float32) + 0.5).view(1, -1, 1)
    x = (torch.arange(width, dtype=torch.float32) + 0.5).view(1, 1, -1)
    rgb = torch.tensor(list(COLOURS.values()))
    images = torch.full((n, 3, height, width), BACKGROUND)
    for j in range(k):
        mask = shape_mask(shape[:, j], x - centres[:, j, 0].view(n, 1, 1),
                          y - centres[:, j, 1].view(n, 1, 1), radius.view(n, 1, 1))
        mask &= present[:, j].view(n, 1, 1)
        images = torch.where(mask.unsqueeze(1), rgb[colour[:, j]].view(n, 3, 1, 1), images)
    return images


def choose_options(answer: torch.Tensor, n_classes: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """N_OPTIONS distinct classes per item, the ``answer`` (N,) among them at a random place,
    the others at random: returns options (N, N_OPTIONS) class indices and answer_index (N,)."""
    n = len(answer)
    keys = torch.rand(n, n_classes, generator=generator)
    keys[torch.arange(n), answer] = -1.0  # sorted first, so always chosen
    chosen = keys.argsort(1)[:, :N_OPTIONS]
    order = torch.rand(n, N_OPTIONS, generator=generator).argsort(1)
    return chosen.gather(1, order), (order == 0).to(torch.uint8).argmax(1)


# --- the shapes tasks ------------------------------------------------------------------------

@dataclass
class _Items:
    """A task's items at one size, before they are merged into a VQASet."""

    images: torch.Tensor
    questions: list[str]
    answers: list[str]
    captions: list[str]
    options: list[tuple[str, ...]]
    answer_index: list[int]
    attributes: list[dict]


def _object_attributes(shape, colour, centres, radius, present) -> list[dict]:
    return [{"shapes": [SHAPES[s] for s, p in zip(sh, pr, strict=True) if p],
             "colours": [COLOUR_NAMES[c] for c, p in zip(co, pr, strict=True) if p],
             "centres": [tuple(xy) for xy, p in zip(ce, pr, strict=True) if p], "radius": r}
            for sh, co, ce, r, pr in zip(shape.tolist(), colour.tolist(), centres.tolist(),
                                         radius.tolist(), present.tolist(), strict=True)]


def _texts(names: Sequence[str], options: torch.Tensor) -> list[tuple[str, ...]]:
    return [tuple(names[j] for j in row) for row in options.tolist()]


def _copies(n: int, count: torch.Tensor, height: int, width: int,
            generator: torch.Generator, k_max: int):
    """One shape in one colour, ``count`` (n,) copies of it: the painted images and attributes."""
    shape = torch.randint(len(SHAPES), (n,), generator=generator)
    colour = torch.randint(len(COLOURS), (n,), generator=generator)
    radius = draw_radius(n, height, width, k_max, generator)
    present = torch.arange(k_max) < count.view(n, 1)
    centres = place(radius, present, height, width, generator)
    shapes, colours = shape.view(n, 1).expand(n, k_max), colour.view(n, 1).expand(n, k_max)
    images = paint(shapes, colours, centres, radius, present, height, width)
    return shape, colour, images, _object_attributes(shapes, colours, centres, radius, present)


def _count(n: int, height: int, width: int, generator: torch.Generator) -> _Items:
    count = torch.randint(1, MAX_COUNT + 1, (n,), generator=generator)
    shape, colour, images, attributes = _copies(n, count, height, width, generator, MAX_COUNT)
    template = torch.randint(len(TEMPLATES["count"]), (n,), generator=generator)
    options, answer_index = choose_options(count - 1, MAX_COUNT, generator)
    names = [str(c) for c in range(1, MAX_COUNT + 1)]
    triples = list(zip(shape.tolist(), colour.tolist(), count.tolist(), strict=True))
    return _Items(
        images, [TEMPLATES["count"][t].format(nouns=plural(SHAPES[s]))
                 for t, (s, _, _) in zip(template.tolist(), triples, strict=True)],
        [str(c) for _, _, c in triples],
        [_phrase(c, COLOUR_NAMES[co], SHAPES[s]) for s, co, c in triples],
        _texts(names, options), answer_index.tolist(), attributes)


def _colour(n: int, height: int, width: int, generator: torch.Generator) -> _Items:
    count = torch.randint(1, MAX_COLOUR_COPIES + 1, (n,), generator=generator)
    shape, colour, images, attributes = _copies(n, count, height, width, generator,
                                                MAX_COLOUR_COPIES)
    template = torch.randint(len(TEMPLATES["colour"]), (n,), generator=generator)
    options, answer_index = choose_options(colour, len(COLOURS), generator)
    triples = list(zip(shape.tolist(), colour.tolist(), count.tolist(), strict=True))
    return _Items(
        images, [TEMPLATES["colour"][t].format(noun=_noun(SHAPES[s], c),
                                               be="is" if c == 1 else "are")
                 for t, (s, _, c) in zip(template.tolist(), triples, strict=True)],
        [COLOUR_NAMES[co] for _, co, _ in triples],
        [_phrase(c, COLOUR_NAMES[co], SHAPES[s]) for s, co, c in triples],
        _texts(COLOUR_NAMES, options), answer_index.tolist(), attributes)


def _shape(n: int, height: int, width: int, generator: torch.Generator) -> _Items:
    shape, colour, images, attributes = _copies(n, torch.ones(n, dtype=torch.long), height,
                                                width, generator, 1)
    template = torch.randint(len(TEMPLATES["shape"]), (n,), generator=generator)
    options, answer_index = choose_options(shape, len(SHAPES), generator)
    return _Items(images, [TEMPLATES["shape"][t] for t in template.tolist()],
                  [SHAPES[s] for s in shape.tolist()],
                  [_phrase(1, COLOUR_NAMES[c], SHAPES[s])
                   for s, c in zip(shape.tolist(), colour.tolist(), strict=True)],
                  _texts(SHAPES, options), answer_index.tolist(), attributes)


def _position(n: int, height: int, width: int, generator: torch.Generator) -> _Items:
    shape = torch.randint(len(SHAPES), (n, 2), generator=generator)
    colour = torch.randint(len(COLOURS), (n, 2), generator=generator)
    # B must be nameable apart from A: when both attributes agree, B takes another shape.
    same = (shape[:, 0] == shape[:, 1]) & (colour[:, 0] == colour[:, 1])
    shift = torch.randint(1, len(SHAPES), (n,), generator=generator)
    shape[:, 1] = torch.where(same, (shape[:, 0] + shift) % len(SHAPES), shape[:, 1])
    relation = torch.randint(len(RELATIONS), (n,), generator=generator)
    radius = draw_radius(n, height, width, 2, generator)
    present = torch.ones(n, 2, dtype=torch.bool)
    centres = place_pair(radius, relation, height, width, generator)
    images = paint(shape, colour, centres, radius, present, height, width)
    template = torch.randint(len(TEMPLATES["position"]), (n,), generator=generator)
    options, answer_index = choose_options(relation, len(RELATIONS), generator)
    questions, captions = [], []
    for t, (sa, sb), (ca, cb), rel in zip(template.tolist(), shape.tolist(), colour.tolist(),
                                          relation.tolist(), strict=True):
        a = f"{COLOUR_NAMES[ca]} {SHAPES[sa]}"
        b = f"{COLOUR_NAMES[cb]} {SHAPES[sb]}"
        questions.append(TEMPLATES["position"][t].format(a=a, b=b))
        captions.append(f"{article(a)} {a} {RELATION_WORDS[RELATIONS[rel]]} {article(b)} {b}")
    return _Items(images, questions, [RELATIONS[r] for r in relation.tolist()], captions,
                  _texts(RELATIONS, options), answer_index.tolist(),
                  _object_attributes(shape, colour, centres, radius, present))


def _compare(n: int, height: int, width: int, generator: torch.Generator) -> _Items:
    pairs = torch.tensor([(a, b) for a in range(1, MAX_COMPARE_TOTAL)
                          for b in range(1, MAX_COMPARE_TOTAL)
                          if a != b and a + b <= MAX_COMPARE_TOTAL])
    counts = pairs[torch.randint(len(pairs), (n,), generator=generator)]  # (n, 2)
    kinds = torch.rand(n, len(SHAPES), generator=generator).argsort(1)[:, :2]  # two shapes
    colour = torch.randint(len(COLOURS), (n, 2), generator=generator)
    # Slots 0..c_a-1 hold kind a, the next c_b kind b, the rest are absent.
    slot = torch.arange(MAX_COMPARE_TOTAL).view(1, -1)
    is_b = (slot >= counts[:, :1]).long()
    present = slot < counts.sum(1, keepdim=True)
    radius = draw_radius(n, height, width, MAX_COMPARE_TOTAL, generator)
    centres = place(radius, present, height, width, generator)
    shapes, colours = kinds.gather(1, is_b), colour.gather(1, is_b)
    images = paint(shapes, colours, centres, radius, present, height, width)
    more = kinds.gather(1, (counts[:, 1] > counts[:, 0]).long().view(n, 1)).view(n)
    template = torch.randint(len(TEMPLATES["compare"]), (n,), generator=generator)
    options, answer_index = choose_options(more, len(SHAPES), generator)
    questions, captions = [], []
    for t, (ka, kb), (ca, cb), (na, nb) in zip(template.tolist(), kinds.tolist(),
                                               colour.tolist(), counts.tolist(), strict=True):
        a, b = SHAPES[ka], SHAPES[kb]
        questions.append(TEMPLATES["compare"][t].format(nouns_a=plural(a), nouns_b=plural(b),
                                                        noun_a=a, noun_b=b))
        captions.append(f"{_phrase(na, COLOUR_NAMES[ca], a)} and "
                        f"{_phrase(nb, COLOUR_NAMES[cb], b)}")
    return _Items(images, questions, [SHAPES[m] for m in more.tolist()], captions,
                  _texts(SHAPES, options), answer_index.tolist(),
                  _object_attributes(shapes, colours, centres, radius, present))


# --- ocr -------------------------------------------------------------------------------------

def digit_pool(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The handwritten digits OCR images of ``split`` are written with: images (M, 8, 8) in
    [0, 1] and labels (M,); the digits train split for 'train', its test split otherwise."""
    from mlatlas.data import load_dataset

    _check_name(split, SPLITS, "split")
    digits = load_dataset("digits")
    if split == "train":
        return digits.x_train[:, 0], digits.y_train
    return digits.x_test[:, 0], digits.y_test


def distractors(answer: str, rng: np.random.Generator) -> list[str]:
    """N_OPTIONS - 1 distinct strings other than ``answer`` (2+ digits) that no reading of the
    options alone can tell from it: a hidden centre c is ``answer`` with one digit changed, and
    the distractors are other strings one digit away from c. The options are then a uniform
    draw of N_OPTIONS of c's neighbours, the answer one of them like any other (options that
    each differ from the answer, as the answer alone differs from none, would give it away:
    the answer would be the one that shares most digits with the others)."""
    i = int(rng.integers(len(answer)))
    centre = answer[:i] + str((int(answer[i]) + int(rng.integers(1, 10))) % 10) + answer[i + 1:]
    near = sorted({centre[:j] + d + centre[j + 1:] for j in range(len(centre))
                   for d in "0123456789"} - {centre, answer})
    return [near[j] for j in rng.choice(len(near), N_OPTIONS - 1, replace=False)]


def _ocr(n: int, height: int, width: int, generator: torch.Generator,
         split: str) -> _Items:
    pool, labels = digit_pool(split)
    low, high = OCR_DIGITS[0], min(OCR_DIGITS[1], width // 8)
    length = torch.randint(low, high + 1, (n,), generator=generator)
    fits_2x = 16 * length <= width  # every side is at least 24, so a 16-pixel row fits
    scale = torch.where(fits_2x & (torch.rand(n, generator=generator) < 0.5), 2, 1)
    # Digit images by class: a class's members are contiguous in ``by_class``.
    digit = torch.randint(10, (n, high), generator=generator)
    by_class = labels.argsort(stable=True)
    start = torch.cat([torch.zeros(1, dtype=torch.long), labels.bincount(minlength=10).cumsum(0)])
    members = start[digit + 1] - start[digit]
    ids = by_class[start[digit] + (torch.rand(n, high, generator=generator) * members).long()]
    strip_w, strip_h = 8 * scale * length, 8 * scale
    x0 = (torch.rand(n, generator=generator) * (width - strip_w + 1)).long()
    y0 = (torch.rand(n, generator=generator) * (height - strip_h + 1)).long()
    colour = torch.randint(len(COLOURS), (n,), generator=generator)
    ink = torch.zeros(n, height, width)
    for s in (1, 2):
        for j in range(high):
            rows = (scale == s) & (length > j)
            if not rows.any():
                continue
            idx = rows.nonzero().view(-1)
            glyph = pool[ids[idx, j]].repeat_interleave(s, 1).repeat_interleave(s, 2)
            r = y0[idx].view(-1, 1, 1) + torch.arange(8 * s).view(1, -1, 1)
            c = x0[idx].view(-1, 1, 1) + 8 * s * j + torch.arange(8 * s).view(1, 1, -1)
            ink[idx.view(-1, 1, 1), r, c] = glyph
    rgb = torch.tensor(list(COLOURS.values()))[colour].view(n, 3, 1, 1)
    images = BACKGROUND + ink.unsqueeze(1) * (rgb - BACKGROUND)
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
    template = torch.randint(len(TEMPLATES["ocr"]), (n,), generator=generator)
    answers = ["".join(str(d) for d in row[:k]) for row, k in zip(digit.tolist(),
                                                                  length.tolist(), strict=True)]
    options, answer_index = [], []
    for answer in answers:
        texts = [answer, *distractors(answer, rng)]
        order = rng.permutation(N_OPTIONS)
        options.append(tuple(texts[j] for j in order))
        answer_index.append(int(np.flatnonzero(order == 0)[0]))
    attributes = [{"digits": a, "digit_ids": row[:len(a)], "scale": s, "origin": (x, y),
                   "colour": COLOUR_NAMES[c]}
                  for a, row, s, x, y, c in zip(answers, ids.tolist(), scale.tolist(),
                                                x0.tolist(), y0.tolist(), colour.tolist(),
                                                strict=True)]
    return _Items(images, [TEMPLATES["ocr"][t] for t in template.tolist()], answers,
                  [f"the number {a} in {COLOUR_NAMES[c]}"
                   for a, c in zip(answers, colour.tolist(), strict=True)],
                  options, answer_index, attributes)


_TASKS = {"count": _count, "colour": _colour, "shape": _shape, "position": _position,
          "compare": _compare}


# --- the set ---------------------------------------------------------------------------------

def vqa_set(n: int, seed: int = 0, split: str = "train",
            sizes: Sequence[tuple[int, int]] | None = None,
            categories: Sequence[str] = CATEGORIES) -> VQASet:
    """``n`` questions of ``split`` ('train', 'test' or 'unseen'), balanced over
    ``categories``, each image at a size drawn uniformly from ``sizes`` (default TRAIN_SIZES,
    UNSEEN_SIZES for 'unseen'). See the module docstring."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    _check_name(split, SPLITS, "split")
    if isinstance(categories, str) or not len(categories):
        raise ValueError(f"categories must be a non-empty sequence of names of "
                         f"{', '.join(CATEGORIES)}, got {categories!r}")
    for name in categories:
        _check_name(name, CATEGORIES, "category")
    if len(set(categories)) != len(categories):
        raise ValueError(f"categories must not repeat a name, got {list(categories)}")
    sizes = check_sizes(sizes if sizes is not None
                        else UNSEEN_SIZES if split == "unseen" else TRAIN_SIZES)
    generator = torch.Generator().manual_seed(seed * 3 + _SPLIT_OFFSET[split])
    per, extra = divmod(n, len(categories))
    task = torch.tensor([c for c in range(len(categories)) for _ in range(per + (c < extra))])
    size = torch.randint(len(sizes), (n,), generator=generator)
    order = torch.randperm(n, generator=generator)
    slot: list[tuple[int, _Items, int]] = []  # (item, its group, its row in the group)
    for c, name in enumerate(categories):
        for s, (height, width) in enumerate(sizes):
            members = ((task == c) & (size == s)).nonzero().view(-1)
            if not len(members):
                continue
            if name == "ocr":
                items = _ocr(len(members), height, width, generator, split)
            else:
                items = _TASKS[name](len(members), height, width, generator)
            slot.extend((int(i), items, row) for row, i in enumerate(members.tolist()))
    by_item = {i: (items, row, categories[int(task[i])]) for i, items, row in slot}
    rows = [by_item[int(i)] for i in order]
    return VQASet(
        images=[items.images[row] for items, row, _ in rows],
        questions=[items.questions[row] for items, row, _ in rows],
        answers=[items.answers[row] for items, row, _ in rows],
        captions=[items.captions[row] for items, row, _ in rows],
        categories=[name for _, _, name in rows],
        options=[items.options[row] for items, row, _ in rows],
        answer_index=[items.answer_index[row] for items, row, _ in rows],
        attributes=[items.attributes[row] for items, row, _ in rows])


# --- images and the MMBench TSV --------------------------------------------------------------

def _check_image(image: torch.Tensor) -> None:
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"an image must be a (3, H, W) tensor, got shape {tuple(image.shape)}")


def to_pil(image: torch.Tensor) -> Image.Image:
    """A (3, H, W) tensor in [0, 1] as an 8-bit RGB PIL image."""
    _check_image(image)
    array = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy(), "RGB")


def png_base64(image: torch.Tensor) -> str:
    """A (3, H, W) tensor as the base64 PNG an MMBench TSV's image cell holds."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def save_image(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Write a (3, H, W) tensor in [0, 1] as an 8-bit RGB PNG, atomically."""
    pil = to_pil(image)
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as a (3, H, W) float tensor in [0, 1] (converted to RGB)."""
    try:
        with Image.open(Path(path)) as pil:
            array = np.asarray(pil.convert("RGB"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from None
    return torch.from_numpy(array / 255.0).permute(2, 0, 1).contiguous()


def to_questions(vqa: VQASet, start_index: int = 0) -> list[circular.Question]:
    """The items as MMBench questions indexed ``start_index``, ``start_index`` + 1, ...:
    category the task, l2_category perception or reasoning (L2_CATEGORIES), answer the label
    of ``answer_index``, image a base64 PNG."""
    if start_index < 0:
        raise ValueError(f"start_index must be non-negative, got {start_index}")
    return [circular.Question(
        index=start_index + i, g_index=start_index + i, question=question, hint="",
        options=tuple(options), answer=circular.LABELS[answer], category=category,
        l2_category=L2_CATEGORIES[category], image=png_base64(image))
        for i, (image, question, options, answer, category) in enumerate(zip(
            vqa.images, vqa.questions, vqa.options, vqa.answer_index, vqa.categories,
            strict=True))]


def write_mmbench_tsv(vqa: VQASet, path: str | os.PathLike, start_index: int = 0) -> None:
    """Write the questions (not their rotations) as an MMBench TSV, atomically."""
    circular.write_tsv(path, to_questions(vqa, start_index))
