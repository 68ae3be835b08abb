"""A tiny decoder-only language model laid out as Llama (Touvron et al. 2023), with a KV cache.

For tokens x_1..x_T the model computes, with h^0_t = E[x_t] and for each layer l,

    u^l   = h^{l-1} + Attn(RMSNorm(h^{l-1}))
    h^l   = u^l + W_down (silu(W_gate RMSNorm(u^l)) * W_up RMSNorm(u^l))        (SwiGLU)
    p(x_{t+1} | x_{<=t}) = softmax(W_head RMSNorm(h^L_t))

    RMSNorm(x) = g * x / sqrt(mean(x^2) + eps)

Attention is causal; queries and keys are rotated by their position (RoPE, Su et al. 2021):
each pair (x_i, x_{i+d/2}) of a head of width d turns by the angle m * theta^(-2i/d) at position
m, so q_m . k_n depends on m - n alone. Keys and values may have fewer heads than queries
(grouped-query attention).

Attribute names follow transformers' ``LlamaForCausalLM``, so ``state_dict()`` keys are its
keys one to one (``model.layers.0.self_attn.q_proj.weight`` ...): :func:`save_pretrained` writes a
folder that ``LlamaForCausalLM.from_pretrained`` reads, and :func:`load_pretrained` reads one back.

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

    def __post_init__(self) -> None:
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ConfigError(f"dim {self.dim} must divide into n_heads {self.n_heads}, which "
                              f"must divide into n_kv_heads {self.n_kv_heads} groups")
        if (self.dim // self.n_heads) % 2:
            raise ConfigError("the head width dim / n_heads must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_hf(self, bos_id: int, eos_id: int, pad_id: int) -> dict:
        """The fields of transformers' ``LlamaConfig``."""
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "vocab_size": self.vocab_size, "hidden_size": self.dim,
                "intermediate_size": self.hidden_dim, "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
                "head_dim": self.head_dim, "max_position_embeddings": self.max_seq_len,
                "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
                "rope_scaling": None, "hidden_act": "silu", "attention_bias": False,
                "mlp_bias": False, "tie_word_embeddings": False, "torch_dtype": "float32",
                "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}

    @classmethod
    def from_hf(cls, hf: dict) -> LMConfig:
        if hf.get("model_type") != "llama":
            raise ConfigError(f"not a Llama config (model_type {hf.get('model_type')!r})")
        if hf.get("tie_word_embeddings") or hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ConfigError("tied embeddings and attention/MLP biases are not supported")
        rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get(
            "rope_theta", 10000.0)
        return cls(vocab_size=hf["vocab_size"], dim=hf["hidden_size"],
                   hidden_dim=hf["intermediate_size"], n_layers=hf["num_hidden_layers"],
                   n_heads=hf["num_attention_heads"],
                   n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                   max_seq_len=hf.get("max_position_embeddings", 256),
                   rope_theta=float(rope_theta), norm_eps=hf.get("rms_norm_eps", 1e-6))


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
        if past + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens exceeds max_seq_len "
                             f"{self.cfg.max_seq_len}")
        mask = attention_bias(attention_mask.bool(), T)
        rotary = rotary_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
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


def load_pretrained(directory: str | Path) -> TinyLM:
    """A TinyLM from a transformers Llama folder (``config.json`` + ``model.safetensors``)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{directory} has no config.json")
    model = TinyLM(LMConfig.from_hf(read_json(directory / "config.json")))
    tensors = load_tensors(directory / "model.safetensors")
    # transformers leaves out buffers it can rebuild; our model has none, so keys must match.
    missing = set(model.state_dict()) - set(tensors)
    if missing:
        raise ConfigError(f"{directory}/model.safetensors lacks {sorted(missing)[0]}")
    model.load_state_dict({k: tensors[k] for k in model.state_dict()})
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
