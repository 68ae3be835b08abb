r"""RealNVP: density estimation using real-valued non-volume preserving transformations (Dinh,
Sohl-Dickstein & Bengio, ICLR 2017).

Change of variables (section 3.1): for a bijection f: x -> z and a prior p_Z = N(0, I),

    log p_X(x) = log p_Z(f(x)) + log|det(df(x)/dx^T)|.

Affine coupling (section 3.3): for a partition x = (x_{1:d}, x_{d+1:D}),

    y_{1:d} = x_{1:d},        y_{d+1:D} = x_{d+1:D} * exp(s(x_{1:d})) + t(x_{1:d})
    x_{d+1:D} = (y_{d+1:D} - t(y_{1:d})) * exp(-s(y_{1:d}))                 (the inverse)
    log|det dy/dx| = sum_j s(x_{1:d})_j                                     (a triangular Jacobian)

written with a binary mask b as y = b * x + (1 - b) * (x * exp(s(b * x)) + t(b * x)) (section
3.4): the checkerboard mask b_ij = (i + j) mod 2, or the channel-wise mask (the first half of the
channels kept), the roles of the halves swapped from one coupling to the next. s is bounded as
s = a * tanh(s~) with a learned per channel (the paper's "scale" and tanh output).

Multi-scale architecture (section 3.6): at each scale, three checkerboard couplings, a squeeze
(each 2x2 patch of C channels into 4C channels at half the resolution), three channel-wise
couplings; then half the channels are factored out as latents z_i and the rest go to the next
scale; the last scale has four checkerboard couplings. With h^(0) = x,

    (z^(i+1), h^(i+1)) = f^(i+1)(h^(i)),   z^(L) = f^(L)(h^(L-1)),   z = (z^(1), ..., z^(L)),

and every z^(i) is standard normal. Images: the dequantised x~ in [0, 1]^D goes through
y = logit(alpha + (1 - 2 alpha) x~), alpha = 0.05 (section 4.1), whose log-determinant is counted,
so that log_prob is a density on [0, 1]^D. Points: a stack of affine couplings on the two halves
of the coordinates, no logit. Sampling: z ~ N(0, T^2 I), x = f^-1(z).

Not here: the paper's deep residual coupling networks with batch and weight normalisation and
its batch normalisation layers (a three-layer CNN of ``--hidden`` channels stands in, the last
layer zero-initialised so that each coupling starts as the identity).

Code: ``layers.AffineCoupling`` (the coupling, both masks), ``layers.checkerboard_mask``,
``layers.Squeeze``, ``layers.MultiScale`` (factoring out), ``layers.Logit``, ``model.FlowModel``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from mlatlas.core.config import ConfigError
from mlatlas.generative.flows import layers
from mlatlas.generative.flows.model import FlowModel, check_image, check_points, not_conditional
from mlatlas.generative.likelihood import DensityConfig, DensityData, load_data


def checkerboard_coupling(c: int, h: int, w: int, parity: int, hidden: int) -> nn.Module:
    return layers.AffineCoupling(layers.conv_net(c, 2 * c, hidden),
                                 mask=layers.checkerboard_mask((h, w), parity), channels=c)


def channel_coupling(c: int, flip: bool, hidden: int) -> nn.Module:
    """Affine coupling on the channel halves of c channels (c even)."""
    return layers.AffineCoupling(layers.conv_net(c // 2, c, hidden), flip=flip, channels=c // 2)


def realnvp_scales(shape: tuple[int, int, int], scales: int, hidden: int) -> nn.Module:
    """The multi-scale f^(1), ..., f^(L) on (B, C, H, W) inputs, L = ``scales``, output (B, D)."""
    c, h, w = shape
    if scales == 1:
        return layers.FlowSequence(*[checkerboard_coupling(c, h, w, k % 2, hidden)
                                     for k in range(4)], layers.Flatten(shape))
    flow = layers.FlowSequence(
        *[checkerboard_coupling(c, h, w, k % 2, hidden) for k in range(3)],
        layers.Squeeze(),
        *[channel_coupling(4 * c, k % 2 == 1, hidden) for k in range(3)])
    inner = realnvp_scales((2 * c, h // 2, w // 2), scales - 1, hidden)
    return layers.MultiScale(flow, inner, (4 * c, h // 2, w // 2))


def realnvp_points(dims: int, couplings: int, hidden: int, depth: int) -> nn.Module:
    """``couplings`` affine couplings on (B, D) points, alternating which half is kept; s and t
    from one MLP of ``depth`` hidden layers of ``hidden`` units."""
    kept = [dims - dims // 2, dims // 2]  # the first half (ceil) kept, or with flip the second
    return layers.FlowSequence(*[
        layers.AffineCoupling(layers.mlp(kept[k % 2], 2 * kept[1 - k % 2], hidden, depth),
                              flip=k % 2 == 1, channels=kept[1 - k % 2])
        for k in range(couplings)])


@dataclass
class Config(DensityConfig):
    """RealNVP: affine couplings with checkerboard and channel masks, squeezes, multi-scale."""

    METHOD: ClassVar[str] = "realnvp"
    BERNOULLI: ClassVar[bool] = False

    dataset: str = "digits"
    """Training data: grey-level images (digits, mnist) or 2D points (8gaussians, ...)."""
    scales: int = 2
    """Images: scales of the multi-scale architecture (each but the last squeezes and factors
    out half of the channels); image sides must divide by 2^(scales - 1)."""
    hidden: int = 32
    """Channels (images) or units (points) of the coupling networks' hidden layers."""
    couplings: int = 8
    """Points: affine coupling layers, alternating which half of the coordinates is kept."""
    depth: int = 2
    """Points: hidden layers of each coupling's MLP."""
    alpha: float = 0.05
    """Images: the logit transform's alpha, y = logit(alpha + (1 - 2 alpha) x)."""

    def check(self) -> None:
        super().check()
        not_conditional(self)
        for flag, value in (("scales", self.scales), ("hidden", self.hidden),
                            ("couplings", self.couplings), ("depth", self.depth)):
            if value < 1:
                raise ConfigError(f"--{flag} must be at least 1, got {value}")
        if not 0 < self.alpha < 0.5:
            raise ConfigError(f"--alpha must lie in (0, 0.5), got {self.alpha}")

    def check_data(self) -> None:
        self.build_model(load_data(self))  # the data, and its shape against --scales

    def build_model(self, data: DensityData) -> nn.Module:
        shape = tuple(data.dataset.sample_shape)
        if data.kind == "points":
            dims = check_points(shape, self.METHOD)
            return FlowModel(realnvp_points(dims, self.couplings, self.hidden, self.depth), shape)
        shape = check_image(shape, self.scales - 1, f"--scales {self.scales}")
        flow = layers.FlowSequence(layers.Logit(self.alpha),
                                   realnvp_scales(shape, self.scales, self.hidden))
        return FlowModel(flow, shape)
