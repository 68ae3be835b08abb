r"""Boxes: areas, IoU, non-maximum suppression and the box coding of R-CNN.

Boxes are (x1, y1, x2, y2) in pixels with x2 >= x1 and y2 >= y1; a region of interest (RoI) is
(batch_index, x1, y1, x2, y2), the batch index naming the image of the feature map it pools.
Area and IoU use w = x2 - x1 with no +1, as torchvision and pycocotools do:

    IoU(a, b) = |a ∩ b| / (|a| + |b| - |a ∩ b|)

Non-maximum suppression keeps, in order of decreasing score, every box whose IoU with each
box already kept is at most a threshold. The greedy rule is a recursion on the score order,
keep_j = not exists i < j with keep_i and IoU(i, j) > t, which has exactly one solution. It is
solved here without a loop over boxes: iterate keep <- not any_i (M_ij and keep_i) with
M = triu(IoU > t, 1) from keep = all True, for many images or classes at once (padded). Index
j is right after (its longest chain of suppressors + 1) rounds, so the iteration stops at the
greedy answer in as many rounds as the longest suppression chain (a handful for real
detections), each one matrix-vector product.

Box coding (Girshick et al. 2014, Ren et al. 2015) with weights (w_x, w_y, w_w, w_h):

    t_x = w_x (x - x_a) / w_a      t_y = w_y (y - y_a) / h_a
    t_w = w_w log(w / w_a)         t_h = w_h log(h / h_a)

over box centres and sizes; decoding inverts it, t_w and t_h clamped at log(1000 / 16) so that
a wild regression cannot overflow exp.
"""

from __future__ import annotations

import math

import torch

BBOX_CLIP = math.log(1000.0 / 16)


class BoxError(ValueError):
    """Boxes or regions of interest of the wrong shape or with x2 < x1 / y2 < y1."""


def check_boxes(boxes: torch.Tensor, name: str = "boxes") -> torch.Tensor:
    """``boxes`` (..., 4) as (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1, finite; else a
    BoxError naming the first bad row."""
    if boxes.dim() < 2 or boxes.shape[-1] != 4:
        raise BoxError(f"{name} must have shape (N, 4) as (x1, y1, x2, y2), got "
                       f"{tuple(boxes.shape)}")
    _check_corners(boxes.reshape(-1, 4), name, 0)
    return boxes


def check_rois(rois: torch.Tensor, batch_size: int, name: str = "rois") -> torch.Tensor:
    """``rois`` (K, 5) as (batch_index, x1, y1, x2, y2): corners ordered, batch indices integers
    in 0..batch_size-1; else a BoxError naming the first bad row."""
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise BoxError(f"{name} must have shape (K, 5) as (batch_index, x1, y1, x2, y2), got "
                       f"{tuple(rois.shape)}")
    _check_corners(rois[:, 1:], name, 1)
    index = rois[:, 0]
    bad = (index < 0) | (index >= batch_size) | (index != index.round())
    if bad.any():
        k = int(bad.nonzero()[0])
        raise BoxError(f"{name}[{k}] has batch index {float(index[k]):g}, outside the input's "
                       f"batch of {batch_size} (0..{batch_size - 1})")
    return rois


def _check_corners(boxes: torch.Tensor, name: str, first: int) -> None:
    if not boxes.isfinite().all():
        k = int((~boxes.isfinite()).any(1).nonzero()[0])
        raise BoxError(f"{name}[{k}] is not finite: {boxes[k].tolist()}")
    bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bad.any():
        k = int(bad.nonzero()[0])
        x1, y1, x2, y2 = boxes[k].tolist()
        raise BoxError(f"{name}[{k}] has x2 < x1 or y2 < y1: (x1, y1, x2, y2) = "
                       f"({x1:g}, {y1:g}, {x2:g}, {y2:g}) in columns {first}..{first + 3}")


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(...,) areas (x2 - x1)(y2 - y1) of (..., 4) boxes."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., N, M) IoU of every box of ``a`` (..., N, 4) with every box of ``b`` (..., M, 4),
    leading dimensions broadcast (a batch of images); 0 where both boxes are empty."""
    check_boxes(a, "a")
    check_boxes(b, "b")
    top_left = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    bottom_right = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    overlap = (bottom_right - top_left).clamp(min=0)
    # Not .prod(-1): its backward takes a slow zero-safe path whenever a factor is 0, as it is
    # for every disjoint pair (47 ms instead of ~3 for 2000 x 2000 on a GPU).
    inter = overlap[..., 0] * overlap[..., 1]
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), 0.0)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes greedy non-maximum suppression keeps, by decreasing score (ties in
    input order). ``boxes`` (N, 4), ``scores`` (N,). O(N^2) memory for the IoU matrix."""
    check_boxes(boxes)
    if scores.shape != boxes.shape[:1]:
        raise BoxError(f"scores must have shape ({len(boxes)},) to match boxes, got "
                       f"{tuple(scores.shape)}")
    keep = nms_padded(boxes[None], scores[None], torch.ones_like(scores, dtype=torch.bool)[None],
                      iou_threshold)[0]
    kept = keep.nonzero().squeeze(1)
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]


def nms_padded(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor,
               iou_threshold: float) -> torch.Tensor:
    """NMS in each of G independent sets at once: ``boxes`` (G, M, 4), ``scores`` (G, M) and
    ``valid`` (G, M) (padding is not valid and suppresses nothing); the (G, M) mask of the boxes
    kept, in their input positions. O(G M^2) memory."""
    order = torch.sort(torch.where(valid, scores, -torch.inf), dim=1, descending=True,
                       stable=True).indices
    ordered = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    usable = valid.gather(1, order)
    # suppresses[g, i, j]: box i (higher score) would suppress box j (lower score), from
    # IoU > t <=> |i ∩ j| (1 + t) > t (|i| + |j|): no division, overlaps built in place.
    x1, y1, x2, y2 = ordered.unbind(-1)
    overlap = torch.minimum(x2[:, :, None], x2[:, None, :]).sub_(
        torch.maximum(x1[:, :, None], x1[:, None, :])).clamp_(min=0)
    overlap.mul_(torch.minimum(y2[:, :, None], y2[:, None, :]).sub_(
        torch.maximum(y1[:, :, None], y1[:, None, :])).clamp_(min=0))
    area = box_area(ordered) * iou_threshold
    suppresses = torch.triu(overlap.mul_(1 + iou_threshold) > area[:, :, None] + area[:, None, :],
                            diagonal=1)
    suppresses = (suppresses & usable[:, :, None]).to(boxes.dtype)
    keep = usable
    while True:
        new = usable & ((keep.to(boxes.dtype)[:, None, :] @ suppresses)[:, 0] == 0)
        if torch.equal(new, keep):
            return torch.zeros_like(valid).scatter(1, order, keep)
        keep = new


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """NMS within each group (class, image) independently; indices kept, by decreasing score.
    The groups are padded into one (G, M) batch for :func:`nms_padded`, so the IoU matrices are
    per group (G M^2), not over all boxes (N^2)."""
    check_boxes(boxes)
    if len(boxes) == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    _, group = torch.unique(groups, return_inverse=True)
    by_group = torch.sort(group, stable=True)
    counts = torch.bincount(group)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(len(boxes), device=boxes.device) - starts[by_group.values]
    shape = (len(counts), int(counts.max()))
    padded = boxes.new_zeros(*shape, 4)
    padded[by_group.values, rank] = boxes[by_group.indices]
    padded_scores = scores.new_zeros(shape)
    padded_scores[by_group.values, rank] = scores[by_group.indices]
    valid = torch.zeros(shape, dtype=torch.bool, device=boxes.device)
    valid[by_group.values, rank] = True
    keep = nms_padded(padded, padded_scores, valid, iou_threshold)
    kept = torch.sort(by_group.indices[keep[by_group.values, rank]]).values
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]


def _centres(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode_boxes(targets: torch.Tensor, anchors: torch.Tensor,
                 weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
                 ) -> torch.Tensor:
    """(N, 4) regression targets (t_x, t_y, t_w, t_h) of ``targets`` relative to ``anchors``."""
    x, y, w, h = _centres(targets)
    xa, ya, wa, ha = _centres(anchors)
    wx, wy, ww, wh = weights
    return torch.stack([wx * (x - xa) / wa, wy * (y - ya) / ha,
                        ww * torch.log(w / wa), wh * torch.log(h / ha)], -1)


def decode_boxes(deltas: torch.Tensor, anchors: torch.Tensor,
                 weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 clip: float = BBOX_CLIP) -> torch.Tensor:
    """The boxes (..., 4) that ``deltas`` (..., 4) encode relative to ``anchors`` (..., 4)."""
    xa, ya, wa, ha = _centres(anchors)
    wx, wy, ww, wh = weights
    x = deltas[..., 0] / wx * wa + xa
    y = deltas[..., 1] / wy * ha + ya
    w = torch.exp((deltas[..., 2] / ww).clamp(max=clip)) * wa
    h = torch.exp((deltas[..., 3] / wh).clamp(max=clip)) * ha
    return torch.stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], -1)


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes clamped into the image [0, width] x [0, height]."""
    x = boxes[..., 0::2].clamp(0, width)
    y = boxes[..., 1::2].clamp(0, height)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1)
