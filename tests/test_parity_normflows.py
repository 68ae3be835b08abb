"""Parity with normflows 1.7 (Stimper et al. 2023): with the same weights, our affine coupling,
ActNorm and LU 1x1 convolution compute the same outputs and log-determinants as normflows'
``AffineCouplingBlock``, ``ActNorm`` and ``Invertible1x1Conv(use_lu=True)``.

normflows' conventions, read from its source: a flow's ``forward`` is the generative direction
z -> x and its ``inverse`` the direction data -> latent, each returning (output, log|det|) of the
map it applies. Our layers' ``forward`` is data -> latent. So:

- the coupling: normflows' forward y_2 = x_2 * exp(s) + shift (scale_map "exp") or
  x_2 * sigmoid(s + 2) + shift ("sigmoid_inv") is the map of our forward with scale "exp" or
  "sigmoid"; its parameter network interleaves (shift, scale) as channels 0::2 and 1::2 where ours
  reads (s, t) = net(x_a).chunk(2, 1), so the last convolution's rows are reordered;
- ActNorm: normflows' forward z * exp(s) + t is our y = exp(log s) * x + b;
- the 1x1 convolution: normflows' inverse applies W = P L U (its forward W^-1), so our forward
  is its inverse and our inverse its forward (its log-determinant there is minus ours).
"""

import pytest
import torch

from mlatlas.generative.flows import layers

nf = pytest.importorskip("normflows")

F64 = torch.float64


def copy_conv_net(theirs: torch.nn.Module, ours: torch.nn.Sequential) -> None:
    """normflows' ConvNet2d (3x3, LeakyReLU(0), 1x1, LeakyReLU(0), 3x3) into our conv_net,
    the last layer's interleaved (shift, scale) rows reordered to (s, t)."""
    convs = [m for m in theirs.modules() if isinstance(m, torch.nn.Conv2d)]
    mine = [m for m in ours if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for a, b in zip(convs, mine, strict=True):
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)
        order = torch.cat([torch.arange(1, convs[-1].out_channels, 2),
                           torch.arange(0, convs[-1].out_channels, 2)])
        mine[-1].weight.copy_(convs[-1].weight[order])
        mine[-1].bias.copy_(convs[-1].bias[order])


@pytest.mark.parametrize(("their_map", "our_scale"), [("exp", "exp"), ("sigmoid_inv", "sigmoid")])
def test_affine_coupling(their_map, our_scale):
    torch.manual_seed(0)
    c, hidden = 6, 16
    net = nf.nets.ConvNet2d([c // 2, hidden, hidden, c], [3, 1, 3], leaky=0.0, init_zeros=False)
    theirs = nf.flows.AffineCouplingBlock(net, scale=True, scale_map=their_map,
                                          split_mode="channel").double()
    ours = layers.AffineCoupling(layers.conv_net(c // 2, c, hidden), scale=our_scale).double()
    copy_conv_net(net, ours.net)
    x = torch.randn(4, c, 5, 5, dtype=F64)
    y_theirs, ld_theirs = theirs(x)
    y_ours, ld_ours = ours(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=1e-10)
    torch.testing.assert_close(ld_ours, ld_theirs, rtol=0, atol=1e-10)
    x_theirs, _ = theirs.inverse(y_theirs)
    torch.testing.assert_close(ours.inverse(y_ours), x_theirs, rtol=0, atol=1e-10)
    # And in float32, to the 1e-5 the brief asks for.
    x32 = x.float()
    torch.testing.assert_close(ours.float()(x32)[0], theirs.float()(x32)[0], rtol=0, atol=1e-5)


def test_actnorm():
    torch.manual_seed(0)
    c = 5
    theirs = nf.flows.ActNorm((c, 1, 1))
    theirs.data_dep_init_done = torch.tensor(1.0)  # weights set by hand: skip its lazy init
    ours = layers.ActNorm(c)
    with torch.no_grad():
        ours.log_scale.normal_()
        ours.bias.normal_()
        theirs.s.copy_(ours.log_scale.view(1, c, 1, 1))
        theirs.t.copy_(ours.bias.view(1, c, 1, 1))
    x = torch.randn(3, c, 4, 6)
    y_theirs, ld_theirs = theirs(x)
    y_ours, ld_ours = ours(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(ld_ours, ld_theirs.expand(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.inverse(y_ours), theirs.inverse(y_theirs)[0], rtol=0,
                               atol=1e-5)


def test_actnorm_data_init_matches_normflows_lazy_init():
    """Both standardise the first batch per channel; normflows uses the unbiased std (n - 1),
    ours the population std, so the scales differ by sqrt(n / (n - 1)) exactly."""
    torch.manual_seed(0)
    x = 2 + 3 * torch.randn(8, 4, 3, 3, dtype=F64)
    theirs = nf.flows.ActNorm((4, 1, 1)).double()
    theirs(x)  # its data-dependent init happens on the first forward call
    ours = layers.ActNorm(4).double()
    ours.data_init(x)
    n = 8 * 3 * 3
    torch.testing.assert_close(ours.log_scale - theirs.s.flatten(),
                               torch.full((4,), 0.5 * torch.log(torch.tensor(n / (n - 1.0))),
                                          dtype=F64), rtol=0, atol=1e-6)


def test_invertible_1x1_conv_lu():
    torch.manual_seed(0)
    c = 6
    ours = layers.InvertibleConv1x1(c)
    theirs = nf.flows.Invertible1x1Conv(c, use_lu=True)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
        theirs.P.copy_(ours.permutation)
        theirs.L.copy_(ours.lower * ours.lower_mask)
        theirs.U.copy_(torch.triu(ours.upper, 1))
        theirs.sign_S.copy_(ours.sign_s)
        theirs.log_S.copy_(ours.log_s)
    x = torch.randn(3, c, 4, 5)
    y_ours, ld_ours = ours(x)
    y_theirs, ld_theirs = theirs.inverse(x)  # normflows' data -> latent direction applies W
    torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(ld_ours, ld_theirs.expand(3), rtol=0, atol=1e-5)
    x_theirs, ld_back = theirs(y_theirs)  # W^-1
    torch.testing.assert_close(ours.inverse(y_ours), x_theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(-ld_ours, ld_back.expand(3), rtol=0, atol=1e-5)
