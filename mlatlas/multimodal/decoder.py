"""A tiny mixture-of-experts language decoder in the DeepSeek-V3 shape (Moonlight's architecture).

For inputs h^0 (token embeddings E[x_t], or given ``inputs_embeds``) each layer l computes

    u^l = h^{l-1} + MLA(RMSNorm(h^{l-1}))
    h^l = u^l + FFN^l(RMSNorm(u^l))
    p(x_{t+1} | x_{<=t}) = softmax(W_head RMSNorm(h^L_t))          (lm_head untied)

FFN^l is a dense SwiGLU for the first ``first_k_dense_replace`` layers and the mixture of experts
of :mod:`mlatlas.nn.moe` after them (``dense=True``: SwiGLU everywhere, see
:func:`dense_equivalent`). Multi-head Latent Attention (DeepSeek-V2, DeepSeek-AI 2024, 2.1),
for heads i = 1..H, with a no-position part of d_n and a rotary part of d_r per head:

    q_t = W_q h_t  -> per head [q^n_{t,i} (d_n); q^r_{t,i} (d_r)]        (q_lora_rank None)
      or W_qb RMSNorm(W_qa h_t)                                          (q_lora_rank r_q)
    [c_t (r_kv); k^r_t (d_r)] = W_kva h_t            (``kv_a_proj_with_mqa``; c_t the latent)
    [k^n_{t,i} (d_n); v_{t,i} (d_v)] = W_kvb RMSNorm(c_t)                 (``kv_b_proj``)
    q_{t,i} = [q^n_{t,i}; RoPE_t(q^r_{t,i})],  k_{t,i} = [k^n_{t,i}; RoPE_t(k^r_t)]
    o_{t,i} = sum_s softmax_s(q_{t,i}^T k_{s,i} / sqrt(d_n + d_r) + M_{t,s}) v_{s,i}
    MLA(h)_t = W_o [o_{t,1}; ...; o_{t,H}]

The decoupled rotary key k^r_t is one head shared by all heads; RoPE (Su et al. 2021) turns
the pairs (x_j, x_{j + d_r/2}) of the d_r rotary dimensions by m theta^(-2j/d_r) at position m.
A plain attention would not export exactly: the RMSNorm on the latent c_t is not linear.

Names follow transformers' ``DeepseekV3ForCausalLM``, so ``state_dict()`` keys are its keys one
to one (``model.layers.1.mlp.experts.gate_up_proj`` ...) and :func:`save_pretrained` writes a
folder it loads. Choices that make both compute the same function: ``rope_interleave`` False
(transformers' default True rotates adjacent pairs (x_{2j}, x_{2j+1}), DeepSeek's checkpoint
layout; ours rotates halves, as :mod:`mlatlas.nn.attention` and transformers' non-interleaved
path do); plain RoPE, no yarn (yarn would multiply cos/sin and the softmax scale by its mscale
factors: with rope_type "default" the scale is exactly 1/sqrt(d_n + d_r), SDPA's); the latent and
query-latent norms use eps 1e-6 (transformers builds them with its RMSNorm's default, not
``rms_norm_eps``); no multi-token-prediction layers (``num_nextn_predict_layers`` 0).

Left padding as in :mod:`mlatlas.llm.model`: ``attention_mask`` is 1 on real tokens, positions
are cumsum(mask) - 1, attention is causal and never sees a padded key, so a padded row computes
what the row alone would. Padded tokens are routed but not counted in the router's load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mlatlas.core import distributed
from mlatlas.core.config import ConfigError
from mlatlas.core.io import load_tensors, read_json, save_tensors, write_json
from mlatlas.llm.model import attention_bias, count_parameters
from mlatlas.nn.attention import rotary_cos_sin, rotate
from mlatlas.nn.layers import RMSNorm, SwiGLU
from mlatlas.nn.moe import BALANCES, SCORINGS, MoE, capacity_factor, check_routing
from mlatlas.nn.sampling import sample_token

# transformers builds q_a_layernorm and kv_a_layernorm with its RMSNorm's default eps.
LATENT_NORM_EPS = 1e-6

# DeepseekV3 config.json fields that change what the model computes, with the values it
# implements (a missing field has DeepseekV3Config's default). rope_interleave defaults to True
# there, so a folder must say False.
IMPLEMENTED_HF_FIELDS = {"hidden_act": ("silu", "swish"), "attention_bias": (False,),
                         "tie_word_embeddings": (False,), "attention_dropout": (0.0, 0),
                         "rope_interleave": (False,), "quantization_config": (None,),
                         "scoring_func": ("sigmoid",), "topk_method": ("noaux_tc",)}


@dataclass
class DecoderConfig:
    vocab_size: int
    dim: int = 96
    n_layers: int = 3
    n_heads: int = 4
    kv_lora_rank: int = 32
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    intermediate_size: int = 192
    """Width of the dense SwiGLU layers (the first ``first_k_dense_replace``)."""
    moe_intermediate_size: int = 64
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    first_k_dense_replace: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    scoring: str = "sigmoid"
    balance: str = "bias"
    """"bias" (auxiliary-loss-free, :meth:`MoEDecoder.update_router_bias`), "aux" (the
    load-balancing loss, :meth:`MoEDecoder.aux_loss`) or "none"."""
    bias_update_speed: float = 1e-3
    aux_loss_alpha: float = 0.01
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    dense: bool = False
    """Every layer a dense SwiGLU: the first ``first_k_dense_replace`` of width
    ``intermediate_size``, the others of ``dense_width`` (the routed-and-shared width a token
    uses), so parameters per token match the MoE model's (see :func:`dense_equivalent`)."""

    def __post_init__(self) -> None:
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim {self.qk_rope_head_dim} must be even for "
                              "rotary embeddings")
        if self.balance not in BALANCES:
            raise ConfigError(f"balance {self.balance!r} is not one of {BALANCES}")
        if not 0 <= self.first_k_dense_replace <= self.n_layers:
            raise ConfigError(f"first_k_dense_replace {self.first_k_dense_replace} must lie in "
                              f"[0, n_layers {self.n_layers}]")
        if self.scoring not in SCORINGS:
            raise ConfigError(f"scoring {self.scoring!r} is not one of {SCORINGS}")
        if not self.dense:
            try:
                check_routing(self.n_routed_experts, self.num_experts_per_tok, self.n_group,
                              self.topk_group)
            except ValueError as err:
                raise ConfigError(str(err)) from None

    @property
    def dense_width(self) -> int:
        """(k + shared) * moe_intermediate_size: the SwiGLU width one token runs in a MoE layer."""
        return (self.num_experts_per_tok + self.n_shared_experts) * self.moe_intermediate_size

    def is_moe_layer(self, layer: int) -> bool:
        return not self.dense and layer >= self.first_k_dense_replace

    def to_hf(self, bos_id: int, eos_id: int, pad_id: int) -> dict:
        """The fields of transformers' ``DeepseekV3Config``; a ConfigError names what it cannot
        express (softmax scoring, no shared expert, groups of one expert, a dense model whose
        dense layers differ in width)."""
        first_dense, width = self.first_k_dense_replace, self.intermediate_size
        if self.dense:
            if first_dense not in (0, self.n_layers) and width != self.dense_width:
                raise ConfigError(f"a dense model exports as DeepseekV3 only with one SwiGLU "
                                  f"width: intermediate_size {width} != dense_width "
                                  f"{self.dense_width}")
            first_dense, width = self.n_layers, (width if first_dense else self.dense_width)
        else:
            if self.scoring != "sigmoid":
                raise ConfigError("DeepseekV3 routes on sigmoid scores only: scoring "
                                  f"{self.scoring!r} cannot be exported")
            if self.n_shared_experts < 1:
                raise ConfigError("DeepseekV3 needs at least one shared expert")
            if self.n_routed_experts // self.n_group < 2:
                raise ConfigError("DeepseekV3 scores a group by its two best experts: groups "
                                  f"of {self.n_routed_experts // self.n_group} cannot be exported")
        return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
                "vocab_size": self.vocab_size, "hidden_size": self.dim,
                "intermediate_size": width, "moe_intermediate_size": self.moe_intermediate_size,
                "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_heads, "n_shared_experts": self.n_shared_experts,
                "n_routed_experts": self.n_routed_experts,
                "routed_scaling_factor": self.routed_scaling_factor,
                "kv_lora_rank": self.kv_lora_rank, "q_lora_rank": self.q_lora_rank,
                "qk_rope_head_dim": self.qk_rope_head_dim, "v_head_dim": self.v_head_dim,
                "qk_nope_head_dim": self.qk_nope_head_dim, "n_group": self.n_group,
                "topk_group": self.topk_group, "num_experts_per_tok": self.num_experts_per_tok,
                "first_k_dense_replace": first_dense, "norm_topk_prob": self.norm_topk_prob,
                "scoring_func": "sigmoid", "topk_method": "noaux_tc", "hidden_act": "silu",
                "max_position_embeddings": self.max_seq_len, "rms_norm_eps": self.norm_eps,
                "rope_theta": self.rope_theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
                "rope_scaling": None, "rope_interleave": False, "attention_bias": False,
                "attention_dropout": 0.0, "tie_word_embeddings": False,
                "num_nextn_predict_layers": 0, "torch_dtype": "float32",
                "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}

    @classmethod
    def from_hf(cls, hf: dict) -> DecoderConfig:
        """The config of a transformers ``DeepseekV3Config`` dict; a ConfigError names the first
        field whose value this model does not compute. Training-only fields (balance, gamma,
        alpha) take their defaults."""
        if hf.get("model_type") != "deepseek_v3":
            raise ConfigError(f"model_type {hf.get('model_type')!r} is not supported: only "
                              "DeepSeek-V3 folders (model_type 'deepseek_v3') can be imported")
        defaults = {"rope_interleave": True}
        for field, implemented in IMPLEMENTED_HF_FIELDS.items():
            value = hf.get(field, defaults.get(field, implemented[0]))
            if value not in implemented:
                raise ConfigError(f"{field} {value!r} is not supported (supported: "
                                  f"{' or '.join(map(repr, implemented))})")
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ConfigError(f"rope_type {kind!r} is not supported (supported: 'default')")
        heads = hf["num_attention_heads"]
        if hf.get("num_key_value_heads", heads) not in (None, heads):
            raise ConfigError(f"num_key_value_heads {hf['num_key_value_heads']} must equal "
                              f"num_attention_heads {heads} (MLA expands keys per head)")
        if hf.get("num_nextn_predict_layers", 0):
            raise ConfigError("num_nextn_predict_layers must be 0 (no multi-token prediction)")
        rope_theta = rope.get("rope_theta") or hf.get("rope_theta") or 10000.0
        n_layers = hf["num_hidden_layers"]
        return cls(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=n_layers,
                   n_heads=heads, kv_lora_rank=hf["kv_lora_rank"],
                   q_lora_rank=hf.get("q_lora_rank"), qk_nope_head_dim=hf["qk_nope_head_dim"],
                   qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
                   intermediate_size=hf["intermediate_size"],
                   moe_intermediate_size=hf["moe_intermediate_size"],
                   n_routed_experts=hf["n_routed_experts"],
                   n_shared_experts=hf["n_shared_experts"],
                   num_experts_per_tok=hf["num_experts_per_tok"],
                   first_k_dense_replace=min(hf.get("first_k_dense_replace", 3), n_layers),
                   n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
                   norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                   routed_scaling_factor=float(hf.get("routed_scaling_factor", 2.5)),
                   max_seq_len=hf.get("max_position_embeddings", 4096),
                   rope_theta=float(rope_theta), norm_eps=hf.get("rms_norm_eps", 1e-6))


def dense_equivalent(cfg: DecoderConfig) -> DecoderConfig:
    """The dense model with the same parameters per token: every MoE layer becomes a SwiGLU of
    width (k + shared) moe_intermediate_size, the same matrices a token runs through. Only the
    router, E x dim per MoE layer, has no counterpart."""
    return dataclasses.replace(cfg, dense=True)


class MLAttention(nn.Module):
    """Multi-head Latent Attention of the module text (transformers' DeepseekV3Attention)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.H, self.d_n, self.d_r, self.d_v = (cfg.n_heads, cfg.qk_nope_head_dim,
                                                cfg.qk_rope_head_dim, cfg.v_head_dim)
        self.r_kv = cfg.kv_lora_rank
        q_width = self.H * (self.d_n + self.d_r)
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.dim, q_width, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_width, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.dim, self.r_kv + self.d_r, bias=False)
        self.kv_a_layernorm = RMSNorm(self.r_kv, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.r_kv, self.H * (self.d_n + self.d_v), bias=False)
        self.o_proj = nn.Linear(self.H * self.d_v, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) -> (B, T, dim); ``rotary`` (cos, sin) each (B, 1, T, d_r), ``mask``
        boolean broadcasting to (B, H, T, T)."""
        B, T, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(
            self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.H, self.d_n + self.d_r).transpose(1, 2)
        q_n, q_r = q.split([self.d_n, self.d_r], dim=-1)
        c, k_r = self.kv_a_proj_with_mqa(x).split([self.r_kv, self.d_r], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c)).view(B, T, self.H, self.d_n + self.d_v)
        k_n, v = kv.transpose(1, 2).split([self.d_n, self.d_v], dim=-1)
        k_r = rotate(k_r[:, None], *rotary).expand(B, self.H, T, self.d_r)
        q = torch.cat([q_n, rotate(q_r, *rotary)], dim=-1)
        k = torch.cat([k_n, k_r], dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.H * self.d_v))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = MLAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.is_moe_layer(layer):
            self.mlp = MoE(cfg.dim, cfg.moe_intermediate_size, cfg.n_routed_experts,
                           cfg.n_shared_experts, cfg.num_experts_per_tok, n_group=cfg.n_group,
                           topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                           routed_scaling_factor=cfg.routed_scaling_factor,
                           scoring=cfg.scoring, balance=cfg.balance,
                           bias_update_speed=cfg.bias_update_speed,
                           aux_loss_alpha=cfg.aux_loss_alpha)
        else:
            width = cfg.intermediate_size if layer < cfg.first_k_dense_replace else cfg.dense_width
            self.mlp = SwiGLU(cfg.dim, width)

    def forward(self, h, rotary, mask, token_mask):
        u = h + self.self_attn(self.input_layernorm(h), rotary, mask)
        x = self.post_attention_layernorm(u)
        return u + (self.mlp(x, token_mask) if isinstance(self.mlp, MoE) else self.mlp(x))


class Trunk(nn.Module):
    """Embedding, decoder layers and final norm (transformers' ``DeepseekV3Model``)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class MoEDecoder(nn.Module):
    """p_theta(x_{t+1} | x_{<=t}) from tokens or from input embeddings (image features spliced
    among text embeddings)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Trunk(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        for module in self.modules():
            # initializer_range 0.02 for every matrix (the experts and routers init themselves).
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    def moe_layers(self) -> list[tuple[int, MoE]]:
        return [(i, layer.mlp) for i, layer in enumerate(self.model.layers)
                if isinstance(layer.mlp, MoE)]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, dim)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, length), got {tuple(tokens.shape)}")
        if tokens.numel() and (tokens.max() >= self.cfg.vocab_size or tokens.min() < 0):
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size})")
        return self.model.embed_tokens(tokens)

    def hidden(self, tokens: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None,
               inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Exactly one of tokens (B, T) or inputs_embeds (B, T, dim); mask (B, T) -> the final
        normed states (B, T, dim)."""
        if (tokens is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of tokens and inputs_embeds")
        h = self.embed(tokens) if inputs_embeds is None else inputs_embeds
        if h.dim() != 3 or h.shape[-1] != self.cfg.dim:
            raise ValueError(f"inputs_embeds must be (batch, length, {self.cfg.dim}), got "
                             f"{tuple(h.shape)}")
        B, T, _ = h.shape
        if h.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len "
                             f"{self.cfg.max_seq_len}")
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=h.device)
        if attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask must be ({B}, {T}), got "
                             f"{tuple(attention_mask.shape)}")
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        rotary = rotary_cos_sin(positions, self.cfg.qk_rope_head_dim, self.cfg.rope_theta)
        rotary = tuple(r.to(h.dtype) for r in rotary)
        mask = attention_bias(attention_mask.bool(), T)
        for layer in self.model.layers:
            h = layer(h, rotary, mask, attention_mask)
        return self.model.norm(h)

    def forward(self, tokens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """-> logits (B, T, vocab): position t predicts token t + 1."""
        return self.lm_head(self.hidden(tokens, attention_mask, inputs_embeds))

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' load-balancing losses of the last forward (0 unless balance
        is "aux"); add it to the training loss."""
        losses = [moe.last_aux_loss for _, moe in self.moe_layers() if moe.balance == "aux"]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    @torch.no_grad()
    def update_router_bias(self) -> None:
        """Apply b <- b + gamma sign(mean load - load) in every MoE layer from its last load
        (balance "bias"); call it after optimizer.step()."""
        for _, moe in self.moe_layers():
            moe.update_bias()

    def router_stats(self) -> dict:
        """Of the last forward: {"layers": {layer: {"load": fraction of the routed tokens per
        expert, "capacity": max load / balanced load T k / E}}, "capacity": the largest over the
        layers}; {} without MoE layers. No token is ever dropped, whatever the capacity."""
        layers = {}
        for i, moe in self.moe_layers():
            if moe.last_load is None:
                continue
            layers[i] = {"load": (moe.last_load / moe.last_load.sum().clamp(min=1)).tolist(),
                         "capacity": capacity_factor(moe.last_load, moe.k)}
        if not layers:
            return {}
        return {"layers": layers, "capacity": max(v["capacity"] for v in layers.values())}


@torch.no_grad()
def generate(model: MoEDecoder, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, *,
             max_new_tokens: int, eos_id: int, pad_id: int, temperature: float = 0.0,
             generator: torch.Generator | None = None, sharded: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue left-padded prompt embeddings (B, P, dim) with mask (B, P).

    Temperature 0 is greedy, otherwise tokens are drawn from softmax(logits / T) by
    :func:`mlatlas.nn.sampling.sample_token`. There is no KV cache: each new token recomputes
    the whole sequence, which costs little for the few-token answers this decoder gives. A
    finished row's later slots are ``pad_id`` with mask 0 (so they are never attended to).
    Returns (ids, mask), both (B, L), L <= max_new_tokens; a row holds its tokens up to and
    including its first EOS. The routers' last load is that of the final step.

    ``sharded``: the B rows are this rank's shard of a data-parallel job's global batch (every
    rank calls this together): each token is drawn with the global batch's random numbers and
    decoding goes on while a row of any rank is unfinished, as in one process."""
    B = inputs_embeds.shape[0]
    device = inputs_embeds.device
    embeds, mask = inputs_embeds, attention_mask.long()
    tokens, alive = [], torch.ones(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = model(inputs_embeds=embeds, attention_mask=mask)[:, -1]
        token = sample_token(logits, temperature, generator=generator, sharded=sharded)
        token = torch.where(alive, token, torch.full_like(token, pad_id))
        tokens.append(token)
        mask = torch.cat([mask, alive.long()[:, None]], dim=1)
        alive = alive & (token != eos_id)
        unfinished = alive.sum()
        if not (distributed.all_reduce_sum(unfinished) if sharded else unfinished):
            break
        embeds = torch.cat([embeds, model.embed(token[:, None]).to(embeds.dtype)], dim=1)
    if not tokens:
        empty = torch.zeros(B, 0, dtype=torch.long, device=device)
        return empty, empty
    ids = torch.stack(tokens, dim=1)
    return ids, mask[:, inputs_embeds.shape[1]:]


def active_parameters(model: MoEDecoder) -> int:
    """Parameters one token runs through: all but the routed experts, plus k of the E."""
    inactive = 0
    for _, moe in model.moe_layers():
        per_expert = sum(p[0].numel() for p in moe.experts.parameters())
        inactive += (moe.n_experts - moe.k) * per_expert
    return count_parameters(model) - inactive


# transformers' folder format ------------------------------------------------------------------

def save_pretrained(model: MoEDecoder, directory: str | Path, *, bos_id: int, eos_id: int,
                    pad_id: int) -> Path:
    """Write ``config.json`` and ``model.safetensors`` as ``DeepseekV3ForCausalLM`` reads them
    (each file written atomically)."""
    config = model.cfg.to_hf(bos_id, eos_id, pad_id)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "config.json", config)
    write_json(directory / "generation_config.json",
               {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id})
    save_tensors(directory / "model.safetensors",
                 {k: v.detach().contiguous() for k, v in model.state_dict().items()},
                 metadata={"format": "pt"})
    return directory


def load_pretrained(directory: str | Path) -> MoEDecoder:
    """A MoEDecoder from a transformers DeepSeek-V3 folder (``config.json`` and
    ``model.safetensors`` in transformers 5's fused expert layout)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{directory} has no config.json")
    try:
        cfg = DecoderConfig.from_hf(read_json(directory / "config.json"))
    except ConfigError as err:
        raise ConfigError(f"{directory}/config.json: {err}") from None
    model = MoEDecoder(cfg)
    tensors = load_tensors(directory / "model.safetensors")
    for name, tensor in model.state_dict().items():
        if name not in tensors:
            raise ConfigError(f"{directory}/model.safetensors lacks {name}")
        if tensors[name].shape != tensor.shape:
            raise ConfigError(f"{directory}/model.safetensors: {name} is "
                              f"{tuple(tensors[name].shape)}, config.json makes it "
                              f"{tuple(tensor.shape)}")
    model.load_state_dict({k: tensors[k] for k in model.state_dict()})
    return model
