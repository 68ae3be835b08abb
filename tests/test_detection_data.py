"""Detection shapes: determinism, tight and honest boxes, balance, the unusual scales, errors."""

import pytest
import torch

from mlatlas.data.detection import (
    CLASSES,
    LARGE_SCALE,
    SMALL_SCALE,
    Detections,
    collate,
    detection_shapes,
    unusual_scales,
)
from mlatlas.data.shapes import COLOURS, SHAPES


def _same(a: Detections, b: Detections) -> bool:
    return (torch.equal(a.images, b.images)
            and all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes, strict=True))
            and all(torch.equal(x, y) for x, y in zip(a.labels, b.labels, strict=True)))


def _intersect(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((torch.minimum(a[2:], b[2:]) > torch.maximum(a[:2], b[:2])).all())


def test_deterministic_and_splits_differ():
    a, b = detection_shapes(40, seed=1), detection_shapes(40, seed=1)
    assert _same(a, b)
    assert not torch.equal(a.images, detection_shapes(40, seed=1, split="test").images)
    assert not torch.equal(a.images, detection_shapes(40, seed=2).images)
    assert _same(unusual_scales(10, seed=1), unusual_scales(10, seed=1))


def test_layout_counts_and_boxes_inside():
    d = detection_shapes(300, seed=0, image_size=48, max_objects=3)
    assert len(d) == 300 and d.images.shape == (300, 3, 48, 48)
    assert d.images.dtype == torch.float32 and d.images.is_contiguous()
    assert d.images.min() >= 0 and d.images.max() <= 1
    counts = torch.tensor([len(b) for b in d.boxes])
    assert counts.min() >= 1 and counts.max() <= 3
    # Counts uniform in 1..3; dropping an overlapping object is rare.
    assert (torch.bincount(counts, minlength=4)[1:] > 70).all()
    for boxes, labels in zip(d.boxes, d.labels, strict=True):
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
        assert boxes.shape == (len(labels), 4)
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes >= 0).all() and (boxes <= 48).all()
        assert torch.equal(boxes, boxes.round())      # pixel edges
        assert ((labels >= 0) & (labels < len(CLASSES))).all()
    assert CLASSES == SHAPES


def test_boxes_tight_and_honest():
    d = detection_shapes(200, seed=3)
    palette = torch.tensor(list(COLOURS.values()))
    # The background is at most 0.12 in every channel; every colour reaches 0.75 in one.
    objects = d.images.amax(1) > 0.5                                      # (N, S, S)
    isolated = 0
    for image, drawn, boxes in zip(d.images, objects, d.boxes, strict=True):
        covered = torch.zeros_like(drawn)
        for x1, y1, x2, y2 in boxes.long().tolist():
            covered[y1:y2, x1:x2] = True
        assert not (drawn & ~covered).any()                  # no object pixel outside a box
        for j, box in enumerate(boxes):
            if any(_intersect(box, other) for k, other in enumerate(boxes) if k != j):
                continue
            isolated += 1
            x1, y1, x2, y2 = box.long().tolist()
            inside = drawn[y1:y2, x1:x2]
            # Tight: the object touches all four edges of its box.
            assert inside[0].any() and inside[-1].any()
            assert inside[:, 0].any() and inside[:, -1].any()
            # One object in its box, of one of the palette's colours.
            pixels = image[:, y1:y2, x1:x2].permute(1, 2, 0)[inside]
            assert (pixels == pixels[0]).all()
            assert (palette == pixels[0]).all(1).any()
    assert isolated > 100


def test_overlap_is_limited():
    d = detection_shapes(300, seed=4)
    for boxes in d.boxes:
        for j in range(len(boxes)):
            for k in range(j):
                a, b = boxes[j], boxes[k]
                inter = (torch.minimum(a[2:], b[2:]) - torch.maximum(a[:2], b[:2])).clamp(min=0)
                inter = inter.prod()
                union = (a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter
                assert inter / union <= 0.3


def test_classes_roughly_balanced():
    labels = torch.cat(detection_shapes(1000, seed=5).labels)
    share = torch.bincount(labels, minlength=len(CLASSES)).float() / len(labels)
    assert (share - 0.25).abs().max() < 0.04


def test_unusual_scales_lie_outside_training():
    d = unusual_scales(60, seed=0)
    assert len(d) == 60
    side = [b[:, 2:].sub(b[:, :2]).amax(1) for b in d.boxes]
    large, small = torch.cat(side[:30]), torch.cat(side[30:])
    # A shape's longest side is 1.7 to 2 radii (square to circle), rounded to pixels.
    assert large.min() >= 1.7 * LARGE_SCALE[0] * 64 - 1
    assert small.max() <= 2 * SMALL_SCALE[1] * 64 + 1
    train = torch.cat([b[:, 2:].sub(b[:, :2]).amax(1) for b in detection_shapes(200).boxes])
    assert train.min() > small.max() - 4 and train.max() < large.max()
    assert len(unusual_scales(7)) == 7 and len(unusual_scales(1)) == 1


def test_collate():
    d = detection_shapes(12, seed=0)
    index = torch.tensor([5, 0, 7])
    images, boxes, labels = collate(d, index)
    assert torch.equal(images, d.images[index])
    assert all(torch.equal(b, d.boxes[i]) for b, i in zip(boxes, [5, 0, 7], strict=True))
    assert all(torch.equal(c, d.labels[i]) for c, i in zip(labels, [5, 0, 7], strict=True))


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "n must be"),
    ({"n": 4, "split": "val"}, "split must be"),
    ({"n": 4, "image_size": 8}, "image_size"),
    ({"n": 4, "scale": (0.3, 0.1)}, "scale must be"),
    ({"n": 4, "scale": (0.0, 0.1)}, "scale must be"),
    ({"n": 4, "scale": (0.1, 0.6)}, "scale must be"),
    ({"n": 4, "max_objects": 0}, "max_objects"),
])
def test_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        detection_shapes(**kwargs)
    with pytest.raises(ValueError, match="n must be"):
        unusual_scales(0)
