"""Control images for ControlNet: Sobel, Canny, shape masks, Zhang-Suen skeletons, mask IoU."""

import math

import pytest
import torch

from mlatlas.data.control import (
    BACKGROUND,
    CONTROLS,
    SOBEL_MAX,
    canny,
    control_image,
    hysteresis,
    luminance,
    mask_iou,
    shape_mask,
    skeleton,
    sobel,
    sobel_gradients,
)
from mlatlas.data.shapes import captioned_shapes


@pytest.fixture(scope="module")
def shapes():
    return captioned_shapes(16).images


def components(mask: torch.Tensor) -> int:
    """The number of 8-connected components of a 2-D mask (flood fill)."""
    todo = {tuple(p) for p in mask.nonzero().tolist()}
    count = 0
    while todo:
        count += 1
        stack = [todo.pop()]
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if (y + dy, x + dx) in todo:
                        todo.remove((y + dy, x + dx))
                        stack.append((y + dy, x + dx))
    return count


def square(size: int = 32, lo: int = 8, hi: int = 24) -> torch.Tensor:
    image = torch.zeros(1, 1, size, size)
    image[..., lo:hi, lo:hi] = 1.0
    return image


def disc(size: int, cy: float, cx: float, radius: float) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                          torch.arange(size, dtype=torch.float32), indexing="ij")
    return ((y - cy).square() + (x - cx).square() <= radius**2).float().view(1, 1, size, size)


def near(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pixels of 2-D mask ``a`` within one pixel (8-neighbourhood) of a pixel of ``b``."""
    grown = torch.nn.functional.max_pool2d(b.float()[None, None], 3, stride=1, padding=1)[0, 0]
    return a.bool() & grown.bool()


def test_luminance_uses_bt601_weights():
    image = torch.tensor([1.0, 0.5, 0.25]).view(1, 3, 1, 1).expand(2, 3, 4, 5)
    gray = luminance(image)
    assert gray.shape == (2, 1, 4, 5) and gray.dtype == torch.float32
    assert torch.allclose(gray, torch.full_like(gray, 0.299 + 0.587 * 0.5 + 0.114 * 0.25))
    grey = torch.rand(2, 1, 4, 5, dtype=torch.float64)
    assert torch.equal(luminance(grey), grey.float())


def test_sobel_of_a_ramp_is_eight_times_the_slope():
    slope = 0.02
    ramp = (torch.arange(20, dtype=torch.float32) * slope).expand(1, 1, 12, 20)
    gx, gy = sobel_gradients(ramp)
    # Weights 1, 2, 1 on a difference of 2 * slope across the centre: 8 * slope.
    assert torch.allclose(gx[..., 1:-1], torch.full_like(gx[..., 1:-1], 8 * slope), atol=1e-6)
    assert torch.allclose(gy, torch.zeros_like(gy), atol=1e-6)
    assert torch.allclose(sobel(ramp)[..., 1:-1], torch.full((1, 1, 12, 18), 8 * slope / SOBEL_MAX),
                          atol=1e-6)
    # y points down: a ramp rising downwards has gy > 0.
    _, gy = sobel_gradients(ramp.transpose(-1, -2))
    assert (gy[..., 1:-1, :] > 0).all()


def test_sobel_is_zero_on_a_constant_image_and_bounded_on_random_ones():
    assert torch.equal(sobel(torch.full((2, 3, 8, 8), 0.7)), torch.zeros(2, 1, 8, 8))
    generator = torch.Generator().manual_seed(0)
    # Binary images push every window to the extremes, where the bound is tightest.
    binary = (torch.rand(64, 1, 8, 8, generator=generator) > 0.5).float()
    gx, gy = sobel_gradients(binary)
    assert torch.hypot(gx, gy).max() <= SOBEL_MAX + 1e-5
    assert math.isclose(SOBEL_MAX, 4 * math.sqrt(2))
    edges = sobel(torch.rand(4, 3, 8, 8, generator=generator))
    assert edges.shape == (4, 1, 8, 8) and edges.dtype == torch.float32
    assert edges.min() >= 0 and edges.max() <= 1


def half_plane(falling: bool, size: int = 24) -> torch.Tensor:
    """A step along a diagonal: gradient at 45 degrees (x + y rising) or at 135 (y - x)."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    inside = (x + y >= size - 1) if falling else (y >= x)
    return inside.float().view(1, 1, size, size)


@pytest.mark.parametrize("image", [square(), half_plane(True), half_plane(False)],
                         ids=["square", "diagonal-45", "diagonal-135"])
def test_canny_marks_the_border_with_a_thin_edge(image):
    edges = canny(image)[0, 0]
    inside = image[0, 0].bool()
    # The true border: square pixels with a background pixel among their 8 neighbours.
    border = inside & near(inside, ~inside)
    assert set(edges.unique().tolist()) <= {0.0, 1.0}
    assert near(edges, border).sum() == edges.sum() > 0          # every mark within 1 px
    assert near(border, edges).sum() >= 0.9 * border.sum()       # >= 90 % of the border found
    blocks = edges[:-1, :-1] * edges[1:, :-1] * edges[:-1, 1:] * edges[1:, 1:]
    assert blocks.sum() == 0                                     # thin: no 2x2 block


def test_canny_is_empty_on_a_constant_image_and_checks_its_thresholds():
    assert canny(torch.full((1, 3, 16, 16), 0.4)).sum() == 0
    assert canny(square(), sigma=0).sum() > 0
    with pytest.raises(ValueError, match="low <= high"):
        canny(square(), low=0.3, high=0.2)
    with pytest.raises(ValueError, match="low <= high"):
        canny(square(), low=-0.1, high=0.2)


def test_hysteresis_keeps_weak_pixels_connected_to_a_strong_one():
    weak = torch.zeros(1, 1, 9, 12, dtype=torch.bool)
    strong = torch.zeros_like(weak)
    weak[0, 0, 2, 1:8] = True          # a weak ridge ...
    strong[0, 0, 2, 1] = True          # ... with a strong pixel at one end
    weak[0, 0, 3, 8] = True            # diagonal step: still 8-connected
    weak[0, 0, 6, 2:10] = True         # an isolated weak ridge
    kept = hysteresis(weak, strong)
    expected = torch.zeros(1, 1, 9, 12)
    expected[0, 0, 2, 1:8] = 1
    expected[0, 0, 3, 8] = 1
    assert torch.equal(kept, expected)
    assert hysteresis(weak, torch.zeros_like(weak)).sum() == 0
    with pytest.raises(ValueError, match="one shape"):
        hysteresis(weak, strong[..., :5])


def test_shape_mask_recovers_the_rendered_shapes(shapes):
    expected = (shapes != 0.08).any(1, keepdim=True).float()
    assert BACKGROUND == 0.08
    assert torch.equal(shape_mask(shapes), expected)
    assert torch.equal(shape_mask(shapes, background=(0.08, 0.08, 0.08)), expected)
    digits = torch.rand(3, 1, 8, 8)
    assert torch.equal(shape_mask(digits), (digits > 0.5).float())


def test_skeleton_of_a_thick_bar_is_its_middle_row():
    bar = torch.zeros(1, 1, 16, 32)
    bar[..., 5:10, 3:29] = 1.0
    thin = skeleton(bar)[0, 0]
    interior = thin[:, 8:24]
    assert torch.equal(interior.sum(0), torch.ones(16))          # one pixel per column
    assert torch.equal(interior[7], torch.ones(16))               # on the middle row
    assert (thin <= bar[0, 0]).all()


@pytest.mark.parametrize("centre", [15.5, 15.0])
def test_skeleton_of_a_disc_is_a_nonempty_connected_subset(centre):
    shape = disc(32, centre, centre, 10.0)
    thin = skeleton(shape)
    assert thin.sum() > 0 and (thin <= shape).all()
    assert components(thin[0, 0]) == 1
    # Zhang-Suen alone would delete a lone 2x2 block; one pixel of it survives here.
    block = torch.zeros(1, 1, 6, 6)
    block[..., 2:4, 2:4] = 1
    assert skeleton(block).sum() == 1


def test_skeleton_keeps_connected_shapes_connected(shapes):
    masks = shape_mask(shapes)
    thin = skeleton(shapes)
    assert (thin <= masks).all() and set(thin.unique().tolist()) <= {0.0, 1.0}
    ell = torch.zeros(1, 1, 20, 20)
    ell[..., 2:18, 3:7] = 1
    ell[..., 14:18, 3:17] = 1
    assert components(skeleton(ell)[0, 0]) == 1
    checked = 0
    for mask, lines in zip(masks[:, 0], thin[:, 0], strict=True):
        if components(mask) == 1:
            assert components(lines) == 1
            checked += 1
    assert checked >= 4


def test_mask_iou_by_hand():
    a = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    empty = torch.zeros(1, 1, 2, 2)
    iou = mask_iou(torch.cat([a, a, empty, a]), torch.cat([b, a, empty, empty]))
    assert torch.allclose(iou, torch.tensor([1 / 3, 1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="one shape"):
        mask_iou(a, torch.zeros(1, 1, 3, 2))


@pytest.mark.parametrize("kind", CONTROLS)
def test_controls_have_the_promised_shape_range_and_dtype(kind, shapes):
    out = control_image(kind, shapes[:4].double())
    assert out.shape == (4, 1, 32, 32) and out.dtype == torch.float32
    assert out.device == shapes.device and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("kind", CONTROLS)
def test_a_batch_equals_its_images_one_by_one(kind, shapes):
    images = torch.cat([shapes[:6], torch.rand(2, 3, 32, 32, generator=torch.Generator()
                                               .manual_seed(1))])
    batch = control_image(kind, images)
    single = torch.cat([control_image(kind, image[None]) for image in images])
    assert torch.equal(batch, single)
    grey = images[:, :1]
    assert torch.equal(control_image(kind, grey),
                       torch.cat([control_image(kind, image[None]) for image in grey]))


@pytest.mark.parametrize("fn", [luminance, sobel, canny, shape_mask, skeleton])
def test_bad_images_are_refused_with_their_shape(fn):
    with pytest.raises(ValueError, match=r"\(3, 8, 8\)"):
        fn(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match=r"C = 1 or 3.*\(1, 2, 8, 8\)"):
        fn(torch.rand(1, 2, 8, 8))
    with pytest.raises(ValueError, match="floating.*torch.uint8"):
        fn(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_unknown_control_names_the_choices():
    with pytest.raises(ValueError, match="sobel, canny, mask, skeleton.*did you mean canny"):
        control_image("cany", torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="unknown control 'depth'"):
        control_image("depth", torch.rand(1, 3, 8, 8))
