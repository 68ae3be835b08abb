"""Control images for ControlNet: edges, masks and skeletons computed from a batch of images.

ControlNet (Zhang, Rao and Agrawala, 2023) conditions a diffusion model on a map that fixes the
layout of the picture. Every function here takes images (B, C, H, W) in [0, 1] with C = 1 or 3
and returns a (B, 1, H, W) float32 map in [0, 1] on the input's device.

- Luminance (ITU-R BT.601): Y = 0.299 R + 0.587 G + 0.114 B.
- Sobel: Gx = K * Y and Gy = K^T * Y with K = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] (x to the
  right, y downwards, replicate padding); the map is |G| / (4 sqrt 2), since |Gx|, |Gy| <= 4
  for Y in [0, 1].
- Canny (1986): Gaussian blur G_sigma (radius ceil(3 sigma)), Sobel gradients, non-maximum
  suppression along the gradient direction theta = atan2(Gy, Gx) quantised to 0/45/90/135
  degrees, then the double threshold low <= high on the normalised magnitude and hysteresis:
  weak pixels (>= low) survive when 8-connected through weak pixels to a strong one (>= high).
- Shape mask: |x - background| > tol in any channel (colour), x > 0.5 (grey).
- Skeleton: Zhang and Suen (1984) thinning of the binarised image. With the neighbours
  P2..P9 clockwise from north, B(P) = sum P_i and A(P) = number of 0 -> 1 transitions in
  P2, P3, ..., P9, P2, a foreground pixel is removed when 2 <= B <= 6, A = 1 and
  P2 P4 P6 = P4 P6 P8 = 0 (first sub-iteration) or P2 P4 P8 = P2 P6 P8 = 0 (second).

``mask_iou`` scores a predicted mask against a target: |a & b| / |a | b|, 1 for two empty masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mlatlas.core.config import closest

# The background of the captioned shapes (a literal in mlatlas.data.shapes.render); kept in step
# by tests/test_control.py, which compares shape_mask with the rendered images.
BACKGROUND = 0.08
LUMA = (0.299, 0.587, 0.114)
# The largest Sobel magnitude for inputs in [0, 1]: |Gx| <= 4 and |Gy| <= 4.
SOBEL_MAX = 4.0 * math.sqrt(2.0)
CONTROLS = ("sobel", "canny", "mask", "skeleton")


def _check_images(images: torch.Tensor, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must be (B, C, H, W) with C = 1 or 3, got shape "
                         f"{tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor in [0, 1], got {images.dtype} of "
                         f"shape {tuple(images.shape)}")


def _check_single(gray: torch.Tensor, name: str) -> None:
    _check_images(gray, name)
    if gray.shape[1] != 1:
        raise ValueError(f"{name} must be (B, 1, H, W), got shape {tuple(gray.shape)}")


def luminance(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W) float32: BT.601 luma for colour, the image itself for grey."""
    _check_images(images)
    images = images.float()
    if images.shape[1] == 1:
        return images
    weights = torch.tensor(LUMA, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def sobel_gradients(gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised Sobel responses (gx, gy) of (B, 1, H, W) ``gray``, x to the right, y down;
    replicate padding, so a constant image has zero gradient up to its border."""
    _check_single(gray, "gray")
    padded = F.pad(gray.float(), (1, 1, 1, 1), mode="replicate")
    # Difference first, then smooth with 1, 2, 1: the difference of equal values is exactly 0,
    # so a constant image gives exactly zero, which a 3x3 convolution's rounding does not.
    dx = padded[..., 2:] - padded[..., :-2]
    dy = padded[..., 2:, :] - padded[..., :-2, :]
    gx = dx[..., :-2, :] + 2 * dx[..., 1:-1, :] + dx[..., 2:, :]
    gy = dy[..., :-2] + 2 * dy[..., 1:-1] + dy[..., 2:]
    return gx, gy


def sobel(images: torch.Tensor) -> torch.Tensor:
    """Normalised Sobel magnitude sqrt(gx^2 + gy^2) / (4 sqrt 2) of the luminance, in [0, 1]."""
    gx, gy = sobel_gradients(luminance(images))
    # The clamp only absorbs rounding above the bound (and inputs slightly outside [0, 1]).
    return (torch.hypot(gx, gy) / SOBEL_MAX).clamp(0.0, 1.0)


def gaussian_blur(gray: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) ``gray``, radius ceil(3 sigma), replicate padding;
    sigma = 0 returns the input."""
    _check_single(gray, "gray")
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    gray = gray.float()
    if sigma == 0:
        return gray
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=gray.device)
    kernel = torch.exp(-offsets.square() / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    size = 2 * radius + 1
    rows = F.conv2d(F.pad(gray, (radius, radius, 0, 0), mode="replicate"),
                    kernel.view(1, 1, 1, size))
    return F.conv2d(F.pad(rows, (0, 0, radius, radius), mode="replicate"),
                    kernel.view(1, 1, size, 1))


def _shift(x: torch.Tensor, dy: int, dx: int, value: float = 0.0) -> torch.Tensor:
    """x[..., y + dy, x + dx] at every (y, x), ``value`` outside the image."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), value=value)
    return padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def non_maximum_suppression(magnitude: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor,
                            tol: float = 1e-6) -> torch.Tensor:
    """``magnitude`` where it is a maximum across the edge (along the gradient direction,
    quantised to 0/45/90/135 degrees), 0 elsewhere; all (B, 1, H, W). Differences below ``tol``
    count as ties, so rounding noise cannot decide which side of a symmetric ridge survives."""
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180.0
    sector = torch.round(angle / 45.0).long() % 4
    # Neighbour offsets (dy, dx) along each sector's direction; y points down, so 45 degrees
    # (gx and gy of one sign) runs to the lower right.
    offsets = ((0, 1), (1, 1), (1, 0), (1, -1))
    ahead = torch.stack([_shift(magnitude, dy, dx) for dy, dx in offsets])
    behind = torch.stack([_shift(magnitude, -dy, -dx) for dy, dx in offsets])
    index = sector.unsqueeze(0)
    ahead = ahead.gather(0, index).squeeze(0)
    behind = behind.gather(0, index).squeeze(0)
    # >= one side and > the other: of a symmetric ridge two pixels wide exactly one survives.
    keep = (magnitude >= ahead - tol) & (magnitude > behind + tol) & (magnitude > 0)
    return torch.where(keep, magnitude, torch.zeros_like(magnitude))


def hysteresis(weak: torch.Tensor, strong: torch.Tensor) -> torch.Tensor:
    """Pixels of (B, 1, H, W) ``weak`` 8-connected through weak pixels to a pixel of ``strong``
    (nonzero means set; strong pixels count as weak); float32 in {0, 1}."""
    if weak.dim() != 4 or weak.shape[1] != 1 or weak.shape != strong.shape:
        raise ValueError(f"weak and strong must be (B, 1, H, W) of one shape, got "
                         f"{tuple(weak.shape)} and {tuple(strong.shape)}")
    strong = strong != 0
    weak = (weak != 0) | strong
    kept = strong.float()
    allowed = weak.float()
    # Each pass grows the kept set by one pixel along weak paths; no path is longer than H * W.
    for _ in range(weak.shape[-2] * weak.shape[-1]):
        grown = F.max_pool2d(kept, 3, stride=1, padding=1) * allowed
        if torch.equal(grown, kept):
            break
        kept = grown
    return kept


def canny(images: torch.Tensor, low: float = 0.1, high: float = 0.2,
          sigma: float = 1.0) -> torch.Tensor:
    """Canny edges of the luminance, {0, 1}: blur, Sobel, non-maximum suppression, double
    threshold on the normalised magnitude (as in ``sobel``), hysteresis."""
    if not 0 <= low <= high:
        raise ValueError(f"canny needs 0 <= low <= high, got low={low}, high={high}")
    gray = gaussian_blur(luminance(images), sigma)
    gx, gy = sobel_gradients(gray)
    thin = non_maximum_suppression(torch.hypot(gx, gy) / SOBEL_MAX, gx, gy)
    # A zero magnitude is never an edge, even with low = 0.
    return hysteresis((thin >= low) & (thin > 0), (thin >= high) & (thin > 0))


def shape_mask(images: torch.Tensor, background: float | Sequence[float] | torch.Tensor | None
               = None, tol: float = 0.05) -> torch.Tensor:
    """Foreground {0, 1}: colour pixels differing from ``background`` (default BACKGROUND, a
    scalar or one value per channel) by more than ``tol`` in any channel; grey pixels > 0.5."""
    _check_images(images)
    if images.shape[1] == 1:
        return (images > 0.5).float()
    if background is None:
        background = BACKGROUND
    colour = torch.as_tensor(background, dtype=images.dtype, device=images.device)
    if colour.numel() not in (1, 3):
        raise ValueError(f"background must be a scalar or 3 values, got shape "
                         f"{tuple(colour.shape)}")
    colour = colour.reshape(1, -1, 1, 1)
    return ((images - colour).abs() > tol).any(1, keepdim=True).float()


def _neighbours(x: torch.Tensor) -> torch.Tensor:
    """(8, *x.shape) bool: P2..P9, clockwise from north, False outside the image."""
    offsets = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))
    return torch.stack([_shift(x.float(), dy, dx) for dy, dx in offsets]).bool()


def _isolated_blocks(x: torch.Tensor) -> torch.Tensor:
    """The top-left pixels of 2x2 foreground blocks with nothing else in their 4x4 window."""
    block = x & _shift(x.float(), 0, 1).bool() & _shift(x.float(), 1, 0).bool() \
        & _shift(x.float(), 1, 1).bool()
    window = F.conv2d(F.pad(x.float(), (1, 2, 1, 2)), torch.ones(1, 1, 4, 4, device=x.device))
    return block & (window == 4)


def zhang_suen(binary: torch.Tensor) -> torch.Tensor:
    """Zhang-Suen thinning of a (B, 1, H, W) mask (nonzero = foreground); float32 {0, 1}.

    Zhang-Suen deletes a lone 2x2 block outright (all four pixels pass the first test at once),
    so a round or square blob of even width would vanish; its top-left pixel is kept instead."""
    x = binary != 0
    # Each full pass removes at least one pixel or stops; no image has more than H * W pixels.
    for _ in range(x.shape[-2] * x.shape[-1]):
        changed = False
        for first in (True, False):
            p2, _, p4, _, p6, _, p8, _ = n = _neighbours(x)
            count = n.sum(0)
            transitions = (~n & n.roll(-1, 0)).sum(0)
            # The first sub-iteration peels south-east edges and north-west corners, the
            # second north-west edges and south-east corners, so the skeleton stays centred.
            one, two = (p2 & p4 & p6, p4 & p6 & p8) if first else (p2 & p4 & p8, p2 & p6 & p8)
            side = ~one & ~two
            remove = x & (count >= 2) & (count <= 6) & (transitions == 1) & side
            remove &= ~_isolated_blocks(x)
            if remove.any():
                x = x & ~remove
                changed = True
        if not changed:
            break
    return x.float()


def skeleton(images: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """One-pixel-wide skeleton {0, 1}: ``shape_mask`` for colour images, > ``threshold`` for
    grey, then Zhang-Suen thinning."""
    _check_images(images)
    binary = shape_mask(images) if images.shape[1] == 3 else images > threshold
    return zhang_suen(binary)


def control_image(kind: str, images: torch.Tensor) -> torch.Tensor:
    """The ``kind`` control map (one of CONTROLS) of ``images`` with default parameters."""
    controls = {"sobel": sobel, "canny": canny, "mask": shape_mask, "skeleton": skeleton}
    if kind not in controls:
        raise ValueError(f"unknown control {kind!r}: choose one of {', '.join(CONTROLS)}"
                         f"{closest(str(kind), CONTROLS)}")
    return controls[kind](images)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) intersection over union of (B, 1, H, W) masks thresholded at 0.5; 1 when both are
    empty (nothing to find, nothing found)."""
    for name, mask in (("a", a), ("b", b)):
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1:
            raise ValueError(f"{name} must be a (B, 1, H, W) tensor, got shape "
                             f"{tuple(getattr(mask, 'shape', ()))}")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    a, b = a > 0.5, b > 0.5
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))
