"""The detection operators against their definitions: gradients by finite differences, deformable
convolution with zero offsets as a plain convolution, RoI Align of a constant, SPP's fixed
length, position-sensitive pooling's channel rule, NMS against the brute-force greedy loop, box
coding round trips, and one-line errors for bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from mlatlas.vision import boxes, deform, pooling
from mlatlas.vision.boxes import BoxError

D = torch.float64


def rois_for(k, batch, size, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    corners = torch.rand(k, 2, 2, generator=g, dtype=dtype) * size
    index = torch.randint(batch, (k, 1), generator=g).to(dtype)
    return torch.cat([index, corners.min(1).values, corners.max(1).values + 1], 1)


# --- gradients ----------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["roi_pool", "roi_align", "roi_align_aligned", "ps_roi_pool",
                                "ps_roi_align"])
def test_poolings_pass_gradcheck_in_float64(op):
    x = torch.randn(2, 8, 7, 8, dtype=D, requires_grad=True)
    rois = rois_for(5, 2, 12, seed=1)
    fn = {"roi_pool": lambda t: pooling.roi_pool(t, rois, 2, 0.5),
          "roi_align": lambda t: pooling.roi_align(t, rois, 2, 0.5, 2),
          "roi_align_aligned": lambda t: pooling.roi_align(t, rois, 2, 0.5, -1, True),
          "ps_roi_pool": lambda t: pooling.ps_roi_pool(t, rois, 2, 0.5),
          "ps_roi_align": lambda t: pooling.ps_roi_align(t, rois, 2, 0.5, 2)}[op]
    assert gradcheck(fn, (x,))


def test_spp_passes_gradcheck():
    x = torch.randn(1, 2, 5, 6, dtype=D, requires_grad=True)
    assert gradcheck(lambda t: pooling.spp(t, (1, 2)), (x,))


@pytest.mark.parametrize("modulated", [False, True])
def test_deform_conv2d_passes_gradcheck_for_input_offsets_mask_and_weight(modulated):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 5, 5, generator=g, dtype=D, requires_grad=True)
    # Offsets away from integers: bilinear interpolation has kinks on the grid lines.
    offset = (torch.rand(1, 2 * 2 * 9, 5, 5, generator=g, dtype=D) * 0.8 + 0.1
              - torch.randint(2, (1, 36, 5, 5), generator=g)).requires_grad_()
    weight = torch.randn(2, 2, 3, 3, generator=g, dtype=D, requires_grad=True)
    mask = torch.rand(1, 2 * 9, 5, 5, generator=g, dtype=D, requires_grad=True)
    if modulated:
        assert gradcheck(lambda a, o, w, m: deform.deform_conv2d(a, o, w, None, 1, 1, 1, m),
                         (x, offset, weight, mask))
    else:
        assert gradcheck(lambda a, o, w: deform.deform_conv2d(a, o, w, None, 1, 1, 1),
                         (x, offset, weight))


# --- closed forms -------------------------------------------------------------------------------

@pytest.mark.parametrize("geometry", [(1, 1, 1, 1), (2, 2, 2, 2), (1, 0, 1, 4)])
def test_deform_conv2d_with_zero_offsets_and_unit_mask_is_conv2d(geometry):
    stride, padding, dilation, groups = geometry
    x = torch.randn(2, 8, 11, 9, dtype=D)
    weight = torch.randn(6 if groups != 4 else 8, 8 // groups, 3, 3, dtype=D)
    bias = torch.randn(len(weight), dtype=D)
    expected = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    offset = torch.zeros(2, 2 * 9, *expected.shape[2:], dtype=D)
    mask = torch.ones(2, 9, *expected.shape[2:], dtype=D)
    for m in (None, mask):
        out = deform.deform_conv2d(x, offset, weight, bias, stride, padding, dilation, m)
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_a_whole_pixel_offset_reads_the_neighbouring_pixel():
    x = torch.randn(1, 1, 6, 6, dtype=D)
    weight = torch.zeros(1, 1, 1, 1, dtype=D)
    weight[0, 0, 0, 0] = 1
    offset = torch.zeros(1, 2, 6, 6, dtype=D)
    offset[:, 0], offset[:, 1] = 1.0, -2.0  # dy = +1, dx = -2
    out = deform.deform_conv2d(x, offset, weight)
    torch.testing.assert_close(out[0, 0, :5, 2:], x[0, 0, 1:, :4])
    assert (out[0, 0, 5] == 0).all() and (out[0, 0, :, :2] == 0).all()


def test_deform_layer_starts_as_a_plain_convolution():
    layer = deform.DeformConv2d(3, 4, modulated=False).double()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1))
    points = layer.sampling_points(x)
    assert points.shape == (2, 1, 9, 2, 8, 8)
    assert points[0, 0, 4, :, 3, 5].tolist() == [3.0, 5.0]  # the centre tap sits on p_0


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 3])
def test_roi_align_of_a_constant_map_is_the_constant(aligned, sampling_ratio):
    x = torch.full((2, 3, 10, 12), 2.5, dtype=D)
    rois = rois_for(20, 2, 9, seed=2)
    out = pooling.roi_align(x, rois, (3, 4), 1.0, sampling_ratio, aligned)
    torch.testing.assert_close(out, torch.full_like(out, 2.5))


def test_roi_align_samples_by_bilinear_interpolation():
    # f(y, x) = 3 y + 2 x + 1 is reproduced exactly by bilinear interpolation inside the map.
    yy, xx = torch.meshgrid(torch.arange(8, dtype=D), torch.arange(8, dtype=D), indexing="ij")
    x = (3 * yy + 2 * xx + 1)[None, None]
    rois = torch.tensor([[0, 1.0, 2.0, 5.0, 6.0]], dtype=D)
    out = pooling.roi_align(x, rois, 2, 1.0, 2, aligned=True)
    # aligned: the box starts at (x, y) = (0.5, 1.5); bins are 2 wide, centres at +1 and +3.
    centres_y, centres_x = torch.tensor([2.5, 4.5], dtype=D), torch.tensor([1.5, 3.5], dtype=D)
    expected = 3 * centres_y[:, None] + 2 * centres_x[None, :] + 1
    torch.testing.assert_close(out[0, 0], expected)


def test_roi_align_in_cache_sized_blocks_equals_one_block(monkeypatch):
    x = torch.randn(2, 3, 10, 12, dtype=D, requires_grad=True)
    rois = rois_for(23, 2, 9, seed=4)
    whole = pooling.roi_align(x, rois, 3, 1.0, 2, True)
    (grad_whole,) = torch.autograd.grad(whole.sum(), x)
    # 3 x 3 x 12 floats per region: blocks of 2 regions, so every image splits unevenly.
    monkeypatch.setattr(pooling, "_CPU_BLOCK_FLOATS", 2 * 3 * 3 * 12)
    blocked = pooling.roi_align(x, rois, 3, 1.0, 2, True)
    (grad_blocked,) = torch.autograd.grad(blocked.sum(), x)
    torch.testing.assert_close(blocked, whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_blocked, grad_whole, atol=1e-12, rtol=0)


@pytest.mark.parametrize("size", [(5, 5), (7, 7), (13, 9), (32, 17)])
def test_spp_gives_the_same_length_for_every_input_size(size):
    out = pooling.spp(torch.randn(3, 16, *size), (1, 2, 4))
    assert out.shape == (3, 16 * (1 + 4 + 16))


def test_spp_bins_follow_the_adaptive_rule_and_the_papers_rule_miscounts():
    x = torch.arange(49.0).view(1, 1, 7, 7)
    level = pooling.spp(x, (4,)).view(4, 4)
    # Bin i spans [floor(7 i / 4), ceil(7 (i + 1) / 4)): rows/columns ends 1, 3, 5, 6.
    ends = torch.tensor([1, 3, 5, 6])
    torch.testing.assert_close(level, (ends[:, None] * 7 + ends[None, :]).float())
    assert pooling.paper_bins(7, 4) == 6
    assert pooling.paper_bins(13, 3) == 3


def test_ps_roi_pool_reads_one_score_map_per_bin():
    # Channel (c PH + i) PW + j holds the constant 100 c + 10 i + j: a position-sensitive
    # stack returns the bin's own part in every bin.
    c_out, ph, pw = 2, 3, 3
    values = torch.tensor([100.0 * c + 10 * i + j for c in range(c_out) for i in range(ph)
                           for j in range(pw)], dtype=D)
    x = values.view(1, -1, 1, 1).expand(1, -1, 12, 12).contiguous()
    rois = torch.tensor([[0, 0.0, 0.0, 9.0, 9.0], [0, 3.0, 2.0, 11.0, 7.0]], dtype=D)
    expected = values.view(c_out, ph, pw).expand(2, -1, -1, -1)
    torch.testing.assert_close(pooling.ps_roi_pool(x, rois, 3), expected)
    torch.testing.assert_close(pooling.ps_roi_align(x, rois, 3), expected)


def test_roi_pool_takes_the_maximum_of_each_bin():
    x = torch.zeros(1, 1, 8, 8, dtype=D)
    x[0, 0, 1, 6] = 5.0
    x[0, 0, 6, 1] = 7.0
    out = pooling.roi_pool(x, torch.tensor([[0, 0.0, 0.0, 7.0, 7.0]], dtype=D), 2)
    assert out[0, 0].tolist() == [[0.0, 5.0], [7.0, 0.0]]


def greedy_nms(b, scores, t):
    iou = boxes.box_iou(b, b).tolist()
    order = sorted(range(len(b)), key=lambda i: (-float(scores[i]), i))
    kept = []
    for i in order:
        if all(iou[i][k] <= t for k in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("seed", range(4))
def test_nms_equals_the_greedy_loop(seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(120, 2, generator=g) * 40
    b = torch.cat([xy, xy + torch.rand(120, 2, generator=g) * 20 + 1], 1)
    scores = torch.rand(120, generator=g).round(decimals=1)  # ties are kept in input order
    for t in (0.1, 0.5, 0.9):
        assert boxes.nms(b, scores, t).tolist() == greedy_nms(b, scores, t)


def test_batched_nms_never_suppresses_across_groups():
    b = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert boxes.batched_nms(b, scores, torch.tensor([0, 0, 1]), 0.5).tolist() == [0, 2]
    assert boxes.nms(b, scores, 0.5).tolist() == [0]


def test_box_iou_by_hand():
    a = torch.tensor([[0.0, 0, 2, 2]])
    b = torch.tensor([[1.0, 1, 3, 3], [2.0, 2, 4, 4], [0.0, 0, 2, 2]])
    torch.testing.assert_close(boxes.box_iou(a, b), torch.tensor([[1 / 7, 0.0, 1.0]]))


def test_box_coding_round_trips_and_matches_the_formula():
    anchors = torch.tensor([[0.0, 0, 10, 20], [5.0, 5, 9, 7]], dtype=D)
    targets = torch.tensor([[1.0, 2, 13, 18], [4.0, 3, 12, 9]], dtype=D)
    weights = (10.0, 10.0, 5.0, 5.0)
    deltas = boxes.encode_boxes(targets, anchors, weights)
    assert deltas[0].tolist() == pytest.approx([10 * 2 / 10, 10 * 0 / 20, 5 * torch.log(
        torch.tensor(12 / 10)).item(), 5 * torch.log(torch.tensor(16 / 20)).item()])
    torch.testing.assert_close(boxes.decode_boxes(deltas, anchors, weights), targets)
    huge = boxes.decode_boxes(torch.tensor([[0, 0, 50.0, 50.0]], dtype=D), anchors[:1])
    assert torch.isfinite(huge).all()


# --- bad input ----------------------------------------------------------------------------------

def test_bad_input_gets_one_line_naming_the_shapes():
    x = torch.randn(2, 9, 8, 8)
    with pytest.raises(BoxError, match=r"rois\[1\] has x2 < x1"):
        pooling.roi_align(x, torch.tensor([[0, 0, 0, 4, 4], [0, 5, 0, 2, 4.0]]), 2)
    with pytest.raises(BoxError, match="batch index 2, outside the input's batch of 2"):
        pooling.roi_pool(x, torch.tensor([[2, 0, 0, 4, 4.0]]), 2)
    with pytest.raises(BoxError, match=r"shape \(K, 5\)"):
        pooling.roi_align(x, torch.tensor([[0, 0, 4, 4.0]]), 2)
    with pytest.raises(BoxError, match="divisible by 4, got 9"):
        pooling.ps_roi_pool(x, torch.tensor([[0, 0, 0, 4, 4.0]]), 2)
    with pytest.raises(BoxError, match=r"offset must be .* got \(2, 10, 8, 8\)"):
        deform.deform_conv2d(x, torch.zeros(2, 10, 8, 8), torch.zeros(3, 9, 3, 3), padding=1)
    with pytest.raises(BoxError, match="does not divide the input's 9"):
        deform.deform_conv2d(x, torch.zeros(2, 18, 8, 8), torch.zeros(3, 2, 3, 3), padding=1)
    with pytest.raises(BoxError, match="must share a dtype"):
        pooling.roi_align(x, torch.tensor([[0, 0, 0, 4, 4.0]], dtype=D), 2)
    with pytest.raises(BoxError, match=r"boxes\[0\] is not finite"):
        boxes.nms(torch.tensor([[0, 0, float("nan"), 1]]), torch.ones(1), 0.5)
    with pytest.raises(ValueError, match="level 4 needs a map of at least 4x4"):
        pooling.spp(torch.randn(1, 2, 3, 8), (1, 4))


def test_no_regions_give_an_empty_output():
    x = torch.randn(1, 4, 8, 8)
    empty = torch.zeros(0, 5)
    assert pooling.roi_pool(x, empty, 2).shape == (0, 4, 2, 2)
    assert pooling.roi_align(x, empty, 2).shape == (0, 4, 2, 2)
    assert pooling.ps_roi_pool(x, empty, 2).shape == (0, 1, 2, 2)
    assert boxes.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).shape == (0,)
