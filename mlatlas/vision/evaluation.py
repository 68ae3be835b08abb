r"""Detection metrics: mAP@0.5 and COCO's mAP@[.5:.95], by pycocotools' rules.

Detections and ground truth are matched per image and class at an IoU threshold t. Within one
image and class the detections are taken in order of score (highest first; equal scores keep
their input order, a stable sort as pycocotools' mergesort), at most ``max_detections`` of them,
and each is matched greedily to the ground-truth box of highest IoU among those still
unmatched, provided that IoU >= t (pycocotools takes the last of equal best IoUs). A matched
detection is a true positive, any other a false positive.

Per class, all detections of all images are sorted by score (stable, the images in list order)
and, after the k highest,

    precision_k = TP_k / (TP_k + FP_k),        recall_k = TP_k / G,

G being the class's ground-truth boxes. The precision envelope p(r) = max_{k : recall_k >= r}
precision_k makes the curve monotone, and COCO's 101-point interpolated average precision is

    AP_t = (1 / 101) sum_{r in {0, 0.01, ..., 1}} p(r)        (p(r) = 0 past the last recall).

mAP_t is the mean of AP_t over the classes that have ground truth in some image (a class with
none is ignored, whatever was predicted for it); COCO's mAP is the mean over t in
{0.50, 0.55, ..., 0.95}. ``interpolation="all"`` replaces the 101 points by the area under the
envelope, sum_k (recall_k - recall_{k-1}) p(recall_k) (PASCAL VOC's all-point AP since 2010;
the matching stays COCO's).

These are pycocotools' COCOeval rules for bounding boxes with the "all" area range, no crowd
boxes and maxDets = 100: IoU from areas (x2 - x1)(y2 - y1), no +1; the recall points and IoU
thresholds are the same floating-point values (numpy.linspace); precision's denominator has
pycocotools' + numpy.spacing(1). One rule worth knowing: COCOeval's maxDets caps the
detections per image *and class* (computeIoU and evaluateImg cut each image-class list), not
per image as the COCO documentation words it; ``max_detections`` does the same, so that the
numbers agree with pycocotools'.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from mlatlas.vision.boxes import box_iou

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def _match(iou: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Greedy matching of score-sorted detections (rows of ``iou``, (D, G)) at every threshold
    at once: (T, D) bool, True where the detection matched a ground-truth box."""
    n_thresholds, (n_det, n_gt) = len(thresholds), iou.shape
    hits = np.zeros((n_thresholds, n_det), dtype=bool)
    if n_det == 0 or n_gt == 0:
        return hits
    limit = np.minimum(thresholds, 1 - 1e-10)[:, None]             # pycocotools' cap at t = 1
    taken = np.zeros((n_thresholds, n_gt), dtype=bool)
    rows = np.arange(n_thresholds)
    # A detection under the lowest threshold with every box matches nothing: skip it.
    for d in np.flatnonzero(iou.max(1) >= limit.min()):
        ok = ~taken & (iou[d] >= limit)                                    # (T, G)
        hit = ok.any(1)
        if not hit.any():
            continue
        # The best IoU among the allowed boxes, the last of equals (reversed argmax).
        best = n_gt - 1 - np.where(ok, iou[d], -1.0)[:, ::-1].argmax(1)
        hits[hit, d] = True
        taken[rows[hit], best[hit]] = True
    return hits


def _average_precision(hits: np.ndarray, n_gt: int,
                       interpolation: Literal["coco", "all"]) -> tuple[np.ndarray, np.ndarray]:
    """AP and final recall per threshold, (T,) each, from the (T, D) hits of the class's
    score-sorted detections and its ``n_gt`` > 0 ground-truth boxes."""
    n_thresholds, n_det = hits.shape
    if n_det == 0:
        return np.zeros(n_thresholds), np.zeros(n_thresholds)
    tp = np.cumsum(hits, axis=1, dtype=np.float64)
    fp = np.cumsum(~hits, axis=1, dtype=np.float64)
    recall = tp / n_gt
    precision = tp / (tp + fp + np.spacing(1))
    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    if interpolation == "all":
        steps = np.diff(recall, axis=1, prepend=0.0)
        return (steps * envelope).sum(1), recall[:, -1]
    ap = np.empty(n_thresholds)
    for t in range(n_thresholds):
        at = np.searchsorted(recall[t], RECALL_POINTS, side="left")
        reached = at < n_det
        ap[t] = np.where(reached, envelope[t, np.minimum(at, n_det - 1)], 0.0).sum() / len(at)
    return ap, recall[:, -1]


def _numpy(x, dtype, shape_tail: tuple[int, ...], what: str) -> np.ndarray:
    array = torch.as_tensor(x).detach().cpu().to(dtype).numpy()
    if array.size == 0:
        array = array.reshape(0, *shape_tail)
    if array.ndim != 1 + len(shape_tail) or array.shape[1:] != shape_tail:
        expected = "(n, 4)" if shape_tail else "(n,)"
        raise ValueError(f"{what} must have shape {expected}, got {tuple(array.shape)}")
    return array


def mean_average_precision(predictions: Sequence[dict], targets: Sequence[dict],
                           iou_thresholds: Sequence[float] | None = None,
                           max_detections: int = 100,
                           interpolation: Literal["coco", "all"] = "coco") -> dict:
    """mAP of ``predictions`` against ``targets``, one dict per image, in the same order:
    predictions {"boxes": (n, 4) (x1, y1, x2, y2), "scores": (n,), "labels": (n,) int}, targets
    {"boxes": (m, 4), "labels": (m,)}; tensors or arrays.

    Returns {"map": mean over ``iou_thresholds`` (COCO's 0.50:0.05:0.95 by default; COCOeval's
    stats[0]), "map_50", "map_75" (stats[1], stats[2]), "recall": mean over thresholds and
    classes of the recall at ``max_detections`` (stats[8]), "per_class_ap50" and
    "per_class_ap": {label: AP}}; the maps are nan when no target holds a box.
    ``max_detections`` caps each image's detections per class (see the module's docstring)."""
    if len(predictions) != len(targets):
        raise ValueError(f"predictions and targets must be per image, got {len(predictions)} "
                         f"and {len(targets)}")
    if interpolation not in ("coco", "all"):
        raise ValueError(f"interpolation must be coco or all, got {interpolation!r}")
    if max_detections < 1:
        raise ValueError(f"max_detections must be at least 1, got {max_detections}")
    chosen = COCO_IOU_THRESHOLDS if iou_thresholds is None else np.asarray(
        iou_thresholds, dtype=np.float64).reshape(-1)
    if len(chosen) == 0 or not ((chosen >= 0) & (chosen <= 1)).all():
        raise ValueError(f"iou_thresholds must be non-empty, in [0, 1], got {iou_thresholds}")
    # 0.5 and 0.75 are matched too, whatever was chosen (COCO's own float values).
    thresholds = np.concatenate([chosen, COCO_IOU_THRESHOLDS[[0, 5]]])
    n_thresholds = len(thresholds)

    # Per class: the hits (T, D_i) and scores of each image, in image order; the gt count.
    hits: dict[int, list[np.ndarray]] = {}
    scores: dict[int, list[np.ndarray]] = {}
    n_gt: dict[int, int] = {}
    for i, (pred, target) in enumerate(zip(predictions, targets, strict=True)):
        p_boxes = _numpy(pred["boxes"], torch.float64, (4,), f"predictions[{i}]['boxes']")
        p_scores = _numpy(pred["scores"], torch.float64, (), f"predictions[{i}]['scores']")
        p_labels = _numpy(pred["labels"], torch.int64, (), f"predictions[{i}]['labels']")
        g_boxes = _numpy(target["boxes"], torch.float64, (4,), f"targets[{i}]['boxes']")
        g_labels = _numpy(target["labels"], torch.int64, (), f"targets[{i}]['labels']")
        if not len(p_boxes) == len(p_scores) == len(p_labels):
            raise ValueError(f"predictions[{i}] has {len(p_boxes)} boxes, {len(p_scores)} "
                             f"scores and {len(p_labels)} labels")
        if len(g_boxes) != len(g_labels):
            raise ValueError(f"targets[{i}] has {len(g_boxes)} boxes and {len(g_labels)} labels")
        # One IoU matrix per image; each class reads its block.
        iou = box_iou(torch.from_numpy(p_boxes), torch.from_numpy(g_boxes)).numpy()
        for c in np.union1d(p_labels, g_labels).tolist():
            gt = np.flatnonzero(g_labels == c)
            det = np.flatnonzero(p_labels == c)
            det = det[np.argsort(-p_scores[det], kind="stable")][:max_detections]
            n_gt[c] = n_gt.get(c, 0) + len(gt)
            hits.setdefault(c, []).append(_match(iou[np.ix_(det, gt)], thresholds))
            scores.setdefault(c, []).append(p_scores[det])

    per_class: dict[int, np.ndarray] = {}
    recalls: dict[int, np.ndarray] = {}
    for c in sorted(n_gt):
        if n_gt[c] == 0:
            continue
        class_scores = np.concatenate(scores[c])
        order = np.argsort(-class_scores, kind="stable")
        class_hits = np.concatenate(hits[c], axis=1)[:, order]
        per_class[c], recalls[c] = _average_precision(class_hits, n_gt[c], interpolation)

    if not per_class:
        nan = float("nan")
        return {"map": nan, "map_50": nan, "map_75": nan, "recall": nan,
                "per_class_ap50": {}, "per_class_ap": {}}
    ap = np.stack(list(per_class.values()))                         # (K, T)
    recall = np.stack(list(recalls.values()))
    n_chosen = n_thresholds - 2
    return {"map": float(ap[:, :n_chosen].mean()), "map_50": float(ap[:, -2].mean()),
            "map_75": float(ap[:, -1].mean()), "recall": float(recall[:, :n_chosen].mean()),
            "per_class_ap50": {c: float(v[-2]) for c, v in per_class.items()},
            "per_class_ap": {c: float(v[:n_chosen].mean()) for c, v in per_class.items()}}
