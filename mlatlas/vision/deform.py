r"""Deformable convolution v1 (Dai et al. 2017) and v2 (Zhu et al. 2019), torchvision's layout.

A k x k convolution reads its input at the taps p_0 + p_n (n = 1..k^2) of a fixed grid. The
deformable one adds a learned offset per tap and output position, and v2 also a modulation
scalar m in [0, 1] per tap:

    y(p_0) = sum_n  w_n  m_n(p_0)  x(p_0 + p_n + Delta p_n(p_0))

x at a fractional point is bilinear interpolation over its 4 neighbours, and a neighbour outside
the map reads 0. A point with y <= -1, y >= H, x <= -1 or x >= W reads 0. The offsets come in
(B, 2 G k_h k_w, H_out, W_out) with channel 2 (g k_h k_w + i k_w + j) the dy and the next one the
dx of tap (i, j) in offset group g. The mask is (B, G k_h k_w, H_out, W_out). Offset group g
serves input channels [g C/G, (g+1) C/G). ``groups`` splits the convolution itself as in
``torch.nn.Conv2d``.

The implementation is a deformable im2col. All taps' sampling points are computed at once, the 4
neighbours of every point are gathered, and the (B, C k^2, L) columns go through one batched
matrix product with the weights. Autograd gives the gradients: the input's through the
gathers, the offsets' through the bilinear weights, which are linear in the point's fractional
part.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mlatlas.vision.boxes import BoxError


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def deform_conv2d(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C_out, H_out, W_out) deformable convolution (torchvision.ops.deform_conv2d):
    ``input`` (B, C_in, H, W), ``offset`` (B, 2 G k_h k_w, H_out, W_out), ``weight``
    (C_out, C_in / groups, k_h, k_w), ``mask`` (B, G k_h k_w, H_out, W_out) for v2 (None: v1)."""
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    b, c_in, height, width = _shape(input, 4, "input", "(B, C_in, H, W)")
    c_out, c_per_group, kh, kw = _shape(weight, 4, "weight", "(C_out, C_in / groups, k_h, k_w)")
    if c_in % c_per_group:
        raise BoxError(f"weight {tuple(weight.shape)} takes {c_per_group} input channels per "
                       f"group, which does not divide the input's {c_in}")
    groups = c_in // c_per_group
    if c_out % groups:
        raise BoxError(f"{c_out} output channels do not split into {groups} groups")
    h_out = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if h_out < 1 or w_out < 1:
        raise BoxError(f"a {kh}x{kw} kernel (dilation {dh, dw}, padding {ph, pw}) does not fit "
                       f"the {height}x{width} input")
    taps = kh * kw
    if offset.dim() != 4 or offset.shape[0] != b or offset.shape[2:] != (h_out, w_out) \
            or offset.shape[1] % (2 * taps) or offset.shape[1] == 0:
        raise BoxError(f"offset must be (B, 2 G k_h k_w, H_out, W_out) = ({b}, 2 G {taps}, "
                       f"{h_out}, {w_out}) for a {kh}x{kw} kernel, got {tuple(offset.shape)}")
    offset_groups = offset.shape[1] // (2 * taps)
    if c_in % offset_groups:
        raise BoxError(f"{offset_groups} offset groups do not divide the {c_in} input channels")
    if mask is not None and tuple(mask.shape) != (b, offset_groups * taps, h_out, w_out):
        raise BoxError(f"mask must be (B, G k_h k_w, H_out, W_out) = ({b}, "
                       f"{offset_groups * taps}, {h_out}, {w_out}), got {tuple(mask.shape)}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise BoxError(f"bias must have shape ({c_out},), got {tuple(bias.shape)}")

    # Sampling points (B, G, taps, H_out, W_out) of every tap at every output position.
    points = regular_grid((kh, kw), (h_out, w_out), (sh, sw), (ph, pw), (dh, dw),
                          input.device).to(input.dtype) \
        + offset.view(b, offset_groups, taps, 2, h_out, w_out)
    y, x = points[:, :, :, 0], points[:, :, :, 1]
    columns = _bilinear_zero_padded(input.view(b, offset_groups, c_in // offset_groups,
                                               height * width), y, x, height, width)
    if mask is not None:
        columns = columns * mask.view(b, offset_groups, 1, taps, h_out, w_out)
    # (B, groups, C_in / groups * taps, L) against (groups, C_out / groups, C_in / groups * taps)
    columns = columns.reshape(b, groups, c_per_group * taps, h_out * w_out)
    out = torch.einsum("gon,bgnl->bgol", weight.reshape(groups, c_out // groups, -1), columns)
    out = out.reshape(b, c_out, h_out, w_out)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def regular_grid(kernel, out, stride, padding, dilation, device=None) -> torch.Tensor:
    """(taps, 2, H_out, W_out): the (y, x) = p_0 + p_n a plain convolution reads, tap n = i k_w + j
    at output position p_0."""
    (kh, kw), (h_out, w_out) = kernel, out
    i = torch.arange(kh, device=device).repeat_interleave(kw) * dilation[0]
    j = torch.arange(kw, device=device).repeat(kh) * dilation[1]
    y = (torch.arange(h_out, device=device) * stride[0] - padding[0]).view(1, -1, 1) \
        + i.view(-1, 1, 1)
    x = (torch.arange(w_out, device=device) * stride[1] - padding[1]).view(1, 1, -1) \
        + j.view(-1, 1, 1)
    return torch.stack([y.expand(-1, -1, w_out), x.expand(-1, h_out, -1)], 1)


def _shape(t: torch.Tensor, dims: int, name: str, layout: str) -> tuple[int, ...]:
    if t.dim() != dims:
        raise BoxError(f"{name} must be {layout}, got {tuple(t.shape)}")
    return tuple(t.shape)


def _bilinear_zero_padded(maps: torch.Tensor, y: torch.Tensor, x: torch.Tensor, height: int,
                          width: int) -> torch.Tensor:
    """Values (B, G, C_g, taps, H_out, W_out) of ``maps`` (B, G, C_g, H W) at the points
    (``y``, ``x``) (B, G, taps, H_out, W_out); neighbours outside the map read 0."""
    inside = (y > -1) & (y < height) & (x > -1) & (x < width)
    y0, x0 = y.detach().floor(), x.detach().floor()
    ly, lx = y - y0, x - x0
    y0, x0 = y0.long(), x0.long()
    total = 0
    for dy, dx, w in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx),
                      (1, 0, ly * (1 - lx)), (1, 1, ly * lx)):
        yy, xx = y0 + dy, x0 + dx
        valid = inside & (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        index = (yy.clamp(0, height - 1) * width + xx.clamp(0, width - 1)).flatten(2)
        values = maps.gather(3, index[:, :, None].expand(-1, -1, maps.shape[2], -1))
        total = total + values.view(*maps.shape[:3], *y.shape[2:]) * (w * valid)[:, :, None]
    return total


class DeformConv2d(nn.Module):
    """A deformable convolution with its own offset (and, for v2, mask) predictor: a plain
    convolution of the same geometry, zero-initialised, so training starts from the regular
    grid (and m = sigmoid(0) = 1/2 for v2, as in Zhu et al.)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: int = 1, dilation: int = 1, groups: int = 1,
                 offset_groups: int = 1, modulated: bool = False, bias: bool = True):
        super().__init__()
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.offset_groups, self.modulated = offset_groups, modulated
        taps = kernel_size * kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size,
                                               kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.offset = nn.Conv2d(in_channels, offset_groups * taps * (3 if modulated else 2),
                                kernel_size, stride, padding, dilation)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        predicted = self.offset(x)
        taps = self.weight.shape[2] * self.weight.shape[3]
        offset = predicted[:, :2 * self.offset_groups * taps]
        mask = torch.sigmoid(predicted[:, 2 * self.offset_groups * taps:]) \
            if self.modulated else None
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding,
                             self.dilation, mask)

    def sampling_points(self, x: torch.Tensor) -> torch.Tensor:
        """(B, G, taps, 2, H_out, W_out): the (y, x) each tap reads at each output position."""
        taps = self.weight[0, 0].numel()
        offset = self.offset(x)[:, :2 * self.offset_groups * taps]
        b, _, h_out, w_out = offset.shape
        grid = regular_grid(self.weight.shape[2:], (h_out, w_out), _pair(self.stride),
                            _pair(self.padding), _pair(self.dilation), x.device)
        return grid.to(offset) + offset.view(b, self.offset_groups, taps, 2, h_out, w_out)
