r"""A small two-stage detector: a backbone (optionally deformable), a region proposal network,
and a per-region head (Faster R-CNN's or R-FCN's, in their own modules).

**Backbone.** Convolutions to a stride-4 feature map. With ``deformable`` its last two 3x3
convolutions are deformable v2 (:class:`mlatlas.vision.deform.DeformConv2d`): each tap learns
where to read, so the receptive field can follow an object's size.

**RPN** (Ren et al. 2015). At every feature position there are A anchors (sizes x aspect ratios).
A 3x3 convolution predicts, for each anchor, an objectness logit o and box deltas t (the coding
of :mod:`mlatlas.vision.boxes`). Anchors are matched to the ground truth by IoU: positive at
>= 0.7, and also each ground-truth box's best anchors; negative below 0.3; the rest are ignored.
Each image samples 256 anchors, at most half of them positive, and the loss is

    L_rpn = (1/N_s) sum_sampled BCE(o_a, y_a) + (1/N_s) sum_positive smoothL1_{1/9}(t_a - t*_a)

Proposals are the decoded anchors with the highest objectness: the top ``pre_nms`` per image,
clipped to the image, NMS at 0.7, and the top ``post_nms`` of what is left.

**Head training.** The proposals and the ground-truth boxes are matched at IoU >= 0.5 (object)
or below (background). Each image samples 128 regions, a quarter of them objects. The head's loss
is cross-entropy over C + 1 classes plus smooth L1 on the object regions' deltas (weights
10, 10, 5, 5). **Inference:** softmax scores, per-class decoded boxes, a 0.05 score threshold,
NMS at 0.5 per class, and the top 100 per image.

Every step is batched over the images of a batch. Ground truth is padded to a fixed number of
boxes per image, proposals to ``post_nms``, and the per-image sampling ranks random keys. There
is no Python loop over images, anchors or regions. The random draws are made for the global
batch (:func:`mlatlas.core.distributed.rand`), and losses are normalised by global counts, so a
data-parallel job takes the steps of one process.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mlatlas.core import distributed
from mlatlas.vision.boxes import (
    batched_nms,
    box_iou,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    nms_padded,
)
from mlatlas.vision.deform import DeformConv2d

HEAD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
STRIDE = 4


def conv_block(c_in: int, c_out: int, stride: int = 1, dilation: int = 1,
               deformable: bool = False) -> nn.Sequential:
    conv = (DeformConv2d(c_in, c_out, 3, stride, dilation, dilation, modulated=True)
            if deformable else nn.Conv2d(c_in, c_out, 3, stride, dilation, dilation))
    # GroupNorm, not BatchNorm: statistics per image, so a rank's shard and the whole batch
    # normalise alike.
    return nn.Sequential(conv, nn.GroupNorm(math.gcd(8, c_out), c_out), nn.ReLU())


class Backbone(nn.Module):
    """(B, 3, H, W) -> (B, 2 width, H / 4, W / 4); receptive field 45 pixels."""

    def __init__(self, width: int = 32, deformable: bool = False):
        super().__init__()
        w = width
        self.out_channels = 2 * w
        self.layers = nn.Sequential(
            conv_block(3, w // 2), conv_block(w // 2, w, 2), conv_block(w, w),
            conv_block(w, 2 * w, 2), conv_block(2 * w, 2 * w),
            conv_block(2 * w, 2 * w, dilation=2, deformable=deformable),
            conv_block(2 * w, 2 * w, deformable=deformable))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def make_anchors(height: int, width: int, sizes: tuple[float, ...],
                 ratios: tuple[float, ...], stride: int = STRIDE) -> torch.Tensor:
    """(H W A, 4) anchors, position-major: A = len(sizes) len(ratios) boxes of area size^2 and
    h / w = ratio centred on every feature cell's centre."""
    s = torch.tensor(sizes, dtype=torch.float32)
    r = torch.tensor(ratios, dtype=torch.float32)
    w = (s[:, None] / r.sqrt()[None]).flatten()
    h = (s[:, None] * r.sqrt()[None]).flatten()
    base = torch.stack([-w, -h, w, h], 1) / 2                              # (A, 4)
    cy, cx = torch.meshgrid((torch.arange(height) + 0.5) * stride,
                            (torch.arange(width) + 0.5) * stride, indexing="ij")
    centres = torch.stack([cx, cy, cx, cy], -1).reshape(-1, 1, 4)
    return (centres + base).reshape(-1, 4)


def rank_within(keys: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """(B, N) rank of each eligible element among its image's eligible ones, by increasing key
    (ineligible ones rank after all of them)."""
    order = torch.where(eligible, keys, torch.inf).argsort(1)
    return order.argsort(1)


def sample_balanced(positive: torch.Tensor, negative: torch.Tensor, per_image: int,
                    positive_share: float, keys: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Masks (B, N) of the sampled positives and negatives: at most positive_share x per_image
    positives per image, the rest of per_image from the negatives, chosen by random ``keys``."""
    quota = int(per_image * positive_share)
    take_pos = positive & (rank_within(keys, positive) < quota)
    room = per_image - take_pos.sum(1, keepdim=True)
    take_neg = negative & (rank_within(keys, negative) < room)
    return take_pos, take_neg


def match(iou: torch.Tensor, valid_gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For (B, N, G) IoUs with (B, G) valid ground truth: each element's best IoU and index."""
    iou = iou.masked_fill(~valid_gt[:, None, :], -1.0)
    best, index = iou.max(2) if iou.shape[2] else (
        iou.new_full(iou.shape[:2], -1.0), iou.new_zeros(iou.shape[:2], dtype=torch.long))
    return best, index


def gather_boxes(boxes: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, N, 4) rows ``index`` (B, N) of (B, G, 4) boxes."""
    return boxes.gather(1, index[..., None].expand(-1, -1, 4))


def global_count(mask: torch.Tensor) -> torch.Tensor:
    """The count of ``mask`` over every rank's shard, divided by the ranks: normalising a local
    sum by it makes the mean of the ranks' gradients the one-process gradient."""
    total = distributed.all_reduce_sum(mask.sum().float().reshape(1))[0]
    return (total / distributed.world_size()).clamp(min=1.0)


class RPN(nn.Module):
    def __init__(self, channels: int, anchors_per_cell: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.objectness = nn.Conv2d(channels, anchors_per_cell, 1)
        self.deltas = nn.Conv2d(channels, anchors_per_cell * 4, 1)
        for layer in (self.conv, self.objectness, self.deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H W A) objectness logits and (B, H W A, 4) deltas, position-major like
        :func:`make_anchors`."""
        h = F.relu(self.conv(features))
        b = len(features)
        logits = self.objectness(h).permute(0, 2, 3, 1).reshape(b, -1)
        deltas = self.deltas(h).permute(0, 2, 3, 1).reshape(b, -1, 4)
        return logits, deltas


def rpn_loss(logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor,
             gt_boxes: torch.Tensor, gt_valid: torch.Tensor, keys: torch.Tensor,
             per_image: int = 256, positive_share: float = 0.5, high: float = 0.7,
             low: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The RPN's objectness and box losses for (B, A) logits, (B, A, 4) deltas, (A, 4) anchors,
    (B, G, 4) padded ground truth with (B, G) validity, (B, A) random sampling keys."""
    iou = box_iou(anchors.expand(len(gt_boxes), -1, -1), gt_boxes)        # (B, A, G)
    best, index = match(iou, gt_valid)
    # Each ground-truth box's best anchors are positive even below ``high``.
    per_gt_best = iou.masked_fill(~gt_valid[:, None, :], -1.0).amax(1, keepdim=True)
    is_best = ((iou == per_gt_best) & (per_gt_best > 0) & gt_valid[:, None, :]).any(2)
    positive = (best >= high) | is_best
    negative = (best < low) & (best >= 0) & ~positive
    negative |= (best < 0)  # an image without objects: every anchor is background
    take_pos, take_neg = sample_balanced(positive, negative, per_image, positive_share, keys)
    sampled = take_pos | take_neg
    count = global_count(sampled)
    objectness = F.binary_cross_entropy_with_logits(
        logits[sampled], take_pos[sampled].to(logits.dtype), reduction="sum") / count
    targets = encode_boxes(gather_boxes(gt_boxes, index)[take_pos],
                           anchors.expand(len(gt_boxes), -1, -1)[take_pos])
    box = F.smooth_l1_loss(deltas[take_pos], targets, beta=1 / 9, reduction="sum") / count
    return objectness, box, {"rpn_positives": take_pos.sum(1).float().mean()}


def propose(logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor,
            image_size: tuple[int, int], pre_nms: int, post_nms: int,
            nms_threshold: float = 0.7, min_size: float = 1.0
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, post_nms, 4) proposals and their (B, post_nms) validity, best objectness first."""
    top = logits.detach().topk(min(pre_nms, logits.shape[1]), 1)
    boxes = decode_boxes(gather_boxes(deltas.detach(), top.indices), anchors[top.indices])
    boxes = clip_boxes(boxes, *image_size)
    big = ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1])
                                                            >= min_size)
    survives = nms_padded(boxes, top.values, big, nms_threshold)
    scores = torch.where(survives, top.values, -torch.inf)
    best = scores.topk(min(post_nms, scores.shape[1]), 1)
    return gather_boxes(boxes, best.indices), best.values.isfinite()


def to_rois(boxes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(K, 5) regions (batch_index, x1, y1, x2, y2) of the (B, N, 4) boxes where ``mask``."""
    image = torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)
    image = image[:, None, None].expand(-1, boxes.shape[1], 1)
    return torch.cat([image, boxes], -1)[mask]


def head_targets(proposals: torch.Tensor, valid: torch.Tensor, gt_boxes: torch.Tensor,
                 gt_labels: torch.Tensor, gt_valid: torch.Tensor, keys: torch.Tensor,
                 per_image: int = 128, positive_share: float = 0.25, threshold: float = 0.5
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampled regions (K, 5), their class targets (K,) (0 = background), regression targets
    (K, 4), and the (K,) mask of object regions. The ground-truth boxes join the proposals, so
    the head sees good regions from the first step."""
    boxes = torch.cat([proposals, gt_boxes], 1)
    usable = torch.cat([valid, gt_valid], 1)
    best, index = match(box_iou(boxes, gt_boxes), gt_valid)
    positive = usable & (best >= threshold)
    negative = usable & (best < threshold)
    take_pos, take_neg = sample_balanced(positive, negative, per_image, positive_share, keys)
    sampled = take_pos | take_neg
    labels = torch.where(take_pos, gt_labels.gather(1, index) + 1, 0)[sampled]
    matched = gather_boxes(gt_boxes, index)[sampled]
    rois = to_rois(boxes, sampled)
    regression = encode_boxes(matched, rois[:, 1:], HEAD_WEIGHTS)
    return rois, labels, regression, take_pos[sampled]


def head_loss(class_logits: torch.Tensor, box_deltas: torch.Tensor, labels: torch.Tensor,
              regression: torch.Tensor, is_object: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cross-entropy over C + 1 classes and smooth L1 on the object regions' deltas of their
    class (``box_deltas`` (K, C + 1, 4), or (K, 1, 4) for class-agnostic boxes)."""
    count = global_count(torch.ones_like(labels, dtype=torch.bool))
    classification = F.cross_entropy(class_logits, labels, reduction="sum") / count
    which = labels if box_deltas.shape[1] > 1 else torch.zeros_like(labels)
    chosen = box_deltas[torch.arange(len(labels), device=labels.device), which]
    box = F.smooth_l1_loss(chosen[is_object], regression[is_object], beta=1 / 9,
                           reduction="sum") / count
    return classification, box


def detections(proposals: torch.Tensor, valid: torch.Tensor, class_logits: torch.Tensor,
               box_deltas: torch.Tensor, image_size: tuple[int, int],
               score_threshold: float = 0.05, nms_threshold: float = 0.5,
               per_image: int = 100) -> list[dict[str, torch.Tensor]]:
    """Per image {"boxes" (n, 4), "scores" (n,), "labels" (n,)} from the head's outputs on the
    flattened valid proposals (class indices 0..C-1, background dropped)."""
    rois = to_rois(proposals, valid)
    scores = class_logits.softmax(-1)[:, 1:]                               # (K, C)
    c = scores.shape[1]
    deltas = box_deltas[:, 1:] if box_deltas.shape[1] > 1 else box_deltas.expand(-1, c, -1)
    boxes = clip_boxes(decode_boxes(deltas, rois[:, None, 1:].expand(-1, c, -1),
                                    HEAD_WEIGHTS), *image_size)
    image = rois[:, 0].long()[:, None].expand(-1, c)
    label = torch.arange(c, device=scores.device)[None].expand(len(rois), -1)
    keep = (scores > score_threshold) & ((boxes[..., 2] > boxes[..., 0])
                                         & (boxes[..., 3] > boxes[..., 1]))
    boxes, scores, image, label = boxes[keep], scores[keep], image[keep], label[keep]
    kept = batched_nms(boxes, scores, image * c + label, nms_threshold)
    # kept is in decreasing score; the first per_image of each image survive.
    image_kept = image[kept]
    order = torch.sort(image_kept, stable=True)
    rank = torch.arange(len(kept), device=kept.device) - torch.searchsorted(
        order.values, order.values)
    chosen = kept[order.indices][rank < per_image]
    out = []
    counts = torch.bincount(image[chosen], minlength=len(proposals)).tolist()
    for part in chosen.split(counts):
        out.append({"boxes": boxes[part], "scores": scores[part], "labels": label[part]})
    return out


class Detector(nn.Module):
    """Backbone + RPN + a head (``head(features, rois) -> (class_logits (K, C + 1),
    box_deltas (K, C + 1 or 1, 4))``)."""

    def __init__(self, backbone: Backbone, head: nn.Module, sizes: tuple[float, ...],
                 ratios: tuple[float, ...]):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.sizes, self.ratios = sizes, ratios
        self.rpn = RPN(backbone.out_channels, len(sizes) * len(ratios))

    def anchors(self, features: torch.Tensor) -> torch.Tensor:
        return make_anchors(*features.shape[2:], self.sizes, self.ratios).to(features)
