r"""Pooling a feature map to fixed sizes: SPP, RoI pooling, RoI Align, and R-FCN's
position-sensitive variants, with torchvision's semantics.

**Spatial pyramid pooling** (He et al. 2014). Each level n max-pools an a x a map into n x n bins
and the levels are concatenated, so the vector has C * sum_n n^2 entries whatever a is. Bin i of
a level covers [floor(i a / n), ceil((i + 1) a / n)), the adaptive rule. The paper's rule (window
ceil(a / n), stride floor(a / n)) does not always give n bins: for a = 7, n = 4 it slides a
2-wide window with stride 1 and makes 6 (``paper_bins``).

**RoI pooling** (Girshick 2015). A region is rounded to the feature grid, its start
round(x1 s) and end round(x2 s) both inclusive (s: the spatial scale), and split into
PH x PW bins [floor(i h / PH), ceil((i + 1) h / PH)). Each bin keeps its maximum (0 when empty).
The bins come in a few sizes a x b. Running maxima over the whole map, row by row, then column
by column (M_{a,b} = max(M_{a,b-1}, shifted M_{a,1})), hold the maximum of every a x b window,
so each bin is one read from its size's table.

**RoI Align** (He et al. 2017). No rounding. With ``aligned`` the region starts at x1 s - 1/2,
so a pixel's centre is its coordinate. Bin (i, j) averages bilinear samples on a g_h x g_w grid,
at y = y_1 + (i + (u + 1/2) / g_h) b_h, where b_h = h / PH and g_h = ``sampling_ratio``, or
ceil(h / PH) when that is -1 (adaptive). Bilinear interpolation is a product of a weight over
rows and a weight over columns, and the grid is a product of rows and columns. So the whole
pooling of one region is two interpolation matrices:

    out_k[c] = A_y^k  X[b_k, c]  (A_x^k)^T,   A_y^k[i, h] = (1/g_h) sum_u w(y_iu, h)

with w(y, h) the 1D bilinear weight of sample y on row h. That is two matrix products per image,
and autograd gives the gradient through the same products.

**Position-sensitive pooling** (Dai et al. 2016, R-FCN). The input has C_out PH PW channels.
Bin (i, j) of output channel c pools only input channel (c PH + i) PW + j, so each bin reads the
score map that was trained to fire on that part of an object. ``ps_roi_pool`` averages each bin,
by a summed-area table. ``ps_roi_align`` averages bilinear samples as RoI Align does, from
y_1 = y1 s - 1/2, with no minimum size and a count of g_h g_w.

Every function takes ``input`` (B, C, H, W) and ``rois`` (K, 5) = (batch_index, x1, y1, x2, y2)
in input-image coordinates, scaled by ``spatial_scale`` into the feature map, and returns
(K, C', PH, PW). They run in float32 and float64, on any device, with autograd for ``input``
(the boxes get no gradient, as in torchvision).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mlatlas.vision.boxes import BoxError, check_rois


def spp(x: torch.Tensor, levels: tuple[int, ...] = (1, 2, 4)) -> torch.Tensor:
    """(B, C * sum n^2) spatial pyramid max pooling of ``x`` (B, C, H, W), level by level, each
    level's n x n bins flattened row by row."""
    if x.dim() != 4:
        raise ValueError(f"spp expects (B, C, H, W), got {tuple(x.shape)}")
    if not levels or min(levels) < 1:
        raise ValueError(f"spp levels must be positive integers, got {levels}")
    if min(x.shape[-2:]) < max(levels):
        raise ValueError(f"spp level {max(levels)} needs a map of at least {max(levels)}x"
                         f"{max(levels)}, got {x.shape[-2]}x{x.shape[-1]}")
    return torch.cat([F.adaptive_max_pool2d(x, n).flatten(1) for n in levels], 1)


def paper_bins(a: int, n: int) -> int:
    """How many bins the SPP paper's window ceil(a/n) with stride floor(a/n) gives on a side of
    length a (n is what a level asks for)."""
    window, stride = math.ceil(a / n), a // n
    return (a - window) // stride + 1


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    # C's round(): halves away from zero (torch.round rounds halves to even).
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _check(input: torch.Tensor, rois: torch.Tensor, output_size) -> tuple[int, int]:
    if input.dim() != 4:
        raise BoxError(f"input must be a (B, C, H, W) feature map, got {tuple(input.shape)}")
    check_rois(rois, input.shape[0])
    if rois.dtype != input.dtype:
        raise BoxError(f"rois ({rois.dtype}) and input ({input.dtype}) must share a dtype")
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    if ph < 1 or pw < 1:
        raise BoxError(f"output_size must be positive, got {output_size}")
    return int(ph), int(pw)


def _check_position_sensitive(input: torch.Tensor, ph: int, pw: int) -> int:
    if input.shape[1] % (ph * pw):
        raise BoxError(f"position-sensitive pooling to {ph}x{pw} needs input channels divisible "
                       f"by {ph * pw}, got {input.shape[1]}")
    return input.shape[1] // (ph * pw)


def _per_image(input: torch.Tensor, rois: torch.Tensor, out_channels: int, ph: int, pw: int,
               pool) -> torch.Tensor:
    """Output (K, out_channels, ph, pw) pooled image by image: ``pool(x_b, rows)`` pools the
    regions ``rows`` of image b (a loop over the batch's images, never over regions)."""
    if len(rois) == 0:
        return input.new_zeros(0, out_channels, ph, pw)
    index = rois[:, 0].long()
    order = torch.sort(index, stable=True)
    counts = torch.bincount(order.values).tolist()
    parts = [pool(input[b], rows) for b, rows in enumerate(order.indices.split(counts))
             if len(rows)]
    return torch.cat(parts)[order.indices.argsort()]


# --- RoI max pooling --------------------------------------------------------------------------

def _bin_edges(start: torch.Tensor, length: torch.Tensor, bins: int, size: int):
    """Integer [lo, hi) windows (K, bins) of RoI pooling's bins along one axis, clamped."""
    size_per_bin = length.to(torch.float64)[:, None] / bins
    i = torch.arange(bins, device=start.device, dtype=torch.float64)
    lo = torch.floor(i * size_per_bin).long() + start[:, None]
    hi = torch.ceil((i + 1) * size_per_bin).long() + start[:, None]
    return lo.clamp(0, size), hi.clamp(0, size)


def _running_max(value, index, new_value, new_index, dim):
    """The window maximum grown by one along ``dim``: the old window without its last position
    against the positions one step further (strictly greater wins, so ties keep the first)."""
    value = value.narrow(dim, 0, value.shape[dim] - 1)
    index = index.narrow(dim, 0, index.shape[dim] - 1)
    better = new_value > value
    return torch.where(better, new_value, value), torch.where(better, new_index, index)


def roi_pool(input: torch.Tensor, rois: torch.Tensor, output_size: int | tuple[int, int],
             spatial_scale: float = 1.0) -> torch.Tensor:
    """(K, C, PH, PW) max pooling of each region's bins (torchvision.ops.roi_pool)."""
    ph, pw = _check(input, rois, output_size)
    _, c, height, width = input.shape
    if len(rois) == 0:
        return _per_image(input, rois, c, ph, pw, None)
    with torch.no_grad():
        corners = _round_half_away(rois[:, 1:] * spatial_scale).long()
        x1, y1, x2, y2 = corners.unbind(1)
        rows = _bin_edges(y1, (y2 - y1 + 1).clamp(min=1), ph, height)
        cols = _bin_edges(x1, (x2 - x1 + 1).clamp(min=1), pw, width)
        heights, widths = rows[1] - rows[0], cols[1] - cols[0]

    def pool(x, regions):
        # The bins take few distinct sizes a x b. Running maxima over the whole map give the
        # position of the maximum of every a x b window; each bin reads its window's entry,
        # and the values are gathered from x at those positions, so autograd sends each bin's
        # gradient to its maximum, as torchvision's argmax does (the earlier wins a tie).
        h, w = heights[regions], widths[regions]
        top, left = rows[0][regions], cols[0][regions]
        n_bins = len(regions) * ph * pw
        # argmax (C, K PH PW): the flat map position each bin reads (-1: empty bin).
        argmax = torch.full((c, n_bins), -1, dtype=torch.int32, device=x.device)
        sizes_a, sizes_b = set(h.unique().tolist()) - {0}, set(w.unique().tolist()) - {0}
        with torch.no_grad():
            flat = torch.arange(height * width, dtype=torch.int32, device=x.device)
            flat = flat.view(1, height, width).expand(c, -1, -1)
            rows_value, rows_index = x, flat              # max over a rows: (C, H - a + 1, W)
            for a in range(1, max(sizes_a, default=0) + 1):
                if a > 1:
                    rows_value, rows_index = _running_max(rows_value, rows_index,
                                                          x[:, a - 1:], flat[:, a - 1:], 1)
                if a not in sizes_a:
                    continue
                value, index = rows_value, rows_index     # max over a x b
                for b in range(1, max(sizes_b) + 1):
                    if b > 1:
                        value, index = _running_max(value, index, rows_value[:, :, b - 1:],
                                                    rows_index[:, :, b - 1:], 2)
                    k, i, j = ((h == a)[:, :, None] & (w == b)[:, None, :]).nonzero().unbind(1)
                    if len(k):
                        corner = top[k, i] * index.shape[2] + left[k, j]
                        argmax.index_copy_(1, (k * ph + i) * pw + j,
                                           index.reshape(c, -1).index_select(1, corner))
        empty = argmax < 0
        values = x.reshape(c, -1).gather(1, argmax.clamp(min=0).long()).masked_fill(empty, 0.0)
        return values.view(c, len(regions), ph, pw).transpose(0, 1)

    return _per_image(input, rois, c, ph, pw, pool)


# --- bilinear pooling -------------------------------------------------------------------------

def _interpolation_matrix(start: torch.Tensor, length: torch.Tensor, bins: int,
                          grid: torch.Tensor, size: int) -> torch.Tensor:
    """(K, bins, size): row i averages, over the g samples of bin i, each sample's 1D bilinear
    weights on the map's positions 0..size-1 (RoI Align's rule: a sample below -1 or above
    ``size`` reads 0, one in [-1, 0] reads position 0, one past size - 1 reads size - 1). A
    region with g = 0 samples pools to 0 (torchvision's PS-RoI Align divides 0 by 0 there)."""
    g_max = max(int(grid.max()), 1) if len(grid) else 1
    u = torch.arange(g_max, device=start.device, dtype=start.dtype)
    i = torch.arange(bins, device=start.device, dtype=start.dtype)
    bin_size = (length / bins)[:, None, None]
    g = grid.to(start.dtype)[:, None, None]
    y = start[:, None, None] + i[None, :, None] * bin_size + (u + 0.5) * bin_size / g
    used = u < g                                                       # (K, 1, g_max)
    empty = (y < -1.0) | (y > size)
    y = y.clamp(min=0)
    low = y.floor().long()
    last = low >= size - 1
    low = torch.where(last, size - 1, low)
    high = torch.where(last, size - 1, low + 1)
    frac = torch.where(last, 0.0, y - low.to(y.dtype))
    positions = torch.arange(size, device=start.device)
    weights = ((positions == low[..., None]) * (1 - frac)[..., None]
               + (positions == high[..., None]) * frac[..., None])
    weights = weights * (used & ~empty)[..., None]
    return weights.sum(2) / grid.clamp(min=1).to(start.dtype)[:, None, None]


def _align_matrices(rois, spatial_scale, ph, pw, sampling_ratio, height, width, offset,
                    minimum_size):
    """The interpolation matrices A_y (K, PH, H) and A_x (K, PW, W) of every region."""
    x1, y1, x2, y2 = (rois[:, 1:] * spatial_scale - offset).unbind(1)
    roi_w, roi_h = x2 - x1, y2 - y1
    if minimum_size:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full_like(roi_h, sampling_ratio, dtype=torch.long)
    else:
        grid_h, grid_w = torch.ceil(roi_h / ph).long(), torch.ceil(roi_w / pw).long()
    return (_interpolation_matrix(y1, roi_h, ph, grid_h, height),
            _interpolation_matrix(x1, roi_w, pw, grid_w, width))


# Floats of RoI Align's intermediate per block of regions on a CPU (6 MB: within a server's L3).
_CPU_BLOCK_FLOATS = 1_500_000


def roi_align(input: torch.Tensor, rois: torch.Tensor, output_size: int | tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False) -> torch.Tensor:
    """(K, C, PH, PW) RoI Align (torchvision.ops.roi_align): bilinear samples averaged per bin,
    ``sampling_ratio`` samples per bin side (-1: ceil(region side / bins)), ``aligned`` the
    half-pixel shift."""
    ph, pw = _check(input, rois, output_size)
    _, c, height, width = input.shape
    with torch.no_grad():
        a_y, a_x = _align_matrices(rois, spatial_scale, ph, pw, sampling_ratio, height, width,
                                   0.5 if aligned else 0.0, minimum_size=not aligned)
        a_y, a_x = a_y.to(input.dtype), a_x.to(input.dtype)

    def pool(x, regions):
        # A GEMM (K PH, H) @ (H, C W), then a batched product with A_x^T, laid out so that only
        # the small (K, PH, C, PW) result is permuted. On a CPU the regions go in blocks whose
        # (K PH, C W) intermediate stays in cache: one GEMM for all would write and re-read it
        # from memory (1.7x slower at 256 regions of a (256, 50, 50) map).
        rows = x.transpose(0, 1).reshape(height, -1)
        block = len(regions)
        if x.device.type == "cpu":
            block = max(1, _CPU_BLOCK_FLOATS // (ph * c * width))
        parts = []
        for chunk in regions.split(block):
            k = len(chunk)
            by_rows = a_y[chunk].reshape(k * ph, height) @ rows
            parts.append(torch.bmm(by_rows.view(k, ph * c, width), a_x[chunk].transpose(1, 2)))
        return torch.cat(parts).view(len(regions), ph, c, pw).transpose(1, 2)

    return _per_image(input, rois, c, ph, pw, pool)


def ps_roi_align(input: torch.Tensor, rois: torch.Tensor, output_size: int | tuple[int, int],
                 spatial_scale: float = 1.0, sampling_ratio: int = -1) -> torch.Tensor:
    """(K, C / (PH PW), PH, PW) position-sensitive RoI Align (torchvision.ops.ps_roi_align)."""
    ph, pw = _check(input, rois, output_size)
    c_out = _check_position_sensitive(input, ph, pw)
    _, _, height, width = input.shape
    with torch.no_grad():
        a_y, a_x = _align_matrices(rois, spatial_scale, ph, pw, sampling_ratio, height, width,
                                   0.5, minimum_size=False)
        a_y, a_x = a_y.to(input.dtype), a_x.to(input.dtype)

    def pool(x, regions):
        maps = x.view(c_out, ph, pw, height, width)
        by_rows = torch.einsum("kih,cijhw->kcijw", a_y[regions], maps)
        return torch.einsum("kcijw,kjw->kcij", by_rows, a_x[regions])

    return _per_image(input, rois, c_out, ph, pw, pool)


def ps_roi_pool(input: torch.Tensor, rois: torch.Tensor, output_size: int | tuple[int, int],
                spatial_scale: float = 1.0) -> torch.Tensor:
    """(K, C / (PH PW), PH, PW) position-sensitive average pooling (torchvision.ops.ps_roi_pool):
    bin (i, j) of channel c averages input channel (c PH + i) PW + j over the bin."""
    ph, pw = _check(input, rois, output_size)
    c_out = _check_position_sensitive(input, ph, pw)
    _, _, height, width = input.shape
    with torch.no_grad():
        corners = _round_half_away(rois[:, 1:] * spatial_scale).long()
        x1, y1, x2, y2 = corners.unbind(1)
        rows = _bin_edges(y1, (y2 - y1).clamp(min=1), ph, height)
        cols = _bin_edges(x1, (x2 - x1).clamp(min=1), pw, width)
    channel = torch.arange(c_out * ph * pw, device=input.device).view(c_out, ph, pw)

    def pool(x, regions):
        # A summed-area table S (C, H + 1, W + 1) in float64: a bin's sum is 4 reads of S.
        table = F.pad(x.double().cumsum(1).cumsum(2), (1, 0, 1, 0))
        y0, y1_ = rows[0][regions][:, None, :, None], rows[1][regions][:, None, :, None]
        x0, x1_ = cols[0][regions][:, None, None, :], cols[1][regions][:, None, None, :]
        ch = channel[None]
        total = (table[ch, y1_, x1_] - table[ch, y0, x1_] - table[ch, y1_, x0]
                 + table[ch, y0, x0])
        area = ((y1_ - y0) * (x1_ - x0)).to(total.dtype)
        return torch.where(area > 0, total / area.clamp(min=1), 0.0).to(x.dtype)

    return _per_image(input, rois, c_out, ph, pw, pool)
