"""Detection shapes: generated images with boxes and class labels, for the detectors of vision.

Each S x S RGB image (S = 64 by default) holds 1 to ``max_objects`` objects, the count uniform.
An object is one of the four shapes of :mod:`mlatlas.data.shapes` (``CLASSES`` = circle, square,
triangle, cross), drawn with the same formula (``shapes.shape_mask``), in one of its six colours,
with radius ``S * s`` for ``s`` log-uniform in ``scale`` (default 0.08-0.3: about 5 to 19 pixels
at S = 64), its centre uniform among the positions that keep it inside the image. The
background is dark and noisy (each pixel and channel 0.08 +- 0.04, uniform), so a detector
cannot find objects by "anything not exactly the background colour".

Boxes are (x1, y1, x2, y2) in pixels, pixel (r, c) covering [c, c + 1) x [r, r + 1): the tight
box of an object's own drawn pixels, x1 = its smallest column and x2 = its largest column + 1
(likewise y), so x2 > x1 and y2 > y1. Objects are painted in order, a later one over an earlier
one. To keep occlusion light (and so the boxes honest), an object whose box has IoU > 0.3 with
an earlier object of its image is moved to a new random position, up to ``RETRIES`` times, and
left out if it still overlaps (or if it covers no pixel centre at all, possible only for radii
of about a pixel); the first object is never left out for overlap.

Splits: 'train' and 'test' draw from disjoint seeds (as ``captioned_shapes`` does);
:func:`unusual_scales` is a third set whose objects are larger or smaller than any in training.
Everything is a function of the arguments: the same call gives the same images and boxes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from mlatlas.data.shapes import COLOURS, SHAPES, shape_mask

CLASSES = SHAPES
RETRIES = 8
MAX_IOU = 0.3
LARGE_SCALE = (0.3, 0.42)
SMALL_SCALE = (0.05, 0.08)
_SPLIT_OFFSET = {"train": 0, "test": 1, "unusual": 2}


@dataclass
class Detections:
    """``images`` (N, 3, S, S) float32 in [0, 1]; ``boxes`` N float32 tensors (n_i, 4) of
    (x1, y1, x2, y2) in pixels; ``labels`` N int64 tensors (n_i,) indexing ``CLASSES``."""

    images: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.images)


def _check(n: int, image_size: int, max_objects: int, scale: tuple[float, float]) -> None:
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be at least 1, got {max_objects}")
    low, high = scale
    # The largest object (radius S * high, plus half a pixel) must fit inside the image, and
    # the smallest must be at least a pixel in radius to cover any pixel centre.
    largest = 0.5 - 0.5 / image_size
    if not (0 < low <= high <= largest) or low * image_size < 1.0:
        raise ValueError(f"scale must be (low, high) with 1 / image_size <= low <= high <= "
                         f"{largest:.4f} for image_size {image_size}, got {scale}")


def _tight_boxes(mask: torch.Tensor) -> torch.Tensor:
    """(M, S, S) bool -> (M, 4) float32 (x1, y1, x2, y2) of the True pixels; zeros where a mask
    is empty."""
    size = mask.shape[-1]
    cols, rows = mask.any(1).to(torch.uint8), mask.any(2).to(torch.uint8)
    # argmax returns the first maximal index: the first True column from either side.
    x1, y1 = cols.argmax(1), rows.argmax(1)
    x2, y2 = size - cols.flip(1).argmax(1), size - rows.flip(1).argmax(1)
    boxes = torch.stack([x1, y1, x2, y2], 1).float()
    return boxes * mask.flatten(1).any(1, keepdim=True)


def _iou_with_earlier(box: torch.Tensor, earlier: torch.Tensor) -> torch.Tensor:
    """IoU of each (M, 4) box with the (M, K, 4) boxes of its image: (M, K)."""
    box = box.unsqueeze(1)
    lt = torch.maximum(box[..., :2], earlier[..., :2])
    rb = torch.minimum(box[..., 2:], earlier[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = (box[..., 2:] - box[..., :2]).prod(-1) + (earlier[..., 2:] - earlier[..., :2]).prod(-1)
    union = area - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def _generate(n: int, generator: torch.Generator, image_size: int, max_objects: int,
              scale: tuple[float, float]) -> Detections:
    size = image_size
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = grid.view(1, -1, 1), grid.view(1, 1, -1)
    palette = torch.tensor(list(COLOURS.values()))
    count = torch.randint(1, max_objects + 1, (n,), generator=generator)
    # Grey noise (one draw per pixel, shared by the channels) is a third of the draws of RGB's.
    background = 0.08 + 0.08 * (torch.rand(n, 1, size, size, generator=generator) - 0.5)
    # Which object each pixel shows (-1: the background): painting is one pass at the end.
    top = torch.full((n, size, size), -1, dtype=torch.int8)
    colours = torch.zeros(n, max_objects, dtype=torch.int64)
    boxes = torch.zeros(n, max_objects, 4)
    labels = torch.zeros(n, max_objects, dtype=torch.int64)
    kept = torch.zeros(n, max_objects, dtype=torch.bool)
    log_low, log_high = math.log(scale[0]), math.log(scale[1])
    for k in range(max_objects):
        shape = torch.randint(len(SHAPES), (n,), generator=generator)
        colour = torch.randint(len(COLOURS), (n,), generator=generator)
        u = torch.rand(n, generator=generator)
        radius = size * torch.exp(log_low + u * (log_high - log_low))
        margin = radius + 0.5
        mask = torch.zeros(n, size, size, dtype=torch.bool)
        box = torch.zeros(n, 4)
        todo = (count > k).nonzero().squeeze(1)
        for _ in range(1 + RETRIES):
            if len(todo) == 0:
                break
            # Only the images still without a good position are redrawn (and re-rendered).
            m = len(todo)
            span = size - 2 * margin[todo]
            cx = margin[todo] + torch.rand(m, generator=generator) * span
            cy = margin[todo] + torch.rand(m, generator=generator) * span
            drawn = shape_mask(shape[todo], x - cx.view(m, 1, 1), y - cy.view(m, 1, 1),
                               radius[todo].view(m, 1, 1))
            if m == n:
                mask, box = drawn, _tight_boxes(drawn)
            else:
                mask[todo], box[todo] = drawn, _tight_boxes(drawn)
            bad = ~drawn.flatten(1).any(1)
            if k > 0:
                iou = _iou_with_earlier(box[todo], boxes[todo, :k])
                bad |= ((iou > MAX_IOU) & kept[todo, :k]).any(1)
            todo = todo[bad]
        ok = count > k
        ok[todo] = False
        boxes[:, k], labels[:, k], kept[:, k], colours[:, k] = box, shape, ok, colour
        top.masked_fill_(mask & ok.view(n, 1, 1), k)
    rgb = palette[colours.gather(1, top.long().clamp(min=0).flatten(1))]      # (n, S * S, 3)
    rgb = rgb.transpose(1, 2).reshape(n, 3, size, size)   # a strided view, hence out=
    images = torch.empty(n, 3, size, size)
    torch.where((top >= 0).unsqueeze(1), rgb, background, out=images)
    # Slots are kept in order, so the kept rows of image i are consecutive in boxes[kept].
    counts = kept.sum(1).tolist()
    return Detections(images, list(boxes[kept].split(counts)), list(labels[kept].split(counts)))


def detection_shapes(n: int, seed: int = 0, split: Literal["train", "test"] = "train",
                     image_size: int = 64, max_objects: int = 4,
                     scale: tuple[float, float] = (0.08, 0.3)) -> Detections:
    """``n`` images of ``split`` with 1..``max_objects`` objects each, radii ``image_size * s``
    for ``s`` log-uniform in ``scale`` (see the module's docstring)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    _check(n, image_size, max_objects, scale)
    # Disjoint seeds per split (seed * 3 + offset), so no test image is a train image.
    generator = torch.Generator().manual_seed(seed * 3 + _SPLIT_OFFSET[split])
    return _generate(n, generator, image_size, max_objects, tuple(scale))


def unusual_scales(n: int, seed: int = 0, image_size: int = 64,
                   max_objects: int = 4) -> Detections:
    """``n`` test images whose objects lie outside the training scales (0.08-0.3): the first
    ``ceil(n / 2)`` images have large objects, ``s`` in ``LARGE_SCALE`` = (0.3, 0.42), about 19
    to 27 pixels in radius at 64 x 64 (so few fit without overlap: these images mostly hold one
    or two); the rest small ones, ``s`` in ``SMALL_SCALE`` = (0.05, 0.08), about 3 to 5 pixels.
    Its seeds are disjoint from both splits of :func:`detection_shapes`. Needs image_size >= 20
    (a small object at least a pixel in radius)."""
    n_large = (n + 1) // 2
    _check(n, image_size, max_objects, LARGE_SCALE)
    _check(n, image_size, max_objects, SMALL_SCALE)
    generator = torch.Generator().manual_seed(seed * 3 + _SPLIT_OFFSET["unusual"])
    large = _generate(n_large, generator, image_size, max_objects, LARGE_SCALE)
    if n == n_large:
        return large
    small = _generate(n - n_large, generator, image_size, max_objects, SMALL_SCALE)
    return Detections(torch.cat([large.images, small.images]), large.boxes + small.boxes,
                      large.labels + small.labels)


def collate(d: Detections, index: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor],
                                                         list[torch.Tensor]]:
    """The batch at ``index`` (B,): images (B, 3, S, S), B box tensors (n_i, 4) and B label
    tensors (n_i,), in the order of ``index``."""
    index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
    rows = index.tolist()
    return d.images[index], [d.boxes[i] for i in rows], [d.labels[i] for i in rows]
