"""Importing transformers Llama folders: rotary scaling (linear, dynamic NTK, llama3), explicit
head width and grouped-query attention against transformers' logits, the equations of each
scaling, one-line refusals of what the model does not compute, and export back."""

import dataclasses
import json
import math

import pytest
import torch

from mlatlas.cli import main
from mlatlas.core.config import ConfigError
from mlatlas.core.io import read_json, write_json
from mlatlas.llm.model import LMConfig, TinyLM, load_pretrained, save_pretrained
from mlatlas.nn.attention import rotary_cos_sin

transformers = pytest.importorskip("transformers")

VOCAB = 32
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
# (LlamaConfig fields, sequence length): max_position_embeddings is 64, so dynamic runs at 80.
VARIANTS = {
    "plain": ({}, 12),
    "linear": ({"rope_parameters": {"rope_type": "linear", "factor": 4.0}}, 12),
    "dynamic": ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, 80),
    "llama3": ({"rope_parameters": dict(LLAMA3)}, 12),
    "head_dim": ({"head_dim": 16}, 12),
    "multi_query": ({"num_key_value_heads": 1}, 12),
}


def hf_config(**fields):
    """A tiny LlamaConfig: 4 heads of width 8, 2 kv heads, base 100, 64 positions."""
    rope = {"rope_theta": 100.0, **fields.pop("rope_parameters", {"rope_type": "default"})}
    return transformers.LlamaConfig(**{
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "rope_parameters": rope, **fields})


def hf_llama(**fields):
    """A random LlamaForCausalLM of :func:`hf_config`, its weights drawn large enough that a
    wrong rotation moves the logits by whole units."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config(**fields)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    return model


def token_ids(T, rows=2):
    return torch.randint(0, VOCAB, (rows, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", VARIANTS)
def test_imported_folder_gives_transformers_logits(variant, tmp_path):
    fields, T = VARIANTS[variant]
    hf = hf_llama(**fields)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_pretrained(tmp_path).eval()
    ids = token_ids(T)
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
        assert (ours(ids) - theirs).abs().max() < 1e-4
        if ours.cfg.rope_scaling is not None:
            # The comparison has teeth: plain RoPE on the same weights is far off.
            plain = TinyLM(dataclasses.replace(ours.cfg, rope_scaling=None, max_seq_len=T))
            plain.load_state_dict(ours.state_dict())
            assert (plain(ids) - theirs).abs().max() > 0.5


def test_scaling_and_head_width_are_read():
    config = hf_config(head_dim=16, rope_parameters=dict(LLAMA3))
    cfg = LMConfig.from_hf(json.loads(config.to_json_string()))
    assert cfg.head_dim == 16 and cfg.dim == 32 and cfg.rope_theta == 100.0
    assert cfg.rope_scaling == LLAMA3


@pytest.mark.parametrize("legacy", [
    {"rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 100.0},
    {"rope_scaling": {"rope_type": "linear", "factor": 4.0}, "rope_theta": 100.0},
    {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100.0}},
])
def test_old_and_new_config_keys_read_alike(legacy):
    base = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    cfg = LMConfig.from_hf({**base, **legacy})
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0} and cfg.rope_theta == 100.0


def test_a_llama3_config_without_original_length_uses_max_positions():
    cfg = LMConfig.from_hf({"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32,
                            "intermediate_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 4, "max_position_embeddings": 48,
                            "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0}})
    assert cfg.rope_scaling["original_max_position_embeddings"] == 48


# The equations of mlatlas.nn.attention, one by one --------------------------------------------

def angles(positions, scaling=None, d=8, theta=100.0, max_positions=None):
    """The d/2 rotation angles (1, T, d/2) at each position, read back from the cos and sin:
    wrapped into (-pi, pi], so they are compared as numbers only at position 1, where every
    angle is at most 1."""
    cos, sin = rotary_cos_sin(positions, d, theta, scaling, max_positions)
    return torch.atan2(sin, cos)[:, 0, :, :d // 2]


def test_linear_scaling_interpolates_positions():
    m = torch.arange(0, 40, 4)[None]
    scaled = rotary_cos_sin(m, 8, 100.0, {"rope_type": "linear", "factor": 4.0})
    for ours, interpolated in zip(scaled, rotary_cos_sin(m // 4, 8, 100.0), strict=True):
        assert torch.allclose(ours, interpolated, atol=1e-5)


def test_dynamic_scaling_grows_the_base_past_the_trained_length():
    scaling, d, L0, s = {"rope_type": "dynamic", "factor": 2.0}, 8, 16, 2.0
    short = torch.arange(L0)[None]
    assert torch.equal(angles(short, scaling, max_positions=L0), angles(short))
    L = 40
    base = 100.0 * (s * L / L0 - (s - 1)) ** (d / (d - 2))
    one = torch.tensor([[1]])
    # A row whose last position is L - 1 is a sequence of L tokens; read it at position 1.
    at_one = angles(torch.tensor([[1, L - 1]]), scaling, max_positions=L0)[0, 0]
    assert torch.allclose(at_one, angles(one, theta=base)[0, 0], atol=1e-6)
    # The fastest pair keeps its frequency; the slowest is divided by s L / L0 - (s - 1).
    assert at_one[0] == angles(one)[0, 0, 0]
    assert math.isclose(at_one[-1] * (s * L / L0 - (s - 1)), angles(one)[0, 0, -1], rel_tol=1e-5)


def test_llama3_keeps_fast_pairs_interpolates_slow_ones_and_blends_between():
    # d = 8, base 100: wavelengths 2 pi 100^(i/4) = 6.3, 19.9, 62.8, 198.7; with L0 = 32 and
    # factors 1 and 4 the kept band is below 8, the interpolated one above 32.
    one = torch.tensor([[1]])
    plain, scaled = angles(one)[0, 0], angles(one, LLAMA3)[0, 0]
    ratio = scaled / plain
    assert math.isclose(ratio[0], 1.0, rel_tol=1e-6)
    assert torch.allclose(ratio[2:], torch.full((2,), 1 / 8), rtol=1e-5)
    gamma = (32 / (2 * math.pi * 100 ** 0.25) - 1) / (4 - 1)
    assert math.isclose(ratio[1], (1 - gamma) / 8 + gamma, rel_tol=1e-5)


def test_dynamic_padded_rows_compute_what_each_row_does_alone():
    ours = TinyLM(LMConfig(vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                           hidden_dim=32, max_seq_len=8,
                           rope_scaling={"rope_type": "dynamic", "factor": 2.0})).eval()
    ids = token_ids(14)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # row 1 has 9 tokens, row 0 has 14: each its own base
    with torch.no_grad():
        batched = ours(ids, mask)
        alone = ours(ids[1:, 5:])
    assert torch.allclose(batched[1, 5:], alone[0], atol=1e-5)
    with pytest.raises(ValueError, match="context of 16"):
        ours(token_ids(17))


# Refusals --------------------------------------------------------------------------------------

BASE_HF = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32,
           "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 64, "rope_theta": 100.0}


@pytest.mark.parametrize("fields,message", [
    ({"model_type": "mistral"}, "model_type 'mistral' is not supported: only Llama"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported \(supported: 'silu' or"),
    ({"attention_bias": True}, r"attention_bias True is not supported \(supported: False\)"),
    ({"mlp_bias": True}, r"mlp_bias True is not supported \(supported: False\)"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings True is not supported"),
    ({"attention_dropout": 0.1}, r"attention_dropout 0.1 is not supported \(supported: 0.0\)"),
    ({"sliding_window": 4096}, r"sliding_window 4096 is not supported \(supported: None\)"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                       "original_max_position_embeddings": 16}},
     r"rope_type 'yarn' is not supported \(supported: default, linear, dynamic, llama3\)"),
    ({"rope_scaling": {"type": "su", "short_factor": [1.0], "long_factor": [1.0]}},
     "rope_type 'su' is not supported"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 100.0}},
     "rope_type 'longrope' is not supported"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
     "partial_rotary_factor 0.5 is not supported"),
    ({"rope_scaling": {"rope_type": "linear"}}, "linear rope scaling needs a positive factor"),
    ({"rope_scaling": {**LLAMA3, "high_freq_factor": 1.0}}, "high_freq_factor 1.0 above"),
])
def test_unsupported_fields_are_refused_by_name(fields, message):
    with pytest.raises(ConfigError, match=message):
        LMConfig.from_hf({**BASE_HF, **fields})


def test_the_cli_refuses_a_folder_it_cannot_compute_in_one_line(tmp_path, capsys):
    folder = tmp_path / "gelu"
    folder.mkdir()
    write_json(folder / "config.json", {**BASE_HF, "hidden_act": "gelu"})
    code = main(["train", "sft", "--init-from", str(folder), "--out", str(tmp_path / "runs"),
                 "--steps", "1", "--no-progress"])
    captured = capsys.readouterr()
    # Refused before a run folder is made: nothing is announced, the error is one line.
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "run folder" not in captured.out, captured
    assert lines[-1] == (f"mlatlas train: error: {folder}/config.json: hidden_act 'gelu' is "
                         "not supported (supported: 'silu' or 'swish')")
    assert not any((tmp_path / "runs").glob("*"))


# Export ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scaling", [
    None, {"rope_type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0}, LLAMA3,
])
def test_export_with_scaling_is_read_alike_by_transformers(scaling, tmp_path):
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                   hidden_dim=64, max_seq_len=48, rope_theta=100.0, rope_scaling=scaling)
    ours = TinyLM(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    save_pretrained(ours, tmp_path / "hf", bos_id=1, eos_id=2, pad_id=0)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = token_ids(60 if scaling and scaling["rope_type"] == "dynamic" else 12)
    with torch.no_grad():
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max() < 1e-4
    # A run's lm.json keeps the scaling too, and both folders read back to the same config.
    write_json(tmp_path / "lm.json", vars(cfg))
    assert LMConfig(**read_json(tmp_path / "lm.json")) == cfg
    assert load_pretrained(tmp_path / "hf").cfg == cfg
