r"""Glow: generative flow with invertible 1x1 convolutions (Kingma & Dhariwal, NeurIPS 2018).

Change of variables (section 2): x = g(z), z = f(x) = f_K o ... o f_1(x), z ~ N(0, I),

    log p(x) = log p(z) + sum_i log|det(dh_i / dh_{i-1})|.

One step of flow (section 3, table 1), on h of shape (C, H, W):

- ActNorm:  y_ij = s * x_ij + b  (per channel);  x_ij = (y_ij - b) / s;
  log|det| = H W sum log|s|. Data-dependent initialisation: b and s are set so that the first
  batch leaves the layer with zero mean and unit variance per channel (done once, before training,
  by ``data_init``).
- Invertible 1x1 convolution:  y_ij = W x_ij;  x_ij = W^-1 y_ij;  log|det| = H W log|det W|,
  in LU form W = P L (U + diag(s)) (section 3.2), so log|det W| = sum log|s|.
- Affine coupling:  x_a, x_b = split(x);  (log s, t) = NN(x_b);  y_b = x_b;  y_a = s * x_a + t,
  s = sigmoid(log s~ + 2) (the paper's code); x_a = (y_a - t) / s;  log|det| = sum log|s|.
  (Here, as in ``layers.AffineCoupling``, the first half of the channels is kept and the second
  transformed; the 1x1 convolutions permute channels between steps, so which half is immaterial.)

Multi-scale architecture (section 3, figure 2): L levels, each a squeeze ((C, H, W) ->
(4C, H/2, W/2)), K steps of flow, and (all but the last) a split: half the channels z_i are
factored out with the learned prior p(z_i | h_i) = N(mu(h_i), diag sigma(h_i)^2), (mu, log sigma)
= a zero-initialised convolution of the kept half h_i (``layers.SplitPrior``); the top latent is
N(0, I). Sampling at temperature T: z ~ N(0, T^2 I) and the split priors' sigma times T.

Images: the dequantised x~ in [0, 1]^D goes through y = logit(alpha + (1 - 2 alpha) x~) (as
RealNVP; Glow itself shifts x~ to [-1/2, 1/2]), whose log-determinant is counted, so log_prob is a
density on [0, 1]^D. Points (B, D): K steps of ActNorm, the D x D invertible linear map (the 1x1
convolution of a single pixel) and an affine coupling with an MLP, no squeeze, no logit.

Not here: the learned, class-conditional top prior and the y-classifier of the paper's
conditional models (``--conditional`` is refused), the zero-convolutions' learned output scale.

Code: ``layers.ActNorm``, ``layers.InvertibleConv1x1``, ``layers.AffineCoupling`` (scale
"sigmoid"), ``layers.Squeeze``, ``layers.SplitPrior`` and ``layers.MultiScale`` (the split),
``layers.Logit``, ``model.FlowModel``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from mlatlas.core.config import ConfigError
from mlatlas.generative.flows import layers
from mlatlas.generative.flows.model import FlowModel, check_image, check_points, not_conditional
from mlatlas.generative.likelihood import DensityConfig, DensityData, load_data


def flow_step(c: int, net: nn.Module) -> list[nn.Module]:
    """One step of flow on c channels: ActNorm, invertible 1x1 convolution, affine coupling (the
    first ceil(c/2) channels kept, ``net`` mapping them to 2 * floor(c/2))."""
    return [layers.ActNorm(c), layers.InvertibleConv1x1(c),
            layers.AffineCoupling(net, scale="sigmoid")]


def glow_levels(shape: tuple[int, int, int], levels: int, depth: int, hidden: int,
                split_prior: bool) -> nn.Module:
    """L = ``levels`` levels of squeeze, K = ``depth`` steps and split, on (B, C, H, W); output
    (B, D)."""
    c, h, w = shape
    c4, size = 4 * c, (h // 2, w // 2)
    kept, out = c4 - c4 // 2, c4 // 2
    steps = [layers.Squeeze()]
    for _ in range(depth):
        steps += flow_step(c4, layers.conv_net(kept, 2 * out, hidden))
    if levels == 1:
        return layers.FlowSequence(*steps, layers.Flatten((c4, *size)))
    prior = layers.SplitPrior(layers.zero_conv(kept, 2 * out)) if split_prior else None
    inner = glow_levels((kept, *size), levels - 1, depth, hidden, split_prior)
    return layers.MultiScale(layers.FlowSequence(*steps), inner, (c4, *size), prior)


def glow_points(dims: int, depth: int, hidden: int, mlp_depth: int = 2) -> nn.Module:
    kept, out = dims - dims // 2, dims // 2
    return layers.FlowSequence(*[
        layer for _ in range(depth)
        for layer in flow_step(dims, layers.mlp(kept, 2 * out, hidden, mlp_depth))])


@dataclass
class Config(DensityConfig):
    """Glow: ActNorm, invertible 1x1 convolutions (LU) and affine couplings, multi-scale with
    learned split priors."""

    METHOD: ClassVar[str] = "glow"
    BERNOULLI: ClassVar[bool] = False

    dataset: str = "digits"
    """Training data: grey-level images (digits, mnist) or 2D points (8gaussians, ...)."""
    levels: int = 2
    """Images: L, levels of the multi-scale architecture (image sides must divide by 2^L)."""
    depth: int = 8
    """K, steps of flow (ActNorm, 1x1 convolution, affine coupling) per level (points: in all)."""
    hidden: int = 32
    """Channels (images) or units (points) of the coupling networks' hidden layers."""
    split_prior: bool = True
    """Learned split priors N(mu(h), sigma(h)^2) for the factored-out halves (else N(0, I))."""
    alpha: float = 0.05
    """Images: the logit transform's alpha, y = logit(alpha + (1 - 2 alpha) x)."""

    def check(self) -> None:
        super().check()
        not_conditional(self)
        for flag, value in (("levels", self.levels), ("depth", self.depth),
                            ("hidden", self.hidden)):
            if value < 1:
                raise ConfigError(f"--{flag} must be at least 1, got {value}")
        if not 0 < self.alpha < 0.5:
            raise ConfigError(f"--alpha must lie in (0, 0.5), got {self.alpha}")

    def check_data(self) -> None:
        self.build_model(load_data(self))  # the data, and its shape against --levels

    def build_model(self, data: DensityData) -> nn.Module:
        shape = tuple(data.dataset.sample_shape)
        if data.kind == "points":
            dims = check_points(shape, self.METHOD)
            return FlowModel(glow_points(dims, self.depth, self.hidden), shape)
        shape = check_image(shape, self.levels, f"--levels {self.levels}")
        flow = layers.FlowSequence(
            layers.Logit(self.alpha),
            glow_levels(shape, self.levels, self.depth, self.hidden, self.split_prior))
        return FlowModel(flow, shape)
