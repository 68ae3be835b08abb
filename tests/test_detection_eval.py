"""mAP: hand-computed cases, and parity with pycocotools' COCOeval on random detections."""

import contextlib
import io

import numpy as np
import pytest
import torch

from mlatlas.vision.evaluation import mean_average_precision


def _target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def _prediction(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def test_perfect_detector_scores_one():
    targets = [_target([[0, 0, 10, 10], [20, 20, 40, 30]], [0, 1]), _target([[5, 5, 9, 9]], [1])]
    predictions = [_prediction(t["boxes"].tolist(), [0.9] * len(t["labels"]), t["labels"].tolist())
                   for t in targets]
    result = mean_average_precision(predictions, targets)
    # Not exactly 1: pycocotools' precision is TP / (TP + FP + numpy.spacing(1)).
    one = pytest.approx(1.0, abs=1e-12)
    assert result["map"] == one and result["map_50"] == one and result["map_75"] == one
    assert result["recall"] == 1.0
    assert result["per_class_ap50"] == {0: one, 1: one}


def test_false_positive_above_true_positive():
    # One box; a miss scored 0.9 above the hit scored 0.8: precision 0 then 1/2 at recall 1,
    # so the envelope is 1/2 at every one of the 101 recall points.
    targets = [_target([[0, 0, 10, 10]], [0])]
    predictions = [_prediction([[30, 30, 40, 40], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])]
    result = mean_average_precision(predictions, targets)
    assert result["map_50"] == pytest.approx(0.5, abs=1e-12)
    assert result["map"] == pytest.approx(0.5, abs=1e-12)


def test_hit_miss_hit_interpolates_101_points():
    # Two boxes; hit (0.9), miss (0.8), hit (0.7): precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    # The envelope is 1 for r <= 0.5 (51 points) and 2/3 above (50 points).
    targets = [_target([[0, 0, 10, 10], [20, 0, 30, 10]], [2, 2])]
    predictions = [_prediction([[0, 0, 10, 10], [50, 50, 60, 60], [20, 0, 30, 10]],
                               [0.9, 0.8, 0.7], [2, 2, 2])]
    expected = (51 * 1.0 + 50 * 2 / 3) / 101
    assert mean_average_precision(predictions, targets)["map_50"] == pytest.approx(expected,
                                                                                   abs=1e-12)
    # VOC's all-point area: 1/2 * 1 + 1/2 * 2/3.
    voc = mean_average_precision(predictions, targets, interpolation="all")["map_50"]
    assert voc == pytest.approx(0.5 + 1 / 3, abs=1e-12)


def test_iou_threshold_decides():
    targets = [_target([[0, 0, 10, 10]], [0])]
    # IoU 0.6: a hit at 0.5, a miss at 0.75.
    result = mean_average_precision([_prediction([[0, 0, 10, 6]], [1.0], [0])], targets)
    assert result["map_50"] == pytest.approx(1.0) and result["map_75"] == 0.0
    # IoU 0.62: a hit at 0.50, 0.55 and 0.60 of the ten thresholds.
    result = mean_average_precision([_prediction([[0, 0, 10, 6.2]], [1.0], [0])], targets)
    assert result["map"] == pytest.approx(0.3)
    only = mean_average_precision([_prediction([[0, 0, 10, 6]], [1.0], [0])], targets,
                                  iou_thresholds=[0.7])
    assert only["map"] == 0.0 and only["map_50"] == pytest.approx(1.0)


def test_duplicates_wrong_classes_and_absent_classes():
    targets = [_target([[0, 0, 10, 10]], [1]), _target([], [])]
    # A duplicate of a matched box is a false positive; a box of another class never matches;
    # class 3 has no ground truth anywhere and is ignored.
    predictions = [_prediction([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]],
                               [0.9, 0.8, 0.95], [1, 1, 0]),
                   _prediction([[1, 1, 5, 5]], [0.99], [3])]
    result = mean_average_precision(predictions, targets)
    assert result["per_class_ap50"] == {1: pytest.approx(1.0)}
    assert result["map"] == pytest.approx(1.0)
    empty = mean_average_precision([_prediction([], [], [])], [_target([], [])])
    assert np.isnan(empty["map"]) and empty["per_class_ap50"] == {}


def test_errors():
    with pytest.raises(ValueError, match="per image"):
        mean_average_precision([], [_target([], [])])
    with pytest.raises(ValueError, match="shape"):
        bad = {"boxes": torch.zeros(1, 3), "scores": torch.ones(1), "labels": torch.zeros(1)}
        mean_average_precision([bad], [_target([], [])])
    with pytest.raises(ValueError, match="scores"):
        bad = {"boxes": torch.zeros(2, 4), "scores": torch.ones(1), "labels": torch.zeros(2)}
        mean_average_precision([bad], [_target([], [])])
    with pytest.raises(ValueError, match="interpolation"):
        mean_average_precision([], [], interpolation="11")


def _random_case(seed: int, n_images: int = 20, crowded: bool = False, ties: bool = False):
    rng = np.random.default_rng(seed)
    targets, predictions = [], []
    for i in range(n_images):
        m = int(rng.integers(0, 7))
        xy = rng.uniform(0, 50, (m, 2))
        gt = np.concatenate([xy, xy + rng.uniform(2, 25, (m, 2))], 1)
        gt_labels = rng.integers(0, 4, m)
        # Jittered copies of the boxes (near and far misses, duplicates) and random clutter.
        copies = rng.integers(0, m, 3 * m) if m else np.zeros(0, dtype=np.int64)
        near = gt[copies] + rng.normal(0, 2.0, (len(copies), 4))
        near[:, 2:] = np.maximum(near[:, 2:], near[:, :2] + 0.5)
        labels = np.where(rng.random(len(copies)) < 0.85, gt_labels[copies],
                          rng.integers(0, 4, len(copies)))
        k = int(rng.integers(0, 6)) + (130 if crowded and i < 3 else 0)
        xy = rng.uniform(0, 50, (k, 2))
        clutter = np.concatenate([xy, xy + rng.uniform(1, 20, (k, 2))], 1)
        clutter_labels = np.zeros(k, dtype=np.int64) if crowded else rng.integers(0, 4, k)
        boxes = np.concatenate([near, clutter])
        scores = rng.random(len(boxes))
        if ties:
            scores = np.round(scores, 1)
        targets.append({"boxes": torch.from_numpy(gt), "labels": torch.from_numpy(gt_labels)})
        predictions.append({"boxes": torch.from_numpy(boxes), "scores": torch.from_numpy(scores),
                            "labels": torch.from_numpy(np.concatenate([labels,
                                                                       clutter_labels]))})
    return predictions, targets


def _coco_stats(predictions, targets):
    coco_module = pytest.importorskip("pycocotools.coco")
    cocoeval = pytest.importorskip("pycocotools.cocoeval")

    def xywh(box):
        x1, y1, x2, y2 = (float(v) for v in box)
        return [x1, y1, x2 - x1, y2 - y1]

    annotations, results = [], []
    for i, (pred, target) in enumerate(zip(predictions, targets, strict=True)):
        for box, label in zip(target["boxes"], target["labels"], strict=True):
            bbox = xywh(box)
            # ids from 1: COCOeval reads a match with gt id 0 as no match.
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": int(label) + 1, "bbox": bbox,
                                "area": bbox[2] * bbox[3], "iscrowd": 0})
        for box, score, label in zip(pred["boxes"], pred["scores"], pred["labels"], strict=True):
            results.append({"image_id": i + 1, "category_id": int(label) + 1, "bbox": xywh(box),
                            "score": float(score)})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco_module.COCO()
        gt.dataset = {"images": [{"id": i + 1} for i in range(len(targets))],
                      "annotations": annotations,
                      "categories": [{"id": c + 1} for c in range(4)]}
        gt.createIndex()
        evaluator = cocoeval.COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


@pytest.mark.parametrize("seed, crowded, ties", [(0, False, False), (1, False, False),
                                                  (2, False, True), (3, True, False)])
def test_parity_with_pycocotools(seed, crowded, ties):
    predictions, targets = _random_case(seed, crowded=crowded, ties=ties)
    stats = _coco_stats(predictions, targets)
    ours = mean_average_precision(predictions, targets)
    # stats: 0 mAP@[.5:.95], 1 mAP@.5, 2 mAP@.75, 8 AR@100, all for the 'all' area range.
    assert 0.05 < stats[0] < 0.95
    assert abs(ours["map"] - stats[0]) < 1e-6
    assert abs(ours["map_50"] - stats[1]) < 1e-6
    assert abs(ours["map_75"] - stats[2]) < 1e-6
    assert abs(ours["recall"] - stats[8]) < 1e-6
