"""The MoE decoder of mlatlas.multimodal.decoder: padding, causality, parameter counts, the
transformers folder, generation and router balancing."""

import pytest
import torch

from mlatlas.core.config import ConfigError
from mlatlas.multimodal.decoder import (
    DecoderConfig,
    MoEDecoder,
    active_parameters,
    count_parameters,
    dense_equivalent,
    generate,
    load_pretrained,
    save_pretrained,
)
from mlatlas.nn.moe import MoE

V = 40


def tiny(**kw) -> DecoderConfig:
    shape = dict(vocab_size=V, dim=32, n_layers=2, n_heads=2, kv_lora_rank=16,
                 qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, intermediate_size=48,
                 moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
                 num_experts_per_tok=2)
    return DecoderConfig(**{**shape, **kw})


def _model(**kw) -> MoEDecoder:
    torch.manual_seed(0)
    return MoEDecoder(tiny(**kw)).eval()


def test_left_padded_row_equals_the_row_alone():
    model = _model()
    row = torch.randint(0, V, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(row)
        batch = model(torch.cat([padded, torch.randint(0, V, (1, 9))]),
                      torch.cat([mask, torch.ones(1, 9, dtype=torch.long)]))
    torch.testing.assert_close(batch[0, 3:], alone[0], atol=1e-5, rtol=1e-5)


def test_inputs_embeds_equal_tokens_and_exactly_one_is_given():
    model = _model()
    tokens = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=model.embed(tokens)), model(tokens))
    with pytest.raises(ValueError):
        model()
    with pytest.raises(ValueError):
        model(tokens, inputs_embeds=model.embed(tokens))


def test_causal():
    model = _model()
    tokens = torch.randint(0, V, (1, 8))
    changed = tokens.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % V
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-4


def test_dense_equivalent_has_the_same_active_parameters_and_no_routers():
    moe = _model()
    dense = MoEDecoder(dense_equivalent(moe.cfg))
    assert not dense.moe_layers() and not any(isinstance(m, MoE) for m in dense.modules())
    assert dense.router_stats() == {}
    routers = sum(m.gate.weight.numel() for _, m in moe.moe_layers())
    assert active_parameters(moe) == active_parameters(dense) + routers
    assert active_parameters(dense) == count_parameters(dense)
    # One MoE layer of E = 4 experts, k = 2 used: half the routed experts are inactive.
    per_expert = 3 * 32 * 16
    assert count_parameters(moe) - active_parameters(moe) == 2 * per_expert


def test_save_load_round_trip(tmp_path):
    model = _model()
    with torch.no_grad():
        model.moe_layers()[0][1].gate.e_score_correction_bias.copy_(torch.arange(4.0) / 10)
    save_pretrained(model, tmp_path, bos_id=1, eos_id=2, pad_id=0)
    again = load_pretrained(tmp_path)
    assert again.cfg.vocab_size == V and again.cfg.n_routed_experts == 4
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_export_refuses_what_deepseek_v3_cannot_express(tmp_path):
    with pytest.raises(ConfigError, match="sigmoid"):
        tiny(scoring="softmax").to_hf(1, 2, 0)
    with pytest.raises(ConfigError, match="shared"):
        tiny(n_shared_experts=0).to_hf(1, 2, 0)
    hf = tiny().to_hf(1, 2, 0)
    with pytest.raises(ConfigError, match="rope_interleave"):
        DecoderConfig.from_hf({k: v for k, v in hf.items() if k != "rope_interleave"})
    with pytest.raises(ConfigError, match="rope_type"):
        DecoderConfig.from_hf({**hf, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    assert DecoderConfig.from_hf(hf) == tiny()


def test_generate_greedy_is_deterministic_and_stops_at_eos():
    model = _model()
    prompt = model.embed(torch.randint(0, V, (2, 4)))
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    ids, out_mask = generate(model, prompt, mask, max_new_tokens=5, eos_id=2, pad_id=0)
    ids2, _ = generate(model, prompt, mask, max_new_tokens=5, eos_id=2, pad_id=0)
    assert torch.equal(ids, ids2) and ids.shape == out_mask.shape == (2, 5)
    # Make the first greedy token of every row the EOS: the rows stop after one token.
    with torch.no_grad():
        h = model.hidden(inputs_embeds=prompt, attention_mask=mask)[:, -1]
        model.lm_head.weight[2] += 100 * h.mean(0)
    first = model(inputs_embeds=prompt, attention_mask=mask)[:, -1].argmax(-1)
    ids, out_mask = generate(model, prompt, mask, max_new_tokens=5, eos_id=2, pad_id=0)
    assert first.tolist() == [2, 2]
    assert ids.tolist() == [[2], [2]] and out_mask.tolist() == [[1], [1]]


def test_generate_pads_after_eos_of_one_row():
    model = _model()
    prompt = model.embed(torch.randint(0, V, (2, 3)))
    mask = torch.ones(2, 3, dtype=torch.long)
    free, _ = generate(model, prompt, mask, max_new_tokens=4, eos_id=V + 1, pad_id=0)
    eos = int(free[0, 1])  # row 0's second token, treated as EOS
    ids, out_mask = generate(model, prompt, mask, max_new_tokens=4, eos_id=eos, pad_id=0)
    stop = int((free[0] == eos).nonzero()[0])
    assert ids[0, :stop + 1].tolist() == free[0, :stop + 1].tolist()
    assert (ids[0, stop + 1:] == 0).all() and out_mask[0].tolist() == [1] * (stop + 1) + [0] * (
        ids.shape[1] - stop - 1)


def test_bias_updates_move_the_load_toward_uniform():
    torch.manual_seed(0)
    model = MoEDecoder(tiny(bias_update_speed=0.01)).eval()
    moe = model.moe_layers()[0][1]
    tokens = torch.randint(0, V, (4, 16))
    seen = []
    hook = moe.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        model(tokens)
        hook.remove()
        # A router whose expert 0 points along the mean input: most tokens pick it.
        u = seen[0].reshape(-1, 32)
        moe.gate.weight[0] = 4 * u.mean(0) / u.mean(0).norm()
        model(tokens)
        before = model.router_stats()["capacity"]
        for _ in range(40):
            model.update_router_bias()
            model(tokens)
    after = model.router_stats()["capacity"]
    assert before > 1.5 and after < before - 0.3, (before, after)
    assert moe.gate.e_score_correction_bias[0] < 0 and model.aux_loss().item() == 0.0


def test_aux_loss_is_the_layers_sum_with_gradient():
    model = _model(balance="aux", aux_loss_alpha=0.1).train()
    model(torch.randint(0, V, (2, 6)))
    loss = model.aux_loss()
    assert loss.item() == pytest.approx(sum(m.last_aux_loss.item() for _, m in model.moe_layers()))
    loss.backward()
    assert model.moe_layers()[0][1].gate.weight.grad.abs().sum() > 0


def test_generate_sampling_follows_the_generator():
    model = _model()
    prompt = model.embed(torch.randint(0, V, (3, 4)))
    mask = torch.ones(3, 4, dtype=torch.long)

    def draw(seed):
        return generate(model, prompt, mask, max_new_tokens=6, eos_id=V + 1, pad_id=0,
                        temperature=1.0, generator=torch.Generator().manual_seed(seed))[0]

    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))
