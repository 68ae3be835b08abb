"""The tiny Llama-layout LM: transformers parity, export/import both ways, KV cache, padding,
sampling, tokenizers."""

import pytest
import torch

from mlatlas.core.config import ConfigError
from mlatlas.llm.common import (
    completion_logprobs,
    encode_completions,
    encode_prompts,
    token_logprobs,
)
from mlatlas.llm.model import (
    LMConfig,
    TinyLM,
    generate,
    load_pretrained,
    save_pretrained,
)
from mlatlas.nn.sampling import sample_token
from mlatlas.nn.tokenizers import Tokenizer

TEXTS = ["12+34=46", "7+8=15", "3 5 7>22:3*5+7", "9-4=5"]


def tiny(vocab=24, **kw) -> TinyLM:
    return TinyLM(LMConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                           hidden_dim=64, max_seq_len=64, **kw)).eval()


def padded_batch(vocab=24):
    torch.manual_seed(1)
    ids = torch.randint(4, vocab, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_logits_match_transformers_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny()
    save_pretrained(model, tmp_path, bos_id=1, eos_id=2, pad_id=0)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = padded_batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert (ours - theirs)[real].abs().max() < 1e-5


def test_import_from_transformers_and_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=24, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=500.0)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf").eval()
    assert ours.cfg.rope_theta == 500.0 and ours.cfg.n_kv_heads == 2
    ids = torch.randint(0, 24, (2, 9))
    with torch.no_grad():
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max() < 1e-5
    save_pretrained(ours, tmp_path / "back", bos_id=1, eos_id=2, pad_id=0)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back")
    for name, tensor in hf.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_round_trip_without_transformers(tmp_path):
    model = tiny()
    save_pretrained(model, tmp_path, bos_id=1, eos_id=2, pad_id=0)
    back = load_pretrained(tmp_path)
    assert back.cfg == model.cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor)


def test_a_padded_row_computes_what_the_row_alone_does():
    model = tiny()
    ids, mask = padded_batch()
    with torch.no_grad():
        batched = model(ids, mask)
        for i in range(len(ids)):
            alone = model(ids[i][mask[i].bool()][None])[0]
            assert torch.allclose(batched[i][mask[i].bool()], alone, atol=1e-5)


def test_completion_logprobs_in_a_batch_equal_one_by_one():
    tokenizer = Tokenizer.characters(TEXTS)
    model = tiny(tokenizer.vocab_size)
    prompts, completions = ["12+34=", "7+8=", "3 5 7>22:"], ["46", "15", "3*5+7"]
    p_ids, p_mask = encode_prompts(tokenizer, prompts)
    c_ids, c_mask = encode_completions(tokenizer, completions)
    with torch.no_grad():
        batched = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask)
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            x = tokenizer.encode(prompt, bos=True)
            y = tokenizer.encode(completion) + [tokenizer.eos_id]
            logits = model(torch.tensor([x + y]))[0]
            # One token at a time: log softmax of the position before each completion token.
            alone = torch.stack([torch.log_softmax(logits[len(x) + t - 1], -1)[y[t]]
                                 for t in range(len(y))])
            assert torch.allclose(batched[i, :len(y)], alone, atol=1e-5)
            assert (batched[i, len(y):] == 0).all()


def test_token_logprobs_gathers_the_target():
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    out = token_logprobs(logits, torch.tensor([[1, 0]]))
    expected = torch.tensor([[-torch.log(torch.tensor(2.0)),
                              2.0 - torch.logsumexp(torch.tensor([2.0, 0.0]), 0)]])
    assert torch.allclose(out, expected)


def test_greedy_generation_with_the_cache_equals_full_forward_argmax():
    model = tiny()
    ids, mask = padded_batch()
    out, out_mask = generate(model, ids, mask, max_new_tokens=6, eos_id=2, pad_id=0,
                             temperature=0.0)
    with torch.no_grad():
        logits = model(torch.cat([ids, out], 1), torch.cat([mask, out_mask], 1))
    predicted = logits[:, ids.shape[1] - 1:-1].argmax(-1)
    assert torch.equal(predicted[out_mask.bool()], out[out_mask.bool()])


def test_generation_stops_rows_at_eos_and_pads_after():
    model = tiny()

    class Scripted(torch.nn.Module):
        """Greedy picks token 5, except eos for row 0 at step 1 and row 1 at step 3."""

        weight = model.lm_head.weight
        calls = 0

        def forward(self, h):
            logits = torch.zeros(h.shape[0], 24)
            logits[:, 5] = 1.0
            step = Scripted.calls
            Scripted.calls += 1
            for row, at in ((0, 0), (1, 2)):
                if step == at:
                    logits[row, 2] = 2.0
            return logits

    model.lm_head = Scripted()
    ids, mask = padded_batch()
    out, out_mask = generate(model, ids, mask, max_new_tokens=4, eos_id=2, pad_id=0,
                             temperature=0.0)
    assert out.tolist() == [[2, 0, 0, 0], [5, 5, 2, 0], [5, 5, 5, 5]]
    assert out_mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_token(logits, 1.0, 0.7, g) for _ in range(2000)])
    assert set(draws.tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert abs((draws == 0).float().mean() - 0.5 / 0.8) < 0.05
    assert (sample_token(logits.repeat(4, 1), 0.0, 1.0, None) == 0).all()


def test_sampling_is_reproducible_with_a_generator():
    model = tiny()
    ids, mask = padded_batch()
    a = generate(model, ids, mask, max_new_tokens=5, eos_id=2, pad_id=0,
                 generator=torch.Generator().manual_seed(3))
    b = generate(model, ids, mask, max_new_tokens=5, eos_id=2, pad_id=0,
                 generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0])


def test_bad_inputs_are_clear():
    with pytest.raises(ConfigError, match="n_heads"):
        LMConfig(vocab_size=10, dim=30, n_heads=4)
    model = tiny()
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[99]]))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ConfigError, match="Llama"):
        LMConfig.from_hf({"model_type": "gpt2"})


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_tokenizers_round_trip_and_load_in_transformers(tmp_path, kind):
    tokenizer = (Tokenizer.characters(TEXTS) if kind == "char"
                 else Tokenizer.bpe(TEXTS * 20, vocab_size=40))
    for text in TEXTS:
        ids = tokenizer.encode(text, bos=True)
        assert ids[0] == tokenizer.bos_id
        assert tokenizer.decode(ids + [tokenizer.eos_id]) == text
    tokenizer.save(tmp_path / "tokenizer.json")
    assert Tokenizer.load(tmp_path / "tokenizer.json").encode("7+8=15") == \
        tokenizer.encode("7+8=15")
    if kind == "bpe":
        assert len(tokenizer.encode("12+34=46")) < len("12+34=46")  # merges were learnt
    transformers = pytest.importorskip("transformers")
    tokenizer.save_pretrained(tmp_path, max_length=64)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf("12+34=46").input_ids == tokenizer.encode("12+34=46", bos=True)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)


def test_a_tokenizer_file_without_our_special_tokens_is_refused(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    Backend(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(
        str(tmp_path / "t.json"))
    with pytest.raises(ConfigError, match="special tokens"):
        Tokenizer.load(tmp_path / "t.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="cannot read tokenizer"):
        Tokenizer.load(tmp_path / "bad.json")
