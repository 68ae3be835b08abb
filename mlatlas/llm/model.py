"""A tiny decoder-only language model laid out as Llama (Touvron et al. 2023), with a KV cache.

For tokens x_1..x_T the model computes, with h^0_t = E[x_t] and for each layer l,

    u^l   = h^{l-1} + Attn(RMSNorm(h^{l-1}))
    h^l   = u^l + W_down (silu(W_gate RMSNorm(u^l)) * W_up RMSNorm(u^l))        (SwiGLU)
    p(x_{t+1} | x_{<=t}) = softmax(W_head RMSNorm(h^L_t))

    RMSNorm(x) = g * x / sqrt(mean(x^2) + eps)

Attention is causal; queries and keys are rotated by their position (RoPE, Su et al. 2021):
each pair (x_i, x_{i+d/2}) of a head of width d turns by the angle m * theta^(-2i/d) at position
m, so q_m . k_n depends on m - n alone. Keys and values may have fewer heads than queries
(grouped-query attention), and a head's width d may differ from dim / n_heads. ``rope_scaling``
stretches the rotation to longer contexts: linear position interpolation (m -> m / s), dynamic
NTK scaling (the base b grows to b (s L / L0 - (s - 1))^(d / (d - 2)) for sequences of L > L0
tokens) and Llama 3.1's per-wavelength blend; :mod:`mlatlas.nn.attention` gives the equations.

Attribute names follow transformers' ``LlamaForCausalLM``, so ``state_dict()`` keys are its
keys one to one (``model.layers.0.self_attn.q_proj.weight`` ...): :func:`save_pretrained` writes a
folder that ``LlamaForCausalLM.from_pretrained`` reads, and :func:`load_pretrained` reads one back,
refusing with a :class:`ConfigError` any config field whose value this model does not compute.

Sequences in a batch are left-padded prompts followed by completions: ``attention_mask`` is 1 on
real tokens and each token's position is the number of real tokens before it, so a padded row
computes exactly what the row alone would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mlatlas.core import distributed
from mlatlas.core.config import ConfigError
from mlatlas.core.io import load_tensors, read_json, save_tensors, write_json
from mlatlas.nn.attention import (
    Attention,
    KVCache,
    causal_mask,
    padding_mask,
    rotary_cos_sin,
)
from mlatlas.nn.layers import RMSNorm, SwiGLU
from mlatlas.nn.sampling import sample_token

# transformers' rope types this model computes, with the parameters each needs ("default", plain
# RoPE, is ``rope_scaling`` None).
ROPE_SCALINGS = {"linear": ("factor",), "dynamic": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                            "original_max_position_embeddings")}

# Llama config.json fields that change what the model computes, with the values it implements; a
# missing field has LlamaConfig's default, an implemented value. The other fields leave the logits
# as they are: use_cache, torch_dtype, token ids, initializer_range, and pretraining_tp, whose
# sliced projections add up the same products.
IMPLEMENTED_HF_FIELDS = {"hidden_act": ("silu", "swish"), "attention_bias": (False,),
                         "mlp_bias": (False,), "tie_word_embeddings": (False,),
                         "attention_dropout": (0.0,), "sliding_window": (None,),
                         "quantization_config": (None,)}


@dataclass
class LMConfig:
    vocab_size: int
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    hidden_dim: int = 352
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    head_dim: int | None = None
    """Width d of an attention head; None is dim / n_heads."""
    rope_scaling: dict | None = None
    """None (plain RoPE) or ``rope_type`` linear, dynamic or llama3 with the parameters that
    :data:`ROPE_SCALINGS` names (transformers' ``rope_scaling`` keys)."""

    def __post_init__(self) -> None:
        if (self.head_dim is None and self.dim % self.n_heads) or self.n_heads % self.n_kv_heads:
            raise ConfigError(f"dim {self.dim} must divide into n_heads {self.n_heads}, which "
                              f"must divide into n_kv_heads {self.n_kv_heads} groups")
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ConfigError(f"the head width {self.head_dim} must be even for rotary "
                              "embeddings")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)

    @property
    def context_length(self) -> int:
        """The longest sequence the model takes: max_seq_len, which dynamic scaling (meant to
        run past the trained length) stretches to factor * max_seq_len."""
        if self.rope_scaling is not None and self.rope_scaling["rope_type"] == "dynamic":
            return int(self.rope_scaling["factor"] * self.max_seq_len)
        return self.max_seq_len

    def to_hf(self, bos_id: int, eos_id: int, pad_id: int) -> dict:
        """The fields of transformers' ``LlamaConfig``."""
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "vocab_size": self.vocab_size, "hidden_size": self.dim,
                "intermediate_size": self.hidden_dim, "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
                "head_dim": self.head_dim, "max_position_embeddings": self.max_seq_len,
                "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
                "rope_scaling": self.rope_scaling, "hidden_act": "silu", "attention_bias": False,
                "mlp_bias": False, "tie_word_embeddings": False, "torch_dtype": "float32",
                "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}

    @classmethod
    def from_hf(cls, hf: dict) -> LMConfig:
        """The config of a transformers ``LlamaConfig`` dict; a ConfigError names the first
        field whose value this model does not compute."""
        if hf.get("model_type") != "llama":
            raise ConfigError(f"model_type {hf.get('model_type')!r} is not supported: only "
                              "Llama folders (model_type 'llama') can be imported")
        for field, implemented in IMPLEMENTED_HF_FIELDS.items():
            if hf.get(field, implemented[0]) not in implemented:
                raise ConfigError(f"{field} {hf[field]!r} is not supported (supported: "
                                  f"{' or '.join(map(repr, implemented))})")
        # transformers 5 writes the base and the scaling in rope_parameters, earlier versions
        # rope_theta and rope_scaling (whose type was once named 'type').
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
        if partial not in (None, 1.0):
            raise ConfigError(f"partial_rotary_factor {partial!r} is not supported (supported: "
                              "1.0, every pair of a head rotates)")
        max_positions = hf.get("max_position_embeddings", 256)
        kind = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if kind != "default":
            # A llama3 dict without its original length takes the top-level field or
            # max_position_embeddings, as transformers fills it in.
            rope = {"original_max_position_embeddings": hf.get(
                "original_max_position_embeddings", max_positions), **rope}
            scaling = {"rope_type": kind,
                       **{key: rope.get(key) for key in ROPE_SCALINGS.get(kind, ())}}
        rope_theta = rope.get("rope_theta") or hf.get("rope_theta") or 10000.0
        return cls(vocab_size=hf["vocab_size"], dim=hf["hidden_size"],
                   hidden_dim=hf["intermediate_size"], n_layers=hf["num_hidden_layers"],
                   n_heads=hf["num_attention_heads"],
                   n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                   max_seq_len=max_positions, rope_theta=float(rope_theta),
                   norm_eps=hf.get("rms_norm_eps", 1e-6), head_dim=hf.get("head_dim"),
                   rope_scaling=scaling)


def check_rope_scaling(scaling: dict) -> None:
    """ConfigError unless ``scaling`` is a rope type of :data:`ROPE_SCALINGS` with exactly its
    parameters, each usable in the equations of :mod:`mlatlas.nn.attention`."""
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALINGS:
        raise ConfigError(f"rope_type {kind!r} is not supported (supported: default, "
                          f"{', '.join(ROPE_SCALINGS)})")
    for key in ROPE_SCALINGS[kind]:
        if not isinstance(scaling.get(key), int | float) or scaling[key] <= 0:
            raise ConfigError(f"{kind} rope scaling needs a positive {key}, got "
                              f"{scaling.get(key)!r}")
    extra = set(scaling) - {"rope_type", *ROPE_SCALINGS[kind]}
    if extra:
        raise ConfigError(f"{kind} rope scaling has no parameter {sorted(extra)[0]!r}")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ConfigError(f"llama3 rope scaling needs high_freq_factor "
                          f"{scaling['high_freq_factor']} above low_freq_factor "
                          f"{scaling['low_freq_factor']}")


class DecoderLayer(nn.Module):
    """Pre-norm Llama block: rotary grouped-query self-attention, then SwiGLU, both residual."""

    def __init__(self, cfg: LMConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                                   bias=False)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.hidden_dim)

    def forward(self, x, rotary, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), mask=mask, rotary=rotary, cache=cache,
                               layer=self.layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Trunk(nn.Module):
    """Embedding, decoder layers and final norm (transformers' ``LlamaModel``)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class TinyLM(nn.Module):
    """p_theta(x_{t+1} | x_{<=t}); ``forward`` gives logits, ``hidden`` the last layer's states
    (which a reward model or critic reads through its own head)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Trunk(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(_init_weights)

    def hidden(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
               cache: KVCache | None = None, positions: torch.Tensor | None = None
               ) -> torch.Tensor:
        """(B, T) token ids -> (B, T, dim) states. Without a cache the mask (B, T) covers the
        tokens; with one it covers the cached tokens and these, and ``positions`` must be given."""
        B, T = tokens.shape
        if tokens.max() >= self.cfg.vocab_size or tokens.min() < 0:
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size})")
        if attention_mask is None:
            attention_mask = torch.ones(B, (cache.length if cache else 0) + T,
                                        dtype=torch.long, device=tokens.device)
        if positions is None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        past = cache.length if cache is not None else 0
        if past + T > self.cfg.context_length:
            raise ValueError(f"sequence of {past + T} tokens exceeds the context of "
                             f"{self.cfg.context_length} (max_seq_len {self.cfg.max_seq_len})")
        mask = attention_bias(attention_mask.bool(), T)
        rotary = rotary_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta,
                                self.cfg.rope_scaling, self.cfg.max_seq_len)
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x, rotary, mask, cache)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """(B, T) -> logits (B, T, vocab): position t predicts token t + 1."""
        return self.lm_head(self.hidden(tokens, attention_mask))


def attention_bias(key_mask: torch.Tensor, T: int) -> torch.Tensor:
    """(B, 1, T, S) boolean mask for the last T of S tokens: causal, and no padded key. A query
    may always see itself, so a padding query (whose output nobody reads) has no empty row."""
    S = key_mask.shape[-1]
    rows = torch.arange(S - T, S, device=key_mask.device)[:, None]
    itself = torch.arange(S, device=key_mask.device)[None, :] == rows
    return (causal_mask(T, S, key_mask.device) & padding_mask(key_mask)) | itself


def _init_weights(module: nn.Module) -> None:
    # Llama's initializer_range 0.02 for every matrix.
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


@torch.no_grad()
def generate(model: TinyLM, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
             max_new_tokens: int, eos_id: int, pad_id: int, temperature: float = 1.0,
             top_p: float = 1.0, generator: torch.Generator | None = None,
             sharded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample completions of left-padded prompts (B, P) with a KV cache.

    ``temperature`` 0 is greedy decoding; otherwise tokens are drawn from softmax(logits / T)
    restricted to the smallest set whose probability reaches ``top_p`` (nucleus sampling).
    Returns (completion_ids, completion_mask), both (B, L) with L <= max_new_tokens: each row
    holds its tokens up to and including the first EOS, then ``pad_id`` with mask 0.

    ``sharded``: the B prompts are this rank's shard of a data-parallel job's global batch
    (every rank calls this together). Each token is drawn with the global batch's random
    numbers, and decoding goes on while a row of *any* rank is unfinished, so L and the
    generator's state are those of a one-process run of the whole batch.
    """
    B, P = prompt_ids.shape
    device = prompt_ids.device
    cfg = model.cfg
    cache = KVCache(cfg.n_layers, B, cfg.n_kv_heads, cfg.head_dim, P + max_new_tokens, device,
                    model.lm_head.weight.dtype)
    mask = prompt_mask.long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    h = model.hidden(prompt_ids, mask, cache, positions)[:, -1]
    next_position = mask.sum(-1, keepdim=True)
    tokens, alive = [], torch.ones(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        token = sample_token(model.lm_head(h), temperature, top_p, generator, sharded=sharded)
        token = torch.where(alive, token, torch.full_like(token, pad_id))
        tokens.append(token)
        alive_mask = alive.long()
        alive = alive & (token != eos_id)
        unfinished = alive.sum()
        if not (distributed.all_reduce_sum(unfinished) if sharded else unfinished):
            break
        mask = torch.cat([mask, alive_mask[:, None]], dim=1)
        h = model.hidden(token[:, None], mask, cache, next_position)[:, -1]
        next_position = next_position + 1
    ids = torch.stack(tokens, dim=1)
    # A token belongs to the completion if no EOS came strictly before it.
    eos_before = torch.cumsum((ids == eos_id).long(), dim=1) - (ids == eos_id).long()
    completion_mask = (eos_before == 0).long()
    return ids.masked_fill(completion_mask == 0, pad_id), completion_mask


# transformers' folder format ------------------------------------------------------------------

def save_pretrained(model: TinyLM, directory: str | Path, *, bos_id: int, eos_id: int,
                    pad_id: int) -> Path:
    """Write ``config.json`` and ``model.safetensors`` as ``LlamaForCausalLM`` reads them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "config.json", model.cfg.to_hf(bos_id, eos_id, pad_id))
    write_json(directory / "generation_config.json",
               {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id})
    save_tensors(directory / "model.safetensors",
                 {k: v.detach().contiguous() for k, v in model.state_dict().items()},
                 metadata={"format": "pt"})
    return directory


def read_hf_config(directory: str | Path) -> LMConfig:
    """The LMConfig of a transformers Llama folder, or one line saying what in its
    ``config.json`` the model does not compute."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{directory} has no config.json")
    try:
        return LMConfig.from_hf(read_json(directory / "config.json"))
    except ConfigError as err:
        raise ConfigError(f"{directory}/config.json: {err}") from None


def load_pretrained(directory: str | Path) -> TinyLM:
    """A TinyLM from a transformers Llama folder (``config.json`` + ``model.safetensors``)."""
    directory = Path(directory)
    model = TinyLM(read_hf_config(directory))
    tensors = load_tensors(directory / "model.safetensors")
    # transformers leaves out buffers it can rebuild; our model has none, so keys must match.
    missing = set(model.state_dict()) - set(tensors)
    if missing:
        raise ConfigError(f"{directory}/model.safetensors lacks {sorted(missing)[0]}")
    for name, tensor in model.state_dict().items():
        if tensors[name].shape != tensor.shape:
            raise ConfigError(f"{directory}/model.safetensors: {name} is "
                              f"{tuple(tensors[name].shape)}, config.json makes it "
                              f"{tuple(tensor.shape)}")
    model.load_state_dict({k: tensors[k] for k in model.state_dict()})
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
