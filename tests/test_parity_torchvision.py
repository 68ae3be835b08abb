"""Parity of mlatlas.vision's operators with torchvision.ops on random inputs: outputs and
gradients within 1e-5 in float32 and 1e-10 in float64.

torchvision needs its own torch build, so this runs in the heavy-peers environment
(`make test-torchvision`); it is skipped where torchvision is missing.
"""

import pytest
import torch

from mlatlas.vision import boxes, deform, pooling

ops = pytest.importorskip("torchvision.ops")

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = list(TOLERANCE)


def random_rois(k: int, batch: int, size: float, generator: torch.Generator, dtype,
                min_side: float = 0.0) -> torch.Tensor:
    """K regions over a size x size image, some reaching past its borders and some tiny."""
    corners = torch.rand(k, 2, 2, generator=generator, dtype=dtype) * (size * 1.2) - size * 0.1
    low, high = corners.min(1).values, corners.max(1).values + min_side
    index = torch.randint(batch, (k, 1), generator=generator).to(dtype)
    return torch.cat([index, low, high], 1)


def compare(ours, theirs, inputs, dtype):
    """Outputs and the gradients of a random projection of them, for every input."""
    tol = TOLERANCE[dtype]
    out_ours, out_theirs = ours(*inputs), theirs(*inputs)
    assert out_ours.shape == out_theirs.shape
    torch.testing.assert_close(out_ours, out_theirs, atol=tol, rtol=tol)
    weights = torch.randn_like(out_theirs)
    wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads_ours = torch.autograd.grad((out_ours * weights).sum(), wanted)
    grads_theirs = torch.autograd.grad((out_theirs * weights).sum(), wanted)
    for g_ours, g_theirs in zip(grads_ours, grads_theirs, strict=True):
        torch.testing.assert_close(g_ours, g_theirs, atol=tol * 10, rtol=tol * 10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 0.5, 0.25])
def test_roi_pool(dtype, scale):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 20, 24, generator=g, dtype=dtype, requires_grad=True)
    rois = random_rois(40, 2, 24 / scale, g, dtype)
    compare(lambda a, r: pooling.roi_pool(a, r, (5, 4), scale),
            lambda a, r: ops.roi_pool(a, r, (5, 4), scale), (x, rois), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_roi_align(dtype, aligned, sampling_ratio):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 16, 20, generator=g, dtype=dtype, requires_grad=True)
    rois = random_rois(40, 2, 40, g, dtype)
    compare(lambda a, r: pooling.roi_align(a, r, (7, 6), 0.5, sampling_ratio, aligned),
            lambda a, r: ops.roi_align(a, r, (7, 6), 0.5, sampling_ratio, aligned),
            (x, rois), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ps_roi_pool(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3 * 9, 18, 18, generator=g, dtype=dtype, requires_grad=True)
    # Inside the map: at its last row and column torchvision's forward clamps bins to H - 1 and
    # its backward to H (next test), so no one function matches both there.
    rois = random_rois(40, 2, 28, g, dtype).clamp(min=0)
    compare(lambda a, r: pooling.ps_roi_pool(a, r, 3, 0.5),
            lambda a, r: ops.ps_roi_pool(a, r, 3, 0.5), (x, rois), dtype)


def test_ps_roi_pool_at_the_border_torchvision_disagrees_with_its_own_gradient():
    x = torch.randn(1, 9, 6, 6, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0.0, 1.0, 1.0, 6.0, 6.0]], dtype=torch.float64)
    assert not torch.autograd.gradcheck(lambda t: ops.ps_roi_pool(t, rois, 3),
                                        (x,), raise_exception=False)
    assert torch.autograd.gradcheck(lambda t: pooling.ps_roi_pool(t, rois, 3), (x,))
    # Ours averages the whole last bin [4, 6) x [4, 6); torchvision's forward stops at row 5.
    expected = x[0, 8, 4:6, 4:6].mean()
    torch.testing.assert_close(pooling.ps_roi_pool(x, rois, 3)[0, 0, 2, 2], expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_ps_roi_align(dtype, sampling_ratio):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2 * 12, 18, 18, generator=g, dtype=dtype, requires_grad=True)
    # Regions at least 2 feature pixels wide: torchvision's adaptive grid is 0 samples below one
    # bin's width and divides 0 by 0 there (NaN); ours returns 0.
    rois = random_rois(40, 2, 36, g, dtype, min_side=8.0)
    compare(lambda a, r: pooling.ps_roi_align(a, r, (4, 3), 0.5, sampling_ratio),
            lambda a, r: ops.ps_roi_align(a, r, (4, 3), 0.5, sampling_ratio), (x, rois), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("geometry", [
    dict(stride=1, padding=1, dilation=1, groups=1, offset_groups=1),
    dict(stride=2, padding=2, dilation=2, groups=2, offset_groups=2),
    dict(stride=1, padding=0, dilation=1, groups=1, offset_groups=3),
])
def test_deform_conv2d(dtype, modulated, geometry):
    g = torch.Generator().manual_seed(4)
    groups, offset_groups = geometry["groups"], geometry["offset_groups"]
    x = torch.randn(2, 6, 9, 10, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(4, 6 // groups, 3, 3, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(4, generator=g, dtype=dtype, requires_grad=True)
    s, p, d = geometry["stride"], geometry["padding"], geometry["dilation"]
    h_out = (9 + 2 * p - d * 2 - 1) // s + 1
    w_out = (10 + 2 * p - d * 2 - 1) // s + 1
    offset = (torch.randn(2, 2 * offset_groups * 9, h_out, w_out, generator=g, dtype=dtype)
              * 2).requires_grad_()
    mask = (torch.rand(2, offset_groups * 9, h_out, w_out, generator=g, dtype=dtype)
            .requires_grad_() if modulated else None)
    inputs = (x, offset, weight, bias, mask) if modulated else (x, offset, weight, bias)

    def ours(x, offset, weight, bias, mask=None):
        return deform.deform_conv2d(x, offset, weight, bias, s, p, d, mask)

    def theirs(x, offset, weight, bias, mask=None):
        return ops.deform_conv2d(x, offset, weight, bias, s, p, d, mask)

    compare(ours, theirs, inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nms_box_iou_and_coding(dtype):
    g = torch.Generator().manual_seed(5)
    xy = torch.rand(300, 2, generator=g, dtype=dtype) * 100
    wh = torch.rand(300, 2, generator=g, dtype=dtype) * 30 + 1
    b = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(300, generator=g, dtype=dtype)
    torch.testing.assert_close(boxes.box_iou(b, b[:50]), ops.box_iou(b, b[:50]))
    for t in (0.3, 0.5, 0.7):
        assert torch.equal(boxes.nms(b, scores, t), ops.nms(b, scores, t))
    groups = torch.randint(4, (300,), generator=g)
    assert torch.equal(boxes.batched_nms(b, scores, groups, 0.5),
                       ops.batched_nms(b, scores, groups, 0.5))
