r"""One training loop and one evaluation for the two-stage detectors (Faster R-CNN, R-FCN).

Each step draws a batch of generated images with boxes (:mod:`mlatlas.data.detection`), runs
the backbone, the RPN and the method's head, and takes one AdamW step on

    L = L_rpn_objectness + L_rpn_box + L_head_classification + L_head_box

(:mod:`mlatlas.vision.detector` gives the terms), with a warm-up then cosine learning rate.

Evaluation detects on the held-out images. It reports COCO's mAP@[.5:.95] and mAP@0.5
(:mod:`mlatlas.vision.evaluation`, the rules of pycocotools), beside the same scores of the
untrained network (``baseline/``). It also scores the images of :func:`unusual_scales`, whose
objects are larger or smaller than any in training (``eval/unusual_*``), and the share of
objects the proposals cover (``eval/proposal_recall``: the best proposal's IoU >= 0.5). It
writes ``detections.png``: the predicted boxes over test images, beside the ground truth; and,
for a deformable backbone, ``sampling.png``: the points its two deformable layers read for one
feature cell, on large and small objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from mlatlas.core import distributed
from mlatlas.core.config import BatchConfig, ConfigError, check_options, require_at_least
from mlatlas.core.optim import set_lr, warmup_cosine_lr
from mlatlas.core.plots import metric_curves
from mlatlas.core.precision import Precision, compile_module
from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import resolve_device, seed_everything
from mlatlas.data import EpochBatches
from mlatlas.data.detection import CLASSES, Detections, detection_shapes, unusual_scales
from mlatlas.vision.boxes import box_iou
from mlatlas.vision.detector import (
    STRIDE,
    Backbone,
    Detector,
    detections,
    head_loss,
    head_targets,
    propose,
    rpn_loss,
    to_rois,
)
from mlatlas.vision.evaluation import mean_average_precision

ANCHOR_SIZES = (12.0, 24.0, 48.0)
ANCHOR_RATIOS = (0.5, 1.0, 2.0)
# Image sides must reach the stride-4 grid exactly (and the tests use 32 and up).
STRIDE_MULTIPLE = 8


@dataclass
class DetectionConfig(BatchConfig):
    """Fields shared by the two-stage detectors; a method's ``Config`` names its head."""

    METHOD: ClassVar[str] = ""
    RESUMABLE: ClassVar[frozenset[str]] = BatchConfig.RESUMABLE | {"eval_images"}

    dataset: Literal["detection-shapes"] = "detection-shapes"
    """Generated images with 1-4 shapes at random scales and positions, their boxes and classes."""
    train_images: int = 2000
    """Training images generated (seed 0, split 'train')."""
    image_size: int = 64
    """Side of the generated images, in pixels."""
    max_objects: int = 4
    """At most this many objects per image."""
    steps: int = 1500
    """Optimisation steps."""
    batch_size: int = 16
    """Images per step."""
    lr: float = 2e-3
    """Peak learning rate of AdamW (linear warm-up over ``warmup_steps``, then cosine)."""
    warmup_steps: int = 100
    """Steps of linear learning-rate warm-up."""
    weight_decay: float = 1e-4
    """AdamW's decoupled weight decay."""
    grad_clip: float = 10.0
    """Clip the global gradient norm to this value (0 turns clipping off)."""
    width: int = 32
    """Channels of the backbone (its stride-4 features have 2 width)."""
    deformable: bool = False
    """Make the backbone's last two 3x3 convolutions deformable (v2, modulated)."""
    pre_nms: int = 300
    """Proposals kept per image before the RPN's NMS (training)."""
    post_nms: int = 64
    """Proposals kept per image after it (training); half of it at test time."""
    rpn_batch: int = 256
    """Anchors sampled per image for the RPN's loss (at most half positive)."""
    head_batch: int = 64
    """Regions sampled per image for the head's loss (at most a quarter objects)."""
    eval_images: int = 500
    """Held-out images scored at the end of training (0 skips the evaluation)."""

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "train_images", "max_objects", "pre_nms", "post_nms",
                         "rpn_batch", "head_batch")
        if self.image_size < 32 or self.image_size % STRIDE_MULTIPLE:
            raise ConfigError(f"--image-size must be a multiple of {STRIDE_MULTIPLE} and at "
                              f"least 32, got {self.image_size}")
        if self.width < 8 or self.width % 2:
            raise ConfigError(f"--width must be even and at least 8, got {self.width}")
        if self.batch_size > self.train_images:
            raise ConfigError(f"--batch-size {self.batch_size} exceeds --train-images "
                              f"{self.train_images}")

    def head(self, channels: int, classes: int) -> nn.Module:
        """The per-region head: ``head(features, rois) -> (class_logits, box_deltas)``."""
        raise NotImplementedError


@dataclass
class SampleOptions:
    """How to show a trained detector's predictions."""

    score_threshold: float = 0.5
    """Draw the detections scoring at least this."""

    def __post_init__(self) -> None:
        check_options(self)
        if not 0 <= self.score_threshold <= 1:
            raise ConfigError(f"--score-threshold must lie in [0, 1], got "
                              f"{self.score_threshold}")


def pad_targets(data: Detections, max_objects: int) -> tuple[torch.Tensor, ...]:
    """(N, G, 4) boxes, (N, G) labels and (N, G) validity, every image's ground truth padded to
    G = max_objects."""
    n = len(data)
    boxes = torch.zeros(n, max_objects, 4)
    labels = torch.zeros(n, max_objects, dtype=torch.long)
    counts = torch.tensor([len(b) for b in data.boxes])
    valid = torch.arange(max_objects)[None] < counts[:, None]
    if n:
        boxes[valid] = torch.cat(data.boxes)
        labels[valid] = torch.cat(data.labels)
    return boxes, labels, valid


def build_model(cfg: DetectionConfig) -> Detector:
    backbone = Backbone(cfg.width, cfg.deformable)
    return Detector(backbone, cfg.head(backbone.out_channels, len(CLASSES)), ANCHOR_SIZES,
                    ANCHOR_RATIOS)


def losses(model: Detector, cfg: DetectionConfig, images: torch.Tensor, gt_boxes: torch.Tensor,
           gt_labels: torch.Tensor, gt_valid: torch.Tensor,
           generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The four loss terms of one batch, and the RPN's positive count."""
    size = tuple(images.shape[2:])
    features = model.backbone(images)
    anchors = model.anchors(features)
    logits, deltas = model.rpn(features)
    b = len(images)
    keys = distributed.rand((b, len(anchors)), generator=generator).to(images.device)
    objectness, rpn_box, metrics = rpn_loss(logits, deltas, anchors, gt_boxes, gt_valid, keys,
                                            cfg.rpn_batch)
    proposals, valid = propose(logits, deltas, anchors, size, cfg.pre_nms, cfg.post_nms)
    keys = distributed.rand((b, proposals.shape[1] + gt_boxes.shape[1]),
                            generator=generator).to(images.device)
    rois, labels, regression, is_object = head_targets(proposals, valid, gt_boxes, gt_labels,
                                                       gt_valid, keys, cfg.head_batch)
    class_logits, box_deltas = model.head(features, rois)
    classification, box = head_loss(class_logits, box_deltas, labels, regression, is_object)
    return {"rpn_objectness": objectness, "rpn_box": rpn_box, "classification": classification,
            "box": box, **metrics}


def train(cfg: DetectionConfig, run: Run | None = None, progress: bool | None = None) -> Run:
    """Train (or, given a run with a checkpoint, resume) a detector."""
    run = run or Run.create(cfg.METHOD, cfg)
    device = resolve_device(cfg.device)
    generator = seed_everything(cfg.seed)
    data = detection_shapes(cfg.train_images, seed=0, split="train", image_size=cfg.image_size,
                            max_objects=cfg.max_objects)
    images = data.images.to(device)
    gt_boxes, gt_labels, gt_valid = (t.to(device) for t in pad_targets(data, cfg.max_objects))
    model = build_model(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    precision = Precision(cfg.precision, device)
    batches = EpochBatches(len(images), cfg.batch_size, cfg.seed)
    compile_module(model, cfg.compile)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        set_lr(optimizer, warmup_cosine_lr(cfg.lr, step, cfg.steps, cfg.warmup_steps))
        index = distributed.shard(batches(step)).to(device)
        with precision.autocast():
            terms = losses(model, cfg, images[index], gt_boxes[index], gt_labels[index],
                           gt_valid[index], generator)
        loss = sum(v for k, v in terms.items() if k != "rpn_positives")
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer, model.parameters(), cfg.grad_clip)
        return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}

    fit(run, step_fn, total_steps=cfg.steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
        objects={"model": model, "optimizer": optimizer, "rng": generator,
                 "precision": precision}, progress=progress)
    if not distributed.is_main():
        return run
    names = [k for k in run.last_row() if k not in ("step", "wall_s", "rpn_positives")]
    run.save_figure(metric_curves(run.metrics, names, log=True,
                                  title=f"{cfg.METHOD}: training losses"), "loss.png")
    run.write_summary({"train/steps": cfg.steps,
                       **{f"train/{k}": run.last_row()[k] for k in names}})
    if cfg.eval_images:
        evaluate(run, progress=progress)
    return run


# --- a trained run -------------------------------------------------------------------------------

def load_model(run: Run) -> tuple[DetectionConfig, Detector]:
    cfg = run.load_config()
    if not isinstance(cfg, DetectionConfig):
        raise ConfigError(f"{run.dir} is a {run.method} run, not a detector's")
    model = build_model(cfg)
    run.load_weights(model, "model")
    return cfg, model.to(resolve_device(cfg.device)).eval()


@torch.no_grad()
def detect(model: Detector, images: torch.Tensor, cfg: DetectionConfig,
           batch: int = 50) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Per image {"boxes", "scores", "labels"} on the CPU, and the (N, post_nms / 2, 4)
    proposals with their validity, for (N, 3, S, S) images."""
    device = next(model.parameters()).device
    out, proposals = [], []
    for start in range(0, len(images), batch):
        x = images[start:start + batch].to(device)
        features = model.backbone(x)
        logits, deltas = model.rpn(features)
        anchors = model.anchors(features)
        boxes, valid = propose(logits, deltas, anchors, tuple(x.shape[2:]), cfg.pre_nms // 2,
                               cfg.post_nms // 2)
        class_logits, box_deltas = model.head(features, to_rois(boxes, valid))
        found = detections(boxes, valid, class_logits.float(), box_deltas.float(),
                           tuple(x.shape[2:]))
        out += [{k: v.cpu() for k, v in d.items()} for d in found]
        proposals.append(torch.where(valid[..., None], boxes, 0.0).cpu())
    return out, torch.cat(proposals)


def proposal_recall(proposals: torch.Tensor, data: Detections, max_objects: int) -> float:
    """Share of ground-truth objects whose best proposal has IoU >= 0.5."""
    gt_boxes, _, gt_valid = pad_targets(data, max_objects)
    best = box_iou(gt_boxes, proposals).amax(2)
    return float((best[gt_valid] >= 0.5).float().mean())


def _targets(data: Detections) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": b, "labels": y} for b, y in zip(data.boxes, data.labels, strict=True)]


def _test_data(cfg: DetectionConfig, n: int) -> Detections:
    return detection_shapes(n, seed=0, split="test", image_size=cfg.image_size,
                            max_objects=cfg.max_objects)


def sample(run: Run, n: int = 16, seed: int = 0, progress: bool | None = None,
           options: SampleOptions | None = None) -> torch.Tensor:
    """n test images (from ``seed``) with the predicted boxes drawn in, in class colours."""
    options = options or SampleOptions()
    cfg, model = load_model(run)
    data = detection_shapes(n, seed=seed, split="test", image_size=cfg.image_size,
                            max_objects=cfg.max_objects)
    found, _ = detect(model, data.images, cfg)
    return draw_boxes(data.images, [{k: v[d["scores"] >= options.score_threshold]
                                     for k, v in d.items()} for d in found])


BOX_COLOURS = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])


def draw_boxes(images: torch.Tensor, found: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Copies of (N, 3, S, S) images with each detection's box outline painted in its class's
    colour (white circle, cyan square, magenta triangle, yellow cross)."""
    out = images.clone()
    h, w = images.shape[2:]
    ys, xs = torch.arange(h)[:, None], torch.arange(w)[None, :]
    for i, d in enumerate(found):
        for box, label in zip(d["boxes"].round().long().tolist(), d["labels"].tolist(),
                              strict=True):
            x1, y1, x2, y2 = box
            x2, y2 = max(x2 - 1, x1), max(y2 - 1, y1)
            inside = (ys >= y1) & (ys <= y2) & (xs >= x1) & (xs <= x2)
            edge = inside & ((ys == y1) | (ys == y2) | (xs == x1) | (xs == x2))
            out[i] = torch.where(edge, BOX_COLOURS[label % len(BOX_COLOURS)].view(3, 1, 1),
                                 out[i])
    return out


def detections_figure(data: Detections, found: list[dict[str, torch.Tensor]], title: str,
                      count: int = 8, threshold: float = 0.5):
    """Test images with predicted boxes (labels and scores) above the ground truth."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    count = min(count, len(data))
    fig, axes = plt.subplots(2, count, figsize=(1.9 * count, 4.2), squeeze=False)
    for j in range(count):
        for row, (boxes, labels, scores) in enumerate([
                (found[j]["boxes"], found[j]["labels"], found[j]["scores"]),
                (data.boxes[j], data.labels[j], torch.ones(len(data.labels[j])))]):
            ax = axes[row, j]
            ax.imshow(data.images[j].permute(1, 2, 0).clamp(0, 1).numpy())
            for box, label, score in zip(boxes.tolist(), labels.tolist(), scores.tolist(),
                                         strict=True):
                if score < threshold:
                    continue
                x1, y1, x2, y2 = box
                colour = BOX_COLOURS[label % len(BOX_COLOURS)].tolist()
                ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False,
                                       edgecolor=colour, linewidth=1.2))
                text = CLASSES[label] if row else f"{CLASSES[label]} {score:.2f}"
                ax.text(x1 - 0.5, y1 - 1.5, text, color=colour, fontsize=5.5)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, j].set_title(f"test {j}", fontsize=8)
    axes[0, 0].set_ylabel(f"predicted (>= {threshold:g})", fontsize=8)
    axes[1, 0].set_ylabel("ground truth", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


@torch.no_grad()
def sampling_points(model: Detector, image: torch.Tensor, at: tuple[int, int]) -> torch.Tensor:
    """(81, 2) image-plane (x, y) points the backbone's two deformable layers read for the
    feature cell ``at`` = (row, col): the last layer's 9 taps, then the previous layer's 9
    taps at each of them (rounded to its grid), as in Dai et al.'s figure."""
    layers = model.backbone.layers
    first, last = layers[-2][0], layers[-1][0]
    x_first = layers[:-2](image[None])
    x_last = layers[-2](x_first)
    taps = last.sampling_points(x_last)[0, 0, :, :, at[0], at[1]]            # (9, 2) as (y, x)
    inner = first.sampling_points(x_first)[0, 0]                              # (9, 2, H, W)
    h, w = inner.shape[2:]
    rows = taps[:, 0].round().long().clamp(0, h - 1)
    cols = taps[:, 1].round().long().clamp(0, w - 1)
    points = inner[:, :, rows, cols].permute(2, 0, 1).reshape(-1, 2)          # (81, 2)
    return (points.flip(1) + 0.5) * STRIDE


def sampling_figure(model: Detector, data: Detections, count: int = 4):
    """Where the deformable layers read, for the centre cell of the first object of test
    images, beside the regular grid's 9 x 9 dilated points."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, count, figsize=(2.6 * count, 2.9), squeeze=False)
    for j in range(count):
        ax = axes[0, j]
        image = data.images[j]
        x1, y1, x2, y2 = data.boxes[j][0].tolist()
        at = (int((y1 + y2) / 2 // STRIDE), int((x1 + x2) / 2 // STRIDE))
        points = sampling_points(model, image.to(next(model.parameters()).device), at).cpu()
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
        ax.scatter(points[:, 0] - 0.5, points[:, 1] - 0.5, s=4, c="red", label="learned")
        ax.scatter([(at[1] + 0.5) * STRIDE - 0.5], [(at[0] + 0.5) * STRIDE - 0.5], s=25,
                   c="lime", marker="+", label="output cell")
        ax.set_xlim(-0.5, image.shape[2] - 0.5)
        ax.set_ylim(image.shape[1] - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{CLASSES[int(data.labels[j][0])]}, side {x2 - x1:.0f} px", fontsize=8)
    axes[0, 0].legend(fontsize=6, loc="lower left")
    fig.suptitle("deformable sampling: 81 points of the last two layers for one cell")
    fig.tight_layout()
    return fig


def evaluate(run: Run, n: int | None = None, seed: int = 0, progress: bool | None = None,
             options: SampleOptions | None = None) -> dict:
    """Score the detector on n held-out images (None: the run's ``eval_images``) as the module
    docstring says; writes detections.png and summary.json's ``eval/`` and ``baseline/`` keys."""
    cfg, model = load_model(run)
    n = cfg.eval_images if n is None else n
    if n < 1:
        raise ConfigError(f"the evaluation needs at least 1 image, got {n}")
    data = _test_data(cfg, n)
    found, proposals = detect(model, data.images, cfg)
    scores = mean_average_precision(found, _targets(data))
    metrics = {"map": scores["map"], "map_50": scores["map_50"], "map_75": scores["map_75"],
               "proposal_recall": proposal_recall(proposals, data, cfg.max_objects),
               **{f"ap50_{CLASSES[int(k)]}": v for k, v in scores["per_class_ap50"].items()}}
    unusual = unusual_scales(n, seed=0, image_size=cfg.image_size, max_objects=cfg.max_objects)
    found_unusual, _ = detect(model, unusual.images, cfg)
    scores_unusual = mean_average_precision(found_unusual, _targets(unusual))
    metrics.update(unusual_map=scores_unusual["map"], unusual_map_50=scores_unusual["map_50"])
    with torch.random.fork_rng(devices=[]):  # the run's own initialisation, no side effect
        torch.manual_seed(cfg.seed)
        untrained = build_model(cfg).to(next(model.parameters()).device).eval()
    found_untrained, _ = detect(untrained, data.images, cfg)
    baseline = mean_average_precision(found_untrained, _targets(data))
    run.write_evaluation({"map": baseline["map"], "map_50": baseline["map_50"],
                          "model": "the untrained network (same initialisation seed)"},
                         prefix="baseline")
    run.save_figure(detections_figure(data, found, f"{cfg.METHOD} on held-out images"),
                    "detections.png")
    if cfg.deformable:
        mixed = Detections(torch.cat([unusual.images[:2], unusual.images[-2:]]),
                           unusual.boxes[:2] + unusual.boxes[-2:],
                           unusual.labels[:2] + unusual.labels[-2:])
        run.save_figure(sampling_figure(model, mixed), "sampling.png")
    run.write_evaluation(metrics)
    return {**metrics, "untrained_map_50": baseline["map_50"]}
