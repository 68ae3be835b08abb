"""Peers: the MoE layer against transformers' DeepseekV3MoE, the exported decoder against
DeepseekV3ForCausalLM, with the same weights (max abs difference below 1e-5)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402

from mlatlas.multimodal.decoder import (  # noqa: E402
    DecoderConfig,
    MoEDecoder,
    load_pretrained,
    save_pretrained,
)
from mlatlas.nn.moe import MoE  # noqa: E402


@pytest.mark.parametrize("routing", [
    {},                                                          # sigmoid, selection bias
    {"n_group": 4, "topk_group": 2},                             # group-limited
    {"norm_topk_prob": False},
    {"routed_scaling_factor": 2.5, "n_group": 2, "topk_group": 1},
])
def test_moe_layer_equals_transformers(routing):
    torch.manual_seed(0)
    D, I, E, k, shared = 16, 12, 8, 2, 2
    ours = MoE(D, I, E, shared, k, **routing)
    with torch.no_grad():
        # Routers this wide make the scores differ enough that the selection is not a near tie.
        ours.gate.weight.normal_(0, 1.0)
        ours.gate.e_score_correction_bias.copy_(torch.randn(E) * 0.1)
    hf_cfg = DeepseekV3Config(hidden_size=D, moe_intermediate_size=I, n_routed_experts=E,
                              n_shared_experts=shared, num_experts_per_tok=k,
                              n_group=routing.get("n_group", 1),
                              topk_group=routing.get("topk_group", 1),
                              norm_topk_prob=routing.get("norm_topk_prob", True),
                              routed_scaling_factor=routing.get("routed_scaling_factor", 1.0))
    peer = DeepseekV3MoE(hf_cfg).eval()
    assert set(peer.state_dict()) == set(ours.state_dict())
    peer.load_state_dict(ours.state_dict())
    x = torch.randn(3, 7, D)
    with torch.no_grad():
        diff = (ours(x) - peer(x)).abs().max().item()
    assert diff < 1e-5


def _trained_like(model: MoEDecoder) -> MoEDecoder:
    # Larger weights than the 0.02 init, and nonzero biases and norm gains, so that every
    # part of the computation shows in the logits.
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "gate.weight" in name:
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.15)
        for _, moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("shape", [
    {},
    {"q_lora_rank": 24, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5,
     "first_k_dense_replace": 2, "n_layers": 3},
    {"dense": True},  # the dense equivalent: every layer a DeepseekV3MLP
])
def test_exported_decoder_logits_equal_transformers(tmp_path, shape):
    cfg = DecoderConfig(vocab_size=61, **shape)
    ours = _trained_like(MoEDecoder(cfg)).eval()
    save_pretrained(ours, tmp_path, bos_id=1, eos_id=2, pad_id=0)
    peer = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(3, 61, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = peer(input_ids=tokens).logits
        padded = peer(input_ids=tokens, attention_mask=mask, position_ids=positions).logits
        assert (ours(tokens) - full).abs().max().item() < 1e-5
        real = mask.bool()
        assert (ours(tokens, mask)[real] - padded[real]).abs().max().item() < 1e-5
        again = load_pretrained(tmp_path)(tokens)
        assert (again - full).abs().max().item() < 1e-5
