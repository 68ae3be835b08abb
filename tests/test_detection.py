"""The detectors' parts against hand computations (anchors, balanced sampling, RPN matching,
head targets, inference, R-FCN's voting), runs of faster_rcnn, rfcn and spp_net end to end,
two ranks against one, and (slow) that the detectors learn far above their initialisation."""

import math

import pytest
import torch
from crashes import assert_same_checkpoints
from parallel import assert_close_params, train_run

from mlatlas.core.config import ConfigError
from mlatlas.core.run import CHECKPOINT, Run
from mlatlas.vision import common, detector, faster_rcnn, rfcn, spp_net
from mlatlas.vision.boxes import encode_boxes

TINY = dict(train_images=32, batch_size=8, steps=4, width=8, eval_images=6, log_every=2,
            ckpt_every=2)


def test_anchors_are_centred_on_the_cells_with_the_asked_areas_and_ratios():
    anchors = detector.make_anchors(2, 3, (8.0, 16.0), (0.5, 1.0, 2.0), stride=4)
    assert anchors.shape == (2 * 3 * 6, 4)
    first = anchors[:6]
    centres = (first[:, :2] + first[:, 2:]) / 2
    assert torch.allclose(centres, torch.tensor([2.0, 2.0]).expand(6, 2))
    w, h = first[:, 2] - first[:, 0], first[:, 3] - first[:, 1]
    torch.testing.assert_close(w * h, torch.tensor([64.0] * 3 + [256.0] * 3))
    torch.testing.assert_close(h / w, torch.tensor([0.5, 1.0, 2.0] * 2))
    # The next position along x is one stride to the right.
    assert torch.allclose(anchors[6:12, 0] - anchors[:6, 0], torch.tensor(4.0))


def test_balanced_sampling_keeps_the_quotas_per_image():
    g = torch.Generator().manual_seed(0)
    positive = torch.rand(3, 200, generator=g) < torch.tensor([[0.05], [0.5], [0.0]])
    negative = ~positive & (torch.rand(3, 200, generator=g) < 0.8)
    keys = torch.rand(3, 200, generator=g)
    take_pos, take_neg = detector.sample_balanced(positive, negative, 64, 0.25, keys)
    assert not (take_pos & ~positive).any() and not (take_neg & ~negative).any()
    assert take_pos.sum(1).tolist() == [min(int(positive[0].sum()), 16), 16, 0]
    assert (take_pos.sum(1) + take_neg.sum(1)).tolist() == [64, 64, 64]
    # The chosen ones are those with the smallest keys among the eligible.
    chosen = keys[1][take_pos[1]].max()
    assert (keys[1][positive[1] & ~take_pos[1]] > chosen).all()


def test_rpn_loss_by_hand():
    anchors = torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 30, 30], [0.0, 0, 30, 30],
                            [40.0, 40, 50, 50]])
    gt = torch.tensor([[[0.0, 0, 10, 10], [20.0, 20, 31, 31]]])
    valid = torch.tensor([[True, True]])
    logits = torch.tensor([[2.0, 0.0, -1.0, -3.0]])
    deltas = torch.zeros(1, 4, 4)
    objectness, box, _ = detector.rpn_loss(logits, deltas, anchors, gt, valid,
                                           torch.rand(1, 4), per_image=4)
    # Anchors 0 and 1 are positive (IoU 1 and 100/121 >= 0.7); anchor 2 has IoU 1/9 and 121/900
    # (< 0.3) and anchor 3 none: negatives. All four sampled.
    def bce(x, y):
        return -(y * math.log(torch.sigmoid(torch.tensor(x))) + (1 - y) * math.log(
            1 - torch.sigmoid(torch.tensor(x))))

    expected = (bce(2.0, 1) + bce(0.0, 1) + bce(-1.0, 0) + bce(-3.0, 0)) / 4
    assert float(objectness) == pytest.approx(float(expected), rel=1e-6)
    target = encode_boxes(gt[0, 1:], anchors[1:2])
    expected_box = torch.nn.functional.smooth_l1_loss(torch.zeros(1, 4), target, beta=1 / 9,
                                                      reduction="sum") / 4
    assert float(box) == pytest.approx(float(expected_box), rel=1e-6)


def test_each_ground_truth_gets_its_best_anchor_even_below_the_threshold():
    anchors = torch.tensor([[0.0, 0, 10, 10], [30.0, 30, 40, 40]])
    gt = torch.tensor([[[0.0, 0, 14, 14]]])  # IoU 100/196 with anchor 0, below 0.7
    _, _, metrics = detector.rpn_loss(torch.zeros(1, 2), torch.zeros(1, 2, 4), anchors, gt,
                                      torch.tensor([[True]]), torch.rand(1, 2))
    assert float(metrics["rpn_positives"]) == 1.0


def test_proposals_are_decoded_clipped_and_suppressed():
    anchors = torch.tensor([[0.0, 0, 10, 10], [1.0, 1, 11, 11], [20.0, 20, 60, 60]])
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    boxes, valid = detector.propose(logits, torch.zeros(1, 3, 4), anchors, (32, 32), 3, 3)
    assert valid.tolist() == [[True, True, True]]  # anchors 0 and 1: IoU 81/119 < 0.7
    assert boxes[0, 2].tolist() == [20.0, 20.0, 32.0, 32.0]  # the third box, clipped
    boxes, valid = detector.propose(logits, torch.zeros(1, 3, 4), anchors, (32, 32), 3, 3,
                                    nms_threshold=0.5)
    assert valid.tolist() == [[True, True, False]] and boxes[0, 1].tolist() == [20, 20, 32, 32]


def test_head_targets_include_the_ground_truth_with_zero_regression():
    proposals = torch.tensor([[[0.0, 0, 10, 10], [50.0, 50, 60, 60]]])
    gt = torch.tensor([[[1.0, 1, 11, 11]]])
    rois, labels, regression, is_object = detector.head_targets(
        proposals, torch.tensor([[True, True]]), gt, torch.tensor([[2]]),
        torch.tensor([[True]]), torch.rand(1, 3), per_image=8, positive_share=0.5)
    assert len(rois) == 3 and rois[:, 0].eq(0).all()
    assert sorted(labels.tolist()) == [0, 3, 3]  # class 2 -> label 3; the far box background
    gt_row = (rois[:, 1:] == gt[0]).all(1)
    assert torch.allclose(regression[gt_row], torch.zeros(1, 4), atol=1e-6)
    assert is_object.tolist() == (labels > 0).tolist()


def test_inference_scores_decodes_and_suppresses_per_class():
    proposals = torch.tensor([[[0.0, 0, 10, 10], [0.0, 0, 10, 10], [30.0, 30, 40, 40]]])
    logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 6.0]])
    found = detector.detections(proposals, torch.ones(1, 3, dtype=torch.bool), logits,
                                torch.zeros(3, 3, 4), (64, 64), score_threshold=0.3)
    (d,) = found
    assert d["labels"].tolist() == [1, 0]  # the duplicate of class 0 suppressed
    assert d["boxes"].tolist() == [[30, 30, 40, 40], [0, 0, 10, 10]]
    assert float(d["scores"][0]) == pytest.approx(math.exp(6) / (2 + math.exp(6)))


def test_rfcn_votes_the_position_sensitive_bins():
    head = rfcn.RFCNHead(4, classes=2, k=2)
    features = torch.randn(1, 4, 8, 8)
    rois = torch.tensor([[0, 0.0, 0, 32, 32], [0, 4.0, 8, 20, 24]])
    logits, deltas = head(features, rois)
    assert logits.shape == (2, 3) and deltas.shape == (2, 1, 4)
    maps = head.scores(features)
    manual = head.pool(maps, rois).mean((2, 3))
    torch.testing.assert_close(logits, manual)
    assert rfcn.vote(torch.arange(8.0).view(1, 2, 2, 2)).tolist() == [[1.5, 5.5]]


def test_faster_rcnn_head_shapes():
    head = faster_rcnn.FasterRCNNHead(8, classes=4, hidden=16)
    logits, deltas = head(torch.randn(2, 8, 16, 16), torch.tensor([[1, 0.0, 0, 20, 30]]))
    assert logits.shape == (1, 5) and deltas.shape == (1, 5, 4)


def test_config_refusals():
    with pytest.raises(ConfigError, match="--image-size must be a multiple of 8"):
        faster_rcnn.Config(image_size=60)
    with pytest.raises(ConfigError, match="--width must be even and at least 8"):
        rfcn.Config(width=13)
    with pytest.raises(ConfigError, match="--batch-size 64 exceeds --train-images 32"):
        faster_rcnn.Config(train_images=32, batch_size=64)
    with pytest.raises(ConfigError, match="--train-sizes must be comma-separated integers"):
        spp_net.Config(train_sizes="20,x")
    with pytest.raises(ConfigError, match="too small for the 4x4 level"):
        spp_net.Config(test_sizes="8,28")


# --- runs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("module, extra", [(faster_rcnn, {}), (rfcn, {"pooling": "pool"}),
                                           (rfcn, {"deformable": True})])
def test_detector_runs_evaluates_samples_and_resumes_exactly(module, extra, tmp_path,
                                                             monkeypatch):
    cfg = module.Config(**TINY, **extra)
    whole = common.train(cfg, Run.create(cfg.METHOD, cfg, tmp_path), progress=False)
    summary = whole.summary()
    for key in ("eval/map", "eval/map_50", "eval/proposal_recall", "eval/unusual_map_50",
                "baseline/map_50", "train/loss"):
        assert key in summary, key
    assert (whole.dir / "detections.png").exists()
    assert (whole.dir / "sampling.png").exists() == cfg.deformable
    assert common.sample(whole, 3, seed=1).shape == (3, 3, 64, 64)
    # Killed during step 3, after the step-2 checkpoint, and resumed: bitwise the whole run.
    calls, losses = [], common.losses

    def crash(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return losses(*args)

    monkeypatch.setattr(common, "losses", crash)
    run = Run.create(cfg.METHOD, cfg, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        common.train(cfg, run, progress=False)
    assert run.checkpoint_step() == 2
    monkeypatch.setattr(common, "losses", losses)
    common.train(cfg, Run.open(run.dir), progress=False)
    assert_same_checkpoints(whole.path(CHECKPOINT), run.path(CHECKPOINT))


def test_two_ranks_take_the_steps_of_one(tmp_path):
    flags = ("--train-images", "32", "--batch-size", "8", "--steps", "3", "--width", "8",
             "--eval-images", "0", "--log-every", "1", "--ckpt-every", "3")
    one = train_run(tmp_path / "one", "faster_rcnn", *flags)
    two = train_run(tmp_path / "two", "faster_rcnn", *flags, nproc=2)
    assert_close_params(one, two, atol=1e-5)


def test_spp_net_scores_every_side_with_one_set_of_weights(tmp_path):
    cfg = spp_net.Config(dataset="digits", train_sizes="8,12", test_sizes="16", levels="1,2",
                         steps=80, batch_size=32, width=8, lr=5e-3, log_every=10,
                         ckpt_every=80)
    run = spp_net.train(cfg, Run.create("spp_net", cfg, root=tmp_path), progress=False)
    summary = run.summary()
    assert {"eval/accuracy_8", "eval/accuracy_12", "eval/accuracy_16"} <= set(summary)
    assert summary["eval/unseen_sides"] == "16"
    assert summary["eval/accuracy_12"] > 0.3  # ten classes: chance is 0.1


# --- behaviour (slow) ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("module", [faster_rcnn, rfcn])
def test_detectors_learn_far_above_their_initialisation(module, tmp_path):
    cfg = module.Config(steps=800, train_images=1500, eval_images=300)
    run = common.train(cfg, Run.create(cfg.METHOD, cfg, root=tmp_path), progress=False)
    summary = run.summary()
    assert summary["baseline/map_50"] < 0.05
    assert summary["eval/map_50"] > 0.6
    assert summary["eval/map"] > 0.3
