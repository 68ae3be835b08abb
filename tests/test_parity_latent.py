"""Peer parity: latent diffusion's cross-attention and ControlNet's residual injection against
diffusers (Attention, UNet2DConditionModel, ControlNetModel), and the control guidance window
against the rule of diffusers' ControlNet pipeline."""

import math

import pytest
import torch

from mlatlas.generative.diffusion.controlnet import ControlNet, control_keep
from mlatlas.nn.unet import CrossAttention, Residuals, UNet

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention as PeerAttention  # noqa: E402

C, D, HEADS = 32, 16, 4  # feature width, context width, heads


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter drawn at random, so that no zero (an output projection, a zero
    convolution) hides a broken path."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def copy_linear(dst: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    with torch.no_grad():
        dst.weight.copy_(weight)
        dst.bias.copy_(bias)


# --- 1. cross-attention ------------------------------------------------------------------------

def test_attention_over_a_context_matches():
    """mlatlas Attention(C, h) of queries (B, T, C) over a context (B, S, C) against diffusers'
    Attention(query_dim=C, cross_attention_dim=C, heads=h, dim_head=C // h, bias=True): the same
    maths once diffusers' to_q/to_k/to_v are given biases (bias=True; their default is none;
    to_out[0] has one by default, out_bias=True), with its default processor (scaled dot product
    attention at scale 1/sqrt(dim_head)), no norm, no residual and rescale_output_factor 1."""
    torch.manual_seed(0)
    ours = CrossAttention(C, D, HEADS).attn
    randomise(ours, 1)
    peer = PeerAttention(query_dim=C, cross_attention_dim=C, heads=HEADS, dim_head=C // HEADS,
                         bias=True, out_bias=True)
    for name, theirs in (("q_proj", peer.to_q), ("k_proj", peer.to_k), ("v_proj", peer.to_v),
                         ("o_proj", peer.to_out[0])):
        mine = getattr(ours, name)
        copy_linear(theirs, mine.weight, mine.bias)
    x, context = torch.randn(3, 10, C), torch.randn(3, 5, C)
    with torch.no_grad():
        expected = peer(x, encoder_hidden_states=context)
        assert torch.allclose(ours(x, context), expected, atol=1e-5, rtol=0)
        # And it is attention over the context, not self-attention: another context moves it.
        assert not torch.allclose(ours(x, torch.randn(3, 5, C)), expected, atol=1e-3)


def test_cross_attention_block_matches():
    """The whole CrossAttention block (GroupNorm, queries, context_proj then k/v, o_proj,
    residual) on a (B, C, H, W) map against diffusers' Attention with norm_num_groups (its
    GroupNorm on the queries' channels, eps 1e-5 as ours), residual_connection=True and
    cross_attention_dim=D. Our context_proj (W_p, b_p) followed by k_proj (W_k, b_k) is one affine
    map, W_k W_p c + (W_k b_p + b_k): that composition is diffusers' to_k (likewise to_v)."""
    torch.manual_seed(0)
    ours = CrossAttention(C, D, HEADS)
    randomise(ours, 2)
    groups = ours.norm.num_groups
    peer = PeerAttention(query_dim=C, cross_attention_dim=D, heads=HEADS, dim_head=C // HEADS,
                         bias=True, out_bias=True, norm_num_groups=groups,
                         residual_connection=True)
    with torch.no_grad():
        peer.group_norm.weight.copy_(ours.norm.weight)
        peer.group_norm.bias.copy_(ours.norm.bias)
        attn, proj = ours.attn, ours.context_proj
        copy_linear(peer.to_q, attn.q_proj.weight, attn.q_proj.bias)
        for mine, theirs in ((attn.k_proj, peer.to_k), (attn.v_proj, peer.to_v)):
            copy_linear(theirs, mine.weight @ proj.weight, mine.weight @ proj.bias + mine.bias)
        copy_linear(peer.to_out[0], attn.o_proj.weight, attn.o_proj.bias)
        x, context = torch.randn(2, C, 4, 4), torch.randn(2, 7, D)
        assert torch.allclose(ours(x, context), peer(x, encoder_hidden_states=context),
                              atol=1e-5, rtol=0)


# --- 2. one context token ----------------------------------------------------------------------

def test_one_context_token_closed_form():
    """With S = 1 the softmax over a single key is 1, so every position receives the same
    value: CrossAttention(x, c) = x + o_proj(v_proj(context_proj(c))) at every position."""
    torch.manual_seed(0)
    block = CrossAttention(C, D, HEADS)
    randomise(block, 3)
    x, context = torch.randn(2, C, 4, 4), torch.randn(2, 1, D)
    with torch.no_grad():
        added = block(x, context) - x
        attn = block.attn
        closed = attn.o_proj(attn.v_proj(block.context_proj(context[:, 0])))  # (B, C)
    assert torch.allclose(added, closed[:, :, None, None].expand_as(added), atol=1e-5)
    assert closed.abs().max() > 1e-2  # not a vacuous match of zeros


# --- 3. residual semantics ---------------------------------------------------------------------

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=D,
                 layers_per_block=1, norm_num_groups=8, attention_head_dim=8)


def tiny_peer_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**TINY_UNET).eval()


def tiny_unet() -> UNet:
    torch.manual_seed(0)
    unet = UNet(4, base=16, channel_mults=(1, 2), attention=False, context_dim=D).eval()
    randomise(unet, 4)  # zero-initialised output projections would hide the residual path
    return unet


def peer_inputs(batch: int = 2):
    gen = torch.Generator().manual_seed(5)
    return (torch.randn(batch, 4, 8, 8, generator=gen), torch.tensor([10, 700])[:batch],
            torch.randn(batch, 3, D, generator=gen))


def peer_residual_shapes(unet) -> tuple[list[torch.Size], torch.Size]:
    """The shapes of the UNet's down-path features (the skips) and of its middle block's output,
    as ControlNetModel.from_unet returns them."""
    controlnet = diffusers.ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(16, 32)).eval()
    x, t, ctx = peer_inputs()
    with torch.no_grad():
        down, mid = controlnet(x, t, ctx, torch.zeros(len(x), 3, 16, 16), return_dict=False)
    return [d.shape for d in down], mid.shape


def test_zero_residuals_are_the_identity_in_diffusers():
    """diffusers: all-zero down_block_additional_residuals and mid_block_additional_residual give
    the plain call bit for bit; residuals times s = 0 likewise; random ones change the output
    (so the residuals do reach it)."""
    unet = tiny_peer_unet()
    x, t, ctx = peer_inputs()
    down_shapes, mid_shape = peer_residual_shapes(unet)
    gen = torch.Generator().manual_seed(6)
    down = [torch.randn(s, generator=gen) for s in down_shapes]
    mid = torch.randn(mid_shape, generator=gen)

    def call(down=None, mid=None):
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample

    base = call()
    assert torch.equal(call([torch.zeros_like(d) for d in down], torch.zeros_like(mid)), base)
    assert torch.equal(call([d * 0.0 for d in down], mid * 0.0), base)
    assert (call(down, mid) - base).abs().max() > 1e-3


def test_zero_residuals_are_the_identity_in_ours():
    """mlatlas: UNet.decode with Residuals of zeros equals the plain forward bit for bit, so does
    Residuals.scaled(0) of random ones, and the random ones themselves change the output."""
    unet = tiny_unet()
    gen = torch.Generator().manual_seed(7)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10.0, 700.0])
    ctx = torch.randn(2, 3, D, generator=gen)
    with torch.no_grad():
        base = unet(x, t, context=ctx)
        emb = unet.embed(t, None, len(x), x.device)
        h, skips = unet.encode(x, emb, ctx)
        residuals = Residuals([torch.randn(s.shape, generator=gen) for s in skips],
                              torch.randn(h.shape, generator=gen))
        zeros = Residuals([torch.zeros_like(s) for s in skips], torch.zeros_like(h))
        assert torch.equal(unet.decode(h, skips, emb, ctx), base)
        assert torch.equal(unet.decode(h, skips, emb, ctx, zeros), base)
        assert torch.equal(unet(x, t, context=ctx, residuals=zeros), base)
        assert torch.equal(unet(x, t, context=ctx, residuals=residuals.scaled(0.0)), base)
        assert (unet(x, t, context=ctx, residuals=residuals) - base).abs().max() > 1e-3


# --- 4. ControlNet's zero convolutions and scale ------------------------------------------------

def test_peer_controlnet_zero_convolutions_and_scale():
    """diffusers: ControlNetModel.from_unet returns all-zero residuals at initialisation for a
    random control image; with its zero convolutions set to random weights, conditioning_scale
    multiplies every residual, residuals(scale=0.5) = 0.5 residuals(scale=1)."""
    unet = tiny_peer_unet()
    controlnet = diffusers.ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(16, 32)).eval()
    x, t, ctx = peer_inputs()
    control = torch.rand(len(x), 3, 16, 16, generator=torch.Generator().manual_seed(8))

    def residuals(scale: float):
        with torch.no_grad():
            down, mid = controlnet(x, t, ctx, control, conditioning_scale=scale,
                                   return_dict=False)
        return [*down, mid]

    initial = residuals(1.0)
    assert len(initial) == 5 and all(torch.equal(r, torch.zeros_like(r)) for r in initial)
    for seed, zero in enumerate([*controlnet.controlnet_down_blocks,
                                 controlnet.controlnet_mid_block,
                                 controlnet.controlnet_cond_embedding.conv_out]):
        randomise(zero, 10 + seed)
    full, half = residuals(1.0), residuals(0.5)
    assert all(f.abs().max() > 1e-3 for f in full)
    for f, h in zip(full, half, strict=True):
        assert torch.allclose(h, 0.5 * f, atol=1e-6, rtol=1e-6)


def test_our_controlnet_zero_convolutions_and_scale():
    """mlatlas: ControlNet at initialisation returns all-zero Residuals, so the controlled UNet
    is the base exactly; with random zero convolutions Residuals.scaled(0.5) halves each one."""
    unet = tiny_unet()
    net = ControlNet(unet, control_channels=1, factor=2).eval()
    gen = torch.Generator().manual_seed(9)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10.0, 700.0])
    ctx, control = torch.randn(2, 3, D, generator=gen), torch.rand(2, 1, 16, 16, generator=gen)
    with torch.no_grad():
        initial = net(x, t, ctx, control)
        tensors = [*initial.skips, initial.middle]
        assert len(tensors) == unet.levels + 1
        assert all(torch.equal(r, torch.zeros_like(r)) for r in tensors)
        assert torch.equal(unet(x, t, context=ctx, residuals=initial), unet(x, t, context=ctx))
        for seed, zero in enumerate([*net.zero_skips, net.zero_middle, net.hint.net[-1]]):
            randomise(zero, 20 + seed)
        full = net(x, t, ctx, control)
        half = full.scaled(0.5)
    assert all(r.abs().max() > 1e-3 for r in [*full.skips, full.middle])
    for f, h in zip([*full.skips, full.middle], [*half.skips, half.middle], strict=True):
        assert torch.equal(h, 0.5 * f)


# --- 5. the control guidance window ------------------------------------------------------------

@pytest.mark.parametrize(("steps", "start", "end", "expected"), [
    (6, 0.0, 1.0, [1, 1, 1, 1, 1, 1]),
    (10, 0.2, 0.8, [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]),  # the edges i/N = start, (i+1)/N = end kept
    (5, 0.3, 0.7, [0, 0, 1, 0, 0]),
    (4, 0.3, 0.6, [0, 0, 0, 0]),  # a window narrower than a step keeps none
])
def test_control_window(steps, start, end, expected):
    """control_keep(N, start, end) against hand-worked values of diffusers' rule in
    diffusers/pipelines/controlnet/pipeline_controlnet.py (0.42), lines 1231-1237 of
    StableDiffusionControlNetPipeline.__call__: controlnet_keep[i] = 1.0 - float(i / N < start
    or (i + 1) / N > end), N = len(timesteps), applied as cond_scale = scale * keep[i]."""
    keep = control_keep(steps, start, end)
    assert keep.shape == (steps,)
    assert keep.tolist() == [float(k) for k in expected]
    assert math.isclose(float(keep.sum()), sum(expected))
