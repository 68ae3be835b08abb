"""The shared building blocks of mlatlas/nn: attention, tokenizers and token sampling, against
closed forms and invariants (the families' own tests check them inside the models)."""

import math

import pytest
import torch

from mlatlas.nn.attention import (
    Attention,
    KVCache,
    causal_mask,
    padding_mask,
    rotary_cos_sin,
    rotate,
)
from mlatlas.nn.layers import RMSNorm
from mlatlas.nn.sampling import sample_token
from mlatlas.nn.tokenizers import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, Tokenizer
from mlatlas.nn.vit import PatchEmbedding


def reference_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d) + M) v written out."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def split_heads(x, heads):
    B, T, _ = x.shape
    return x.view(B, T, heads, -1).transpose(1, 2)


@pytest.mark.parametrize("fused_kv", [False, True])
def test_attention_is_the_softmax_formula_with_padding(fused_kv):
    torch.manual_seed(0)
    attn = Attention(16, 4, fused_kv=fused_kv)
    x = torch.randn(2, 5, 16)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = attn(x, mask=padding_mask(keep))
    q = split_heads(attn.q_proj(x), 4)
    k, v = attn.keys_values(x)
    expected = reference_attention(q, k, v, keep[:, None, None, :])
    expected = attn.o_proj(expected.transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(out, expected, atol=1e-5)


def test_causal_attention_ignores_the_future():
    torch.manual_seed(0)
    attn = Attention(8, 2)
    x = torch.randn(1, 6, 8)
    changed = x.clone()
    changed[:, 4:] += 10.0
    a, b = attn(x, causal=True), attn(changed, causal=True)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6) and not torch.allclose(a, b)
    assert torch.equal(causal_mask(2, 4), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool())


def test_cross_attention_reads_the_context_only():
    torch.manual_seed(0)
    attn = Attention(8, 2, fused_kv=True)
    x, context = torch.randn(2, 3, 8), torch.randn(2, 7, 8)
    out = attn(x, context)
    assert out.shape == (2, 3, 8)
    # Queries do not see each other: each row is a function of its own query and the context.
    assert torch.allclose(attn(x[:, :1], context), out[:, :1], atol=1e-6)


def test_grouped_query_attention_equals_repeated_key_value_heads():
    torch.manual_seed(0)
    gqa = Attention(16, 4, kv_heads=2, bias=False)
    full = Attention(16, 4, bias=False)
    with torch.no_grad():
        full.q_proj.weight.copy_(gqa.q_proj.weight)
        full.o_proj.weight.copy_(gqa.o_proj.weight)
        # kv head g serves query heads 2g and 2g + 1: repeat its rows.
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(2, 4, 16)
            getattr(full, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(16, 16))
    x = torch.randn(3, 5, 16)
    assert torch.allclose(gqa(x, causal=True), full(x, causal=True), atol=1e-6)


def test_rotary_scores_depend_on_relative_position_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m, n):
        cos_m, sin_m = rotary_cos_sin(torch.tensor([[m]]), 8, 10000.0)
        cos_n, sin_n = rotary_cos_sin(torch.tensor([[n]]), 8, 10000.0)
        return (rotate(q, cos_m, sin_m) * rotate(k, cos_n, sin_n)).sum().item()

    assert score(3, 1) == pytest.approx(score(12, 10), abs=1e-5)
    assert score(0, 0) == pytest.approx((q * k).sum().item(), abs=1e-6)
    # A rotation keeps the norm.
    cos, sin = rotary_cos_sin(torch.tensor([[5]]), 8, 10000.0)
    assert rotate(q, cos, sin).norm().item() == pytest.approx(q.norm().item(), abs=1e-5)


def test_kv_cache_decoding_equals_the_full_causal_pass():
    torch.manual_seed(0)
    attn = Attention(8, 2, kv_heads=1)
    x = torch.randn(2, 6, 8)
    positions = torch.arange(6).expand(2, 6)
    full = attn(x, causal=True, rotary=rotary_cos_sin(positions, 4, 100.0))
    cache = KVCache(1, 2, 1, 4, capacity=6)
    steps = [attn(x[:, :3], causal=True, rotary=rotary_cos_sin(positions[:, :3], 4, 100.0),
                  cache=cache)]
    cache.length += 3
    for t in range(3, 6):
        steps.append(attn(x[:, t:t + 1], rotary=rotary_cos_sin(positions[:, t:t + 1], 4, 100.0),
                          cache=cache))
        cache.length += 1
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    with pytest.raises(ValueError, match="cannot hold"):
        attn(x[:, :1], cache=cache)


def test_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        Attention(10, 4)
    with pytest.raises(ValueError, match="groups"):
        Attention(16, 4, kv_heads=3)
    with pytest.raises(ValueError, match="batch, tokens, width"):
        Attention(8, 2)(torch.randn(5, 8))


def test_rms_norm_gives_unit_root_mean_square():
    x = torch.randn(4, 32) * 7 + 3
    y = RMSNorm(32, eps=0.0)(x)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(4), atol=1e-5)


# --- tokenizers ----------------------------------------------------------------------------

TEXTS = ["12+34=46", "7+8=15", "a red circle", "two small blue squares"]


@pytest.mark.parametrize("make", [
    lambda: Tokenizer.characters(TEXTS),
    lambda: Tokenizer.bpe(TEXTS, 40),
    lambda: Tokenizer.bpe(TEXTS, 60, words=True, extra_special=("<enc>",)),
])
def test_every_tokenizer_has_the_same_special_ids_and_round_trips(make, tmp_path):
    tok = make()
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.backend.token_to_id(token) == i
    assert (PAD, BOS, EOS, UNK) == (0, 1, 2, 3)
    ids = tok.encode("7+8=15", bos=True)
    assert ids[0] == BOS and BOS not in ids[1:]
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.encode_batch(TEXTS) == tok.encode_batch(TEXTS)


def test_padded_rows_hold_bos_text_eos_then_padding():
    tok = Tokenizer.bpe(TEXTS * 5, 60, words=True, extra_special=("<enc>",))
    assert tok.token_id("<enc>") == len(SPECIAL_TOKENS)
    ids, mask = tok.pad_batch(["a red circle", "two small blue squares"], 10)
    assert ids.shape == (2, 10) and (ids[:, 0] == BOS).all()
    assert ((ids == EOS).sum(1) == 1).all() and (ids[~mask] == PAD).all()
    assert tok.decode_padded(ids) == ["a red circle", "two small blue squares"]
    short, _ = tok.pad_batch(["two small blue squares"], 4)
    assert short[0, -1] == EOS


# --- token sampling ------------------------------------------------------------------------

def test_temperature_zero_is_greedy_and_top_k_one_is_greedy():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 0.0]])
    assert sample_token(logits, 0.0).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_token(logits, 1.0, top_k=1, generator=g) for _ in range(50)])
    assert (draws == torch.tensor([1, 0])).all()


def test_top_k_and_top_p_sample_the_renormalised_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    n = 20000
    top_k = torch.cat([sample_token(logits.expand(n, 4), 1.0, top_k=2, generator=g)])
    assert set(top_k.tolist()) == {0, 1}
    assert (top_k == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.015)
    # top-p 0.7: 0.5 stays (nothing before it), 0.3 stays (0.5 < 0.7), 0.15 goes (0.8 >= 0.7).
    top_p = sample_token(logits.expand(n, 4), 1.0, 0.7, generator=g)
    assert set(top_p.tolist()) == {0, 1}
    assert (top_p == 1).float().mean().item() == pytest.approx(0.3 / 0.8, abs=0.015)
    # Temperature 2 flattens: p ~ p^(1/2).
    flat = sample_token(logits.expand(n, 4), 2.0, generator=g)
    expected = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    expected = expected / expected.sum()
    observed = torch.bincount(flat, minlength=4).float() / n
    assert torch.allclose(observed, expected, atol=0.015)


def test_sampling_rejects_bad_arguments():
    with pytest.raises(ValueError, match="top_p"):
        sample_token(torch.zeros(1, 3), 1.0, 0.0)
    with pytest.raises(ValueError, match="batch, vocab"):
        sample_token(torch.zeros(3), 1.0)


def test_patch_embedding_is_cls_then_the_projected_patches_plus_positions():
    torch.manual_seed(0)
    embed = PatchEmbedding(in_channels=2, width=6, patch_size=2, image_size=4)
    images = torch.randn(3, 2, 4, 4)
    tokens = embed(images)
    assert tokens.shape == (3, 1 + 4, 6)
    # Patch (row 0, col 1) is pixels [0:2, 2:4], flattened as the convolution reads them.
    patch = images[:, :, 0:2, 2:4].reshape(3, -1)
    expected = patch @ embed.proj.weight.reshape(6, -1).T + embed.proj.bias
    assert torch.allclose(tokens[:, 2], expected + embed.position[0, 2], atol=1e-5)
    assert torch.allclose(tokens[:, 0], (embed.cls[0, 0] + embed.position[0, 0]).expand(3, 6))
    with pytest.raises(ValueError, match="built for 4x4"):
        embed(torch.randn(1, 2, 6, 6))
    with pytest.raises(ValueError, match="divisible"):
        PatchEmbedding(2, 6, patch_size=3, image_size=4)
