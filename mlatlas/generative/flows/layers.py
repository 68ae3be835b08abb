r"""The invertible layers NICE, RealNVP and Glow are built of, and the small networks inside them.

Every layer maps data towards the latent space and counts its log-determinant:

    forward(x) -> (z, log|det dz/dx|)      z and x of the same number of elements; logdet (B,)
    inverse(z) -> x                        the exact inverse, forward(inverse(z))[0] = z

so that a stack f = f_K o ... o f_1 has log|det df/dx| = sum_k log|det df_k/dh_{k-1}|
(:class:`FlowSequence`), and the change of variables

    log p_X(x) = log p_Z(f(x)) + log|det df/dx|

gives the exact log-density (``model.FlowModel``). Tensors are (B, D) for points and flattened
images, (B, C, H, W) for images; every sum in a log-determinant runs over all but the batch axis.

Layers (x = (x_a, x_b) a partition of the input, x_a kept, x_b transformed; b a binary mask):

- :class:`AdditiveCoupling` (NICE):  y_a = x_a,  y_b = x_b + m(x_a);       log|det| = 0
- :class:`AffineCoupling` (RealNVP, Glow):  y_a = x_a,  y_b = x_b * exp(s(x_a)) + t(x_a);
  log|det| = sum s(x_a). The partition is a mask b (checkerboard, alternating dimensions),
  y = b*x + (1 - b)*(x * exp(s(b*x)) + t(b*x)), or the channel halves.
- :class:`Scaling` (NICE's last layer):  y = exp(S) * x;  log|det| = sum S
- :class:`ActNorm` (Glow):  y = exp(log s) * x + b per channel;  log|det| = H W sum log|s|
- :class:`InvertibleConv1x1` (Glow):  y_ij = W x_ij at every pixel, W = P L (U + diag(s));
  log|det| = H W sum log|s|
- :class:`Squeeze`: (C, H, W) -> (4C, H/2, W/2), each 2x2 patch into channels;  log|det| = 0
- :class:`Logit`: y = logit(alpha + (1 - 2 alpha) x) for x in [0, 1];
  log|det| = sum [log(1 - 2 alpha) - log p - log(1 - p)],  p = alpha + (1 - 2 alpha) x
- :class:`MultiScale`: one scale of RealNVP's multi-scale architecture: h = flow(x), half of
  h's channels factored out as latents, the other half passed on to the next scale;
  :class:`SplitPrior` makes the factored-out half Gaussian with mean and scale predicted from
  the kept half (Glow's learned prior), written as the flow eps = (z - mu(h)) * exp(-log sigma(h))
  onto a standard normal, log|det| = -sum log sigma(h).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def sum_except_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,): the sum over every axis but the first."""
    return x.flatten(1).sum(1)


# --- containers ----------------------------------------------------------------------------------

class FlowSequence(nn.Module):
    """f = f_K o ... o f_1: forward through the layers in order, summing their log-determinants;
    inverse through them in reverse order."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            z = layer.inverse(z)
        return z

    @torch.no_grad()
    def data_init(self, x: torch.Tensor) -> torch.Tensor:
        """Initialise every layer that has a data-dependent initialisation (ActNorm) on the
        activations this batch x reaches it with, in order; returns f(x)."""
        for layer in self.layers:
            if hasattr(layer, "data_init"):
                x = layer.data_init(x)
            else:
                x, _ = layer(x)
        return x


# --- fixed layers --------------------------------------------------------------------------------

class Logit(nn.Module):
    r"""y = logit(p), p = alpha + (1 - 2 alpha) x: maps x in [0, 1] to the real line (RealNVP,
    Dinh et al. 2017, section 4.1), so that a flow's density on R^D becomes one on [0, 1]^D.

    log|det dy/dx| = sum_d [log(1 - 2 alpha) - log p_d - log(1 - p_d)].
    Raises ValueError for values outside [0, 1] (or NaN), whose density it does not define."""

    def __init__(self, alpha: float = 0.05):
        super().__init__()
        if not 0 < alpha < 0.5:
            raise ValueError(f"alpha must lie in (0, 0.5), got {alpha}")
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not bool(((x >= 0) & (x <= 1)).all()):
            raise ValueError("a flow over images scores values in [0, 1] (dequantised grey "
                             f"levels); got values in [{float(x.min()):g}, {float(x.max()):g}]"
                             if not x.isnan().any() else "a flow was given NaN pixel values")
        p = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(p) - torch.log1p(-p)
        logdet = sum_except_batch(math.log(1 - 2 * self.alpha) - torch.log(p) - torch.log1p(-p))
        return y, logdet

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(z) - self.alpha) / (1 - 2 * self.alpha)


class Flatten(nn.Module):
    """(B, *shape) -> (B, prod(shape)); log|det| = 0."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.flatten(1), x.new_zeros(x.shape[0])

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z.reshape(z.shape[0], *self.shape)


class Squeeze(nn.Module):
    """(B, C, H, W) -> (B, 4C, H/2, W/2): the 2x2 patch at (2i, 2j) of channel c becomes channels
    4c + 2 di + dj at (i, j) (RealNVP's squeezing); a permutation, log|det| = 0."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        z = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return z.reshape(b, 4 * c, h // 2, w // 2), x.new_zeros(b)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z.shape
        x = z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, c // 4, 2 * h, 2 * w)


# --- learned element-wise and channel-mixing layers ----------------------------------------------

def channel_shape(x: torch.Tensor) -> tuple[int, ...]:
    """The broadcast shape of a per-channel parameter for x: (1, C) or (1, C, 1, 1)."""
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


class Scaling(nn.Module):
    """NICE's diagonal scaling layer (Dinh et al. 2015, section 3.3): y = exp(S) * x with one S_d
    per dimension; log|det| = sum_d S_d."""

    def __init__(self, dims: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(dims))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * self.log_scale.exp(), self.log_scale.sum().expand(x.shape[0])

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z * torch.exp(-self.log_scale)


class ActNorm(nn.Module):
    """Glow's activation normalisation (Kingma & Dhariwal 2018, section 3.1): a per-channel affine
    map y = exp(log s) * x + b, log|det| = H W sum_c log s_c (H W = 1 for vectors).

    :meth:`data_init` sets b and log s so that a batch's output has zero mean and unit variance
    per channel; the model calls it once, on the first training batch, before training."""

    def __init__(self, channels: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = channel_shape(x)
        y = x * self.log_scale.exp().view(shape) + self.bias.view(shape)
        pixels = math.prod(x.shape[2:])
        return y, (pixels * self.log_scale.sum()).expand(x.shape[0])

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        shape = channel_shape(z)
        return (z - self.bias.view(shape)) * torch.exp(-self.log_scale).view(shape)

    @torch.no_grad()
    def data_init(self, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """log s = -log std_c(x), b = -mean_c(x) / std_c(x) over the batch and pixels (the
        population std, so the output's variance is exactly 1); returns the output."""
        dims = [0, *range(2, x.dim())]
        mean, std = x.mean(dims), x.std(dims, correction=0)
        self.log_scale.copy_(-torch.log(std + eps))
        self.bias.copy_(-mean * self.log_scale.exp())
        return self(x)[0]


class InvertibleConv1x1(nn.Module):
    r"""Glow's invertible 1x1 convolution in LU form (Kingma & Dhariwal 2018, section 3.2): the
    same C x C matrix W at every pixel, y_ij = W x_ij, with

        W = P L (U + diag(s)),   log|det| = H W sum_c log|s_c|

    (P a fixed permutation, L unit lower triangular, U strictly upper triangular, s = sign *
    exp(log|s|) with the signs fixed). W starts as a random rotation. On vectors (B, C) it is the
    invertible linear map y = W x (H W = 1)."""

    def __init__(self, channels: int):
        super().__init__()
        w = torch.linalg.qr(torch.randn(channels, channels))[0]
        p, lower, upper = torch.linalg.lu(w)
        s = torch.diagonal(upper)
        self.register_buffer("permutation", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower * self.lower_mask)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, U + diag(s)) with L unit lower triangular and the second factor upper."""
        eye = torch.eye(len(self.log_s), dtype=self.log_s.dtype, device=self.log_s.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.log_s.exp())
        return lower, upper

    def weight(self) -> torch.Tensor:
        """W = P L (U + diag(s)), (C, C)."""
        lower, upper = self.factors()
        return self.permutation @ lower @ upper

    def inverse_weight(self) -> torch.Tensor:
        """W^-1 = (U + diag(s))^-1 L^-1 P^T, by two triangular solves."""
        lower, upper = self.factors()
        l_inv_pt = torch.linalg.solve_triangular(lower, self.permutation.T, upper=False,
                                                 unitriangular=True)
        return torch.linalg.solve_triangular(upper, l_inv_pt, upper=True)

    @staticmethod
    def apply(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return F.linear(x, w)
        return F.conv2d(x, w[:, :, None, None])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = math.prod(x.shape[2:])
        return self.apply(self.weight(), x), (pixels * self.log_s.sum()).expand(x.shape[0])

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return self.apply(self.inverse_weight(), z)


# --- coupling layers -----------------------------------------------------------------------------

def checkerboard_mask(shape: tuple[int, int], parity: int = 0) -> torch.Tensor:
    """RealNVP's checkerboard mask b_ij = (i + j + parity) mod 2 == 0, shape (1, 1, H, W)."""
    i, j = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
    return ((i + j + parity) % 2 == 0).float()[None, None]


def alternating_mask(dims: int, parity: int = 0) -> torch.Tensor:
    """NICE's partition into odd and even dimensions: b_d = (d + parity) mod 2 == 0, (1, D)."""
    return ((torch.arange(dims) + parity) % 2 == 0).float()[None]


class _Coupling(nn.Module):
    """The partition of a coupling layer: a binary ``mask`` (the kept entries are where it is 1;
    the network sees b * x and its output is used where it is 0) or, with no mask, the channel
    halves x_a, x_b = x.chunk(2, 1) (the first kept, or with ``flip`` the second)."""

    def __init__(self, net: nn.Module, mask: torch.Tensor | None = None, flip: bool = False):
        super().__init__()
        self.net = net
        self.flip = flip
        self.register_buffer("mask", mask)

    def halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_a kept, x_b transformed) of the channel partition."""
        first, second = x.chunk(2, 1)
        return (second, first) if self.flip else (first, second)

    def join(self, x_a: torch.Tensor, y_b: torch.Tensor) -> torch.Tensor:
        return torch.cat((y_b, x_a) if self.flip else (x_a, y_b), 1)


class AdditiveCoupling(_Coupling):
    r"""NICE's additive coupling (Dinh et al. 2015, section 3.2):

        y_a = x_a,   y_b = x_b + m(x_a);   x_b = y_b - m(y_a);   log|det| = 0

    ``net`` is m: kept half -> transformed half's size (masked: the whole input -> the whole)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zero = x.new_zeros(x.shape[0])
        if self.mask is None:
            x_a, x_b = self.halves(x)
            return self.join(x_a, x_b + self.net(x_a)), zero
        b = self.mask
        return x + (1 - b) * self.net(b * x), zero

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            z_a, z_b = self.halves(z)
            return self.join(z_a, z_b - self.net(z_a))
        b = self.mask
        return z - (1 - b) * self.net(b * z)


class AffineCoupling(_Coupling):
    r"""The affine coupling of RealNVP (Dinh et al. 2017, section 3.3) and Glow:

        y_a = x_a,   y_b = x_b * exp(s(x_a)) + t(x_a);   x_b = (y_b - t(y_a)) * exp(-s(y_a));
        log|det| = sum s(x_a)

    ``net`` maps the kept half to 2 * (size of the transformed half) channels, read as
    (s~, t) = net(x_a).chunk(2, 1), and the log-scale is s = S(s~) by ``scale``:

    - "exp": s = s~ (the plain exponential);
    - "tanh": s = a * tanh(s~) with a learned per-channel a (RealNVP's bounded scale);
    - "sigmoid": s = log sigmoid(s~ + 2) (Glow's code: a scale in (0, 1), 0.88 at s~ = 0).

    Masked: y = x * exp(s) + t with s and t zeroed where b = 1, the network seeing b * x.
    """

    def __init__(self, net: nn.Module, mask: torch.Tensor | None = None, flip: bool = False,
                 scale: str = "tanh", channels: int = 1):
        super().__init__(net, mask, flip)
        if scale not in ("exp", "tanh", "sigmoid"):
            raise ValueError(f"scale must be exp, tanh or sigmoid, got {scale!r}")
        self.scale = scale
        self.tanh_scale = nn.Parameter(torch.ones(channels)) if scale == "tanh" else None

    def log_scale_and_shift(self, x_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, t) = (S(s~), t) with (s~, t) = net(x_a)."""
        raw, t = self.net(x_a).chunk(2, 1)
        if self.scale == "tanh":
            s = self.tanh_scale.view(channel_shape(raw)) * torch.tanh(raw)
        elif self.scale == "sigmoid":
            s = F.logsigmoid(raw + 2)
        else:
            s = raw
        return s, t

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mask is None:
            x_a, x_b = self.halves(x)
            s, t = self.log_scale_and_shift(x_a)
            return self.join(x_a, x_b * s.exp() + t), sum_except_batch(s)
        b = self.mask
        s, t = self.log_scale_and_shift(b * x)
        s, t = (1 - b) * s, (1 - b) * t
        return x * s.exp() + t, sum_except_batch(s)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            z_a, z_b = self.halves(z)
            s, t = self.log_scale_and_shift(z_a)
            return self.join(z_a, (z_b - t) * torch.exp(-s))
        b = self.mask
        s, t = self.log_scale_and_shift(b * z)
        s, t = (1 - b) * s, (1 - b) * t
        return (z - t) * torch.exp(-s)


# --- the multi-scale architecture ----------------------------------------------------------------

class SplitPrior(nn.Module):
    r"""Glow's learned prior of a factored-out half z given the kept half h (Kingma & Dhariwal
    2018, the code's ``split2d``): p(z | h) = N(z; mu(h), diag sigma(h)^2), (mu, log sigma) =
    net(h) (zero-initialised: N(0, I) at the start). Written as the flow

        eps = (z - mu(h)) * exp(-log sigma(h)),   log|det| = -sum log sigma(h),

    so that N(z; mu, sigma^2) = N(eps; 0, I) / prod sigma, and sampling eps ~ N(0, T^2 I) draws
    z = mu + T sigma eps from the prior with its scales times T."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_sigma = self.net(h).chunk(2, 1)
        return (z - mu) * torch.exp(-log_sigma), -sum_except_batch(log_sigma)

    def inverse(self, h: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        mu, log_sigma = self.net(h).chunk(2, 1)
        return mu + log_sigma.exp() * eps


class MultiScale(nn.Module):
    r"""One scale of the multi-scale architecture (RealNVP, Dinh et al. 2017, section 3.6):

        h = flow(x),   (h_1, z_1) = h.chunk(2, 1),   z = [z_1, inner(h_1)]  (flattened)

    half of the channels of h (``shape``, (C, H, W)) are factored out as latents z_1 (through
    ``prior``, a :class:`SplitPrior`, if given), the other half go on to the next scale
    ``inner``, whose output must be flat. log|det| = flow's + prior's + inner's. Output (B, D)."""

    def __init__(self, flow: nn.Module, inner: nn.Module, shape: tuple[int, int, int],
                 prior: SplitPrior | None = None):
        super().__init__()
        self.flow, self.inner, self.prior = flow, inner, prior
        c, h, w = shape
        self.kept_shape = (c - c // 2, h, w)
        self.out_shape = (c // 2, h, w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, logdet = self.flow(x)
        h_1, z_1 = h.chunk(2, 1)
        if self.prior is not None:
            z_1, ld = self.prior(h_1, z_1)
            logdet = logdet + ld
        z_2, ld = self.inner(h_1)
        return torch.cat([z_1.flatten(1), z_2], 1), logdet + ld

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        n_out = math.prod(self.out_shape)
        z_1 = z[:, :n_out].reshape(z.shape[0], *self.out_shape)
        h_1 = self.inner.inverse(z[:, n_out:])
        if self.prior is not None:
            z_1 = self.prior.inverse(h_1, z_1)
        return self.flow.inverse(torch.cat([h_1, z_1], 1))

    @torch.no_grad()
    def data_init(self, x: torch.Tensor) -> torch.Tensor:
        h = self.flow.data_init(x) if hasattr(self.flow, "data_init") else self.flow(x)[0]
        h_1, z_1 = h.chunk(2, 1)
        if self.prior is not None:
            z_1 = self.prior(h_1, z_1)[0]
        z_2 = self.inner.data_init(h_1) if hasattr(self.inner, "data_init") else self.inner(h_1)[0]
        return torch.cat([z_1.flatten(1), z_2], 1)


# --- the networks inside the couplings -----------------------------------------------------------

def mlp(d_in: int, d_out: int, hidden: int, depth: int) -> nn.Sequential:
    """``depth`` hidden layers of ``hidden`` ReLU units; the last layer starts at zero, so the
    coupling starts as the identity."""
    layers: list[nn.Module] = []
    width = d_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    last = nn.Linear(width, d_out)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


def zero_conv(c_in: int, c_out: int) -> nn.Conv2d:
    """A 3x3 convolution started at zero (Glow's ``Conv2dZeros``, without its learned scale)."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def conv_net(c_in: int, c_out: int, hidden: int) -> nn.Sequential:
    """Glow's coupling network NN(): 3x3 conv, ReLU, 1x1 conv, ReLU, 3x3 conv started at zero
    (so the coupling starts as the identity); the spatial size is kept."""
    return nn.Sequential(nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(hidden, hidden, 1), nn.ReLU(), zero_conv(hidden, c_out))
