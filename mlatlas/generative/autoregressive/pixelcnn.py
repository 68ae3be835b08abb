r"""PixelCNN (van den Oord, Kalchbrenner & Kavukcuoglu, ICML 2016, "Pixel Recurrent Neural
Networks") and Gated PixelCNN (van den Oord et al., NeurIPS 2016, "Conditional Image Generation
with PixelCNN Decoders"), for binary images in raster order.

PixelCNN makes a convolution autoregressive by zeroing the kernel taps at and after the centre
in raster order: mask A (first layer) also zeroes the centre, so output (r, c) never sees x_{rc};
mask B (every later layer) keeps the centre, which by then holds only features of earlier
pixels. The net is a 7x7 mask-A convolution, residual blocks
h + conv1x1(relu(conv3x3_B(relu(conv1x1(relu(h)))))), and 1x1 convolutions to one logit per
pixel. Stacked masked 3x3 convolutions leave a blind spot: pixels up and to the right of
(r, c) that precede it in raster order yet never reach it (the tests show it by gradients).

Gated PixelCNN removes the blind spot with two stacks. The vertical stack convolves a
(k//2 + 1) x k window of the rows at and above r (full width), the horizontal stack a
1 x (k//2 + 1) window of the row to the left of c (the first layer shifted one pixel, so it never
sees x_{rc}); the vertical features, shifted down one row, join the horizontal stack through a
1x1 convolution, so together they see every earlier pixel. Each layer is gated,

    y = tanh(W_f * x + V_f h_y) o sigmoid(W_g * x + V_g h_y),

with h_y a learned embedding of the class label for ``--conditional`` (the conditional PixelCNN
of the second paper; plain PixelCNN adds the same embedding as a bias to each block), and the
horizontal stack is residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mlatlas.core.config import ConfigError, require_at_least
from mlatlas.generative.autoregressive.common import BernoulliAutoregressive, LabelBias
from mlatlas.generative.likelihood import DensityConfig, DensityData


def raster_mask(kernel: int, mask_type: str) -> torch.Tensor:
    """The (kernel, kernel) mask of a masked convolution: 1 on the taps before the centre in
    raster order, and on the centre itself for mask B."""
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
    mask = torch.ones(kernel, kernel)
    centre = kernel // 2
    mask[centre, centre + (mask_type == "B"):] = 0
    mask[centre + 1:] = 0
    return mask


class MaskedConv2d(nn.Conv2d):
    """A 'same' convolution whose kernel is multiplied by :func:`raster_mask`."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, mask_type: str):
        super().__init__(in_channels, out_channels, kernel, padding=kernel // 2)
        self.register_buffer("mask", raster_mask(kernel, mask_type), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class ResidualBlock(nn.Module):
    """h + conv1x1(relu(conv3x3_B(relu(conv1x1(relu(h)))))) at 2h -> h -> h -> 2h channels."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // 2, 1)
        self.conv = MaskedConv2d(channels // 2, channels // 2, 3, "B")
        self.expand = nn.Conv2d(channels // 2, channels, 1)
        self.label = LabelBias(num_classes, (channels, 1, 1))

    def forward(self, h: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        out = self.reduce(F.relu(h + self.label(y, len(h))))
        return h + self.expand(F.relu(self.conv(F.relu(out))))


class PixelCNN(BernoulliAutoregressive):
    def __init__(self, sample_shape: tuple[int, ...], channels: int, blocks: int,
                 num_classes: int = 0):
        super().__init__(sample_shape, num_classes)
        self.first = MaskedConv2d(sample_shape[0], channels, 7, "A")
        self.blocks = nn.ModuleList(ResidualBlock(channels, num_classes) for _ in range(blocks))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(),
                                  nn.Conv2d(channels, sample_shape[0], 1))

    def logits(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.first(x)
        for block in self.blocks:
            h = block(h, y)
        return self.head(h)


def gate(x: torch.Tensor) -> torch.Tensor:
    """tanh(a) o sigmoid(b) for x = [a, b] split along channels."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One layer of the two stacks; ``first`` shifts the horizontal window off the centre."""

    def __init__(self, in_channels: int, channels: int, kernel: int, first: bool,
                 num_classes: int):
        super().__init__()
        self.kernel, self.first = kernel, first
        self.vertical = nn.Conv2d(in_channels, 2 * channels, (kernel // 2 + 1, kernel))
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal = nn.Conv2d(in_channels, 2 * channels, (1, kernel // 2 + 1))
        self.horizontal_out = nn.Conv2d(channels, channels, 1)
        self.label = LabelBias(num_classes, (2 * channels, 1, 1))

    def forward(self, v: torch.Tensor, h: torch.Tensor,
                y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.kernel // 2
        # Row r of v_pre sees the input rows r - k//2 .. r, all columns within k//2.
        v_pre = self.vertical(F.pad(v, (half, half, half, 0)))
        # Shifted down one row, it brings the horizontal stack only rows above r.
        v_down = F.pad(v_pre, (0, 0, 1, 0))[:, :, :-1]
        if self.first:
            h_pre = self.horizontal(F.pad(h, (half + 1, 0, 0, 0))[:, :, :, :-1])
        else:
            h_pre = self.horizontal(F.pad(h, (half, 0, 0, 0)))
        h_pre = h_pre + self.vertical_to_horizontal(v_down)
        label = self.label(y, len(v))
        v_out = gate(v_pre + label)
        h_out = self.horizontal_out(gate(h_pre + label))
        return v_out, h_out if self.first else h + h_out


class GatedPixelCNN(BernoulliAutoregressive):
    def __init__(self, sample_shape: tuple[int, ...], channels: int, layers: int,
                 kernel: int = 7, num_classes: int = 0):
        super().__init__(sample_shape, num_classes)
        self.layers = nn.ModuleList(
            GatedLayer(sample_shape[0] if i == 0 else channels, channels,
                       kernel if i == 0 else 3, i == 0, num_classes) for i in range(layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(),
                                  nn.Conv2d(channels, sample_shape[0], 1))

    def logits(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h, y)
        return self.head(h)


def check_single_channel(method: str, data: DensityData) -> None:
    if data.dataset.sample_shape[0] != 1:
        raise ConfigError(f"{method} models one-channel binary images; {data.dataset.name} has "
                          f"{data.dataset.sample_shape[0]} channels")


@dataclass
class Config(DensityConfig):
    METHOD: ClassVar[str] = "pixelcnn"

    steps: int = 800
    """Number of optimisation steps (on the 1,437 digits the held-out NLL is lowest near 800;
    longer runs overfit: give a larger dataset more)."""

    channels: int = 64
    """2h, the feature channels of the residual blocks (even)."""
    blocks: int = 4
    """Number of mask-B residual blocks after the 7x7 mask-A convolution."""

    def check(self) -> None:
        super().check()
        require_at_least(self, 2, "channels")
        if self.channels % 2:
            raise ConfigError(f"--channels must be even (the blocks halve it), got "
                              f"{self.channels}")

    def build_model(self, data: DensityData) -> nn.Module:
        check_single_channel(self.METHOD, data)
        return PixelCNN(data.dataset.sample_shape, self.channels, self.blocks,
                        data.dataset.num_classes * self.conditional)


@dataclass
class GatedConfig(DensityConfig):
    METHOD: ClassVar[str] = "gated_pixelcnn"

    steps: int = 800
    """Number of optimisation steps (on the 1,437 digits the held-out NLL is lowest near 800;
    longer runs overfit: give a larger dataset more)."""

    channels: int = 32
    """Feature channels of both stacks."""
    layers: int = 5
    """Gated layers: a 7x7 first layer, then 3x3 ones."""

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "channels", "layers")

    def build_model(self, data: DensityData) -> nn.Module:
        check_single_channel(self.METHOD, data)
        return GatedPixelCNN(data.dataset.sample_shape, self.channels, self.layers,
                             num_classes=data.dataset.num_classes * self.conditional)
