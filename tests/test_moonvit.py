"""MoonViT: packing is exact (an image alone == packed with others), the packed attention against
per-image scaled_dot_product_attention (peer), 2D RoPE depends on relative offsets only and is 1D
RoPE along rows when columns are 0, pixel shuffle is a permutation with a hand-checked order,
pack's errors, the block-diagonal mask by hand, gradients."""

import pytest
import torch
import torch.nn.functional as F

from mlatlas.core.config import ConfigError
from mlatlas.multimodal.vision import (
    EncoderConfig,
    MoonViT,
    VisionTower,
    block_diagonal_mask,
    budget_groups,
    pack,
    pixel_shuffle,
    pixel_unshuffle,
    rotary_2d,
    split,
)
from mlatlas.nn.attention import rotary_cos_sin, rotate

TINY = EncoderConfig(width=32, depth=2, heads=2, hidden_dim=64, max_patches=256)


def images(*sizes, seed=0, channels=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(channels, H, W, generator=g) for H, W in sizes]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return MoonViT(TINY).eval()


def test_an_image_alone_equals_the_image_packed_with_two_others(encoder):
    others = images((32, 64), (48, 32), seed=1)
    x = images((40, 24), seed=2)[0]
    with torch.no_grad():
        alone = encoder(pack([x], 4, 256))
        packed = pack([others[0], x, others[1]], 4, 512)
        together = split(encoder(packed), packed.cu_seqlens)
        unmasked = split(encoder.encode(packed.patches[None], packed.positions[None], None)[0],
                         packed.cu_seqlens)
    assert together[1].shape == alone.shape == (10 * 6, 32)
    torch.testing.assert_close(together[1], alone, atol=1e-5, rtol=0)
    # Without the block-diagonal mask the others leak in: the mask is what makes it exact.
    assert not torch.allclose(unmasked[1], alone, atol=1e-2)


def test_peer_packed_attention_equals_per_image_scaled_dot_product_attention(encoder):
    attn = encoder.blocks[0].attn
    packed = pack(images((16, 24), (32, 16), (8, 8), seed=3), 4, 256)
    N, d = packed.patches.shape[0], TINY.width // TINY.heads
    x = torch.randn(1, N, TINY.width, generator=torch.Generator().manual_seed(4))
    cos, sin = rotary_2d(packed.positions, d, TINY.rope_theta)
    with torch.no_grad():
        ours = attn(x, mask=block_diagonal_mask(packed.cu_seqlens), rotary=(cos, sin))[0]
        q = attn.q_proj(x).view(1, N, TINY.heads, d).transpose(1, 2)
        k = attn.k_proj(x).view(1, N, TINY.heads, d).transpose(1, 2)
        v = attn.v_proj(x).view(1, N, TINY.heads, d).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        bounds = packed.cu_seqlens.tolist()
        per_image = [F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b])
                     for a, b in zip(bounds, bounds[1:], strict=False)]
        out = torch.cat(per_image, dim=2).transpose(1, 2).reshape(N, -1)
        peer = attn.o_proj(out)
    torch.testing.assert_close(ours, peer, atol=1e-5, rtol=0)


def score(q, k, qpos, kpos, head_dim=16, theta=100.0):
    cos, sin = rotary_2d(torch.tensor([qpos, kpos]), head_dim, theta)
    qr = rotate(q.view(1, 1, 1, -1), cos[:, :, :1], sin[:, :, :1])
    kr = rotate(k.view(1, 1, 1, -1), cos[:, :, 1:], sin[:, :, 1:])
    return (qr * kr).sum()


def test_rotary_2d_scores_depend_on_the_row_and_column_offsets_only():
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)
        (r, c, r2, c2, a, b) = torch.randint(0, 12, (6,), generator=g).tolist()
        base = score(q, k, (r, c), (r2, c2))
        torch.testing.assert_close(score(q, k, (r + a, c + b), (r2 + a, c2 + b)), base,
                                   atol=1e-4, rtol=0)
        # Moving only the query's row, or only its column, changes the score.
        assert abs(score(q, k, (r + 1, c), (r2, c2)) - base) > 1e-3
        assert abs(score(q, k, (r, c + 1), (r2, c2)) - base) > 1e-3


def test_rotary_2d_is_1d_rope_along_rows_when_columns_are_0():
    d, rows = 16, torch.arange(7)
    cos, sin = rotary_2d(torch.stack([rows, torch.zeros_like(rows)], 1), d, 100.0)
    cos1, sin1 = rotary_cos_sin(rows[None], d // 2, 100.0)  # (1, 1, 7, d/2): [angles, angles]
    quarter = d // 4
    for half in (0, 1):  # the row pairs of each half of the head are 1D RoPE's angles
        row_part = slice(half * d // 2, half * d // 2 + quarter)
        col_part = slice(half * d // 2 + quarter, (half + 1) * d // 2)
        torch.testing.assert_close(cos[..., row_part], cos1[..., :quarter])
        torch.testing.assert_close(sin[..., row_part], sin1[..., :quarter])
        assert torch.equal(cos[..., col_part], torch.ones(1, 1, 7, quarter))
        assert torch.equal(sin[..., col_part], torch.zeros(1, 1, 7, quarter))


def test_rotary_2d_needs_a_head_width_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        rotary_2d(torch.zeros(3, 2, dtype=torch.long), 6, 100.0)
    with pytest.raises(ConfigError, match="divisible by 4"):
        EncoderConfig(width=24, heads=4)


def test_pixel_shuffle_order_on_a_4x4_grid_by_hand():
    tokens = torch.arange(16.0)[:, None]  # token r * 4 + c of a 4x4 grid, width 1
    z, grid = pixel_shuffle(tokens, torch.tensor([[4, 4]]))
    assert grid.tolist() == [[2, 2]]
    assert z.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_pixel_unshuffle_inverts_pixel_shuffle_which_is_a_permutation():
    grid = torch.tensor([[4, 6], [2, 2], [8, 4]])
    N, D = int(grid.prod(1).sum()), 3
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(6))
    z, small = pixel_shuffle(x, grid)
    assert z.shape == (N // 4, 4 * D) and small.tolist() == [[2, 3], [1, 1], [4, 2]]
    back, full = pixel_unshuffle(z, small)
    assert torch.equal(back, x) and torch.equal(full, grid)
    assert torch.equal(z.flatten().sort().values, x.flatten().sort().values)
    ids, _ = pixel_shuffle(torch.arange(N)[:, None], grid)
    assert torch.equal(ids.flatten().sort().values, torch.arange(N))  # each token exactly once
    # Tokens never cross images: image 1's single shuffled token is its 4 tokens 24..27.
    assert ids[6].tolist() == [24, 25, 26, 27]


def test_pixel_shuffle_rejects_odd_grids_and_wrong_token_counts():
    with pytest.raises(ValueError, match="even grids"):
        pixel_shuffle(torch.zeros(6, 2), torch.tensor([[2, 3]]))
    with pytest.raises(ValueError, match="N = 16"):
        pixel_shuffle(torch.zeros(12, 2), torch.tensor([[4, 4]]))


def test_block_diagonal_mask_from_cu_seqlens_by_hand():
    mask = block_diagonal_mask(torch.tensor([0, 2, 3, 6]))
    expected = torch.tensor([[1, 1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [0, 0, 1, 0, 0, 0],
                             [0, 0, 0, 1, 1, 1],
                             [0, 0, 0, 1, 1, 1],
                             [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_pack_grid_positions_and_patch_layout():
    xs = images((8, 16), (16, 8), seed=7)
    packed = pack(xs, 4, 64)
    assert packed.grid.tolist() == [[2, 4], [4, 2]]
    assert packed.cu_seqlens.tolist() == [0, 8, 16]
    assert packed.positions[:8].tolist() == [[0, 0], [0, 1], [0, 2], [0, 3],
                                             [1, 0], [1, 1], [1, 2], [1, 3]]
    assert packed.positions[8:].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1],
                                             [2, 0], [2, 1], [3, 0], [3, 1]]
    # Patch (1, 2) of image 0 is pixels rows 4..7, columns 8..11, flattened (C, p, p).
    assert torch.equal(packed.patches[6], xs[0][:, 4:8, 8:12].flatten())
    # The same map as a Conv2d of kernel and stride p.
    weight = torch.randn(5, 3, 4, 4)
    conv = F.conv2d(xs[1][None], weight, stride=4)[0]  # (5, 4, 2)
    torch.testing.assert_close(packed.patches[8:] @ weight.flatten(1).T,
                               conv.flatten(1).T, atol=1e-5, rtol=0)


def test_pack_errors_name_the_image_its_size_patches_and_budget():
    with pytest.raises(ValueError, match=r"image 1 of 32x36 pixels.*multiples of 2 x patch_size"):
        pack(images((32, 32), (32, 36)), 4, 512)
    with pytest.raises(ValueError, match=r"image 0 of 64x64 pixels is 256 patches.*budget of 128"):
        pack(images((64, 64)), 4, 128)
    with pytest.raises(ValueError, match=r"3 images total 192 patches.*budget of 150.*image 2 of "
                                         r"32x32 pixels \(64 patches\).*after 128"):
        pack(images((32, 32), (32, 32), (32, 32)), 4, 150)
    with pytest.raises(ValueError, match="image 1 has 1 channels, expected 3"):
        pack([images((8, 8))[0], torch.zeros(1, 8, 8)], 4, 64, in_channels=3)
    with pytest.raises(ValueError, match=r"image 0 must be a \(channels, height, width\)"):
        pack([torch.zeros(8, 8)], 4, 64)
    with pytest.raises(ValueError, match="at least one image"):
        pack([], 4, 64)


def test_budget_groups_fill_sequences_in_order_and_every_group_packs():
    xs = images((32, 32), (32, 64), (16, 16), (64, 64), (8, 8))  # 64, 128, 16, 256, 4 patches
    groups = budget_groups(xs, 4, 256)
    assert groups == [[0, 1, 2], [3], [4]]
    for group in groups:
        assert pack([xs[j] for j in group], 4, 256).cu_seqlens[-1] <= 256
    with pytest.raises(ValueError, match="image 3 of 64x64 pixels is 256 patches"):
        budget_groups(xs, 4, 255)


def test_vision_tower_shapes_cu_seqlens_pooled_and_gradients():
    torch.manual_seed(0)
    tower = VisionTower(TINY, out_dim=24)
    xs = images((32, 32), (16, 40), seed=8)
    tokens, cu = tower(xs)
    assert tokens.shape == (16 + 10, 24) and cu.tolist() == [0, 16, 26]
    pooled = tower.pooled(xs)
    with torch.no_grad():
        h = split(tower.encoder(tower.pack(xs)), tower.pack(xs).cu_seqlens)
    torch.testing.assert_close(pooled, torch.stack([h[0].mean(0), h[1].mean(0)]))
    (tokens.square().mean() + pooled.square().mean()).backward()
    for name, p in tower.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="has 1 channels, expected 3"):
        tower([torch.zeros(1, 8, 8)])
