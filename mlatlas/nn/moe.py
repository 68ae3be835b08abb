"""Mixture-of-experts feed-forward layer with shared experts (DeepSeek-V3, DeepSeek-AI 2024, 2.1.2).

For a token's input u_t (D,) and E routed experts with centroids e_i (router rows),

    s_{i,t} = sigmoid(u_t^T e_i)                 (``scoring="sigmoid"``, DeepSeek-V3)
            = softmax_i(u_t^T e_i)               (``scoring="softmax"``, Switch / DeepSeek-V2)
    TopK_t  = the k experts with the largest s_{i,t} + b_i
    g_{i,t} = rho * s_{i,t} / sum_{j in TopK_t} s_{j,t}    for i in TopK_t, else 0
    MoE(u_t) = sum_{s shared} FFN_s(u_t) + sum_i g_{i,t} FFN_i(u_t)

and the decoder layer adds the residual, h_t = u_t + MoE(u_t). FFN is SwiGLU,
W_down (silu(W_gate u) * W_up u). The bias b (``gate.e_score_correction_bias``) only chooses the
experts, never weighs them; ``norm_topk_prob=False`` drops the division (g = rho s) and rho is
``routed_scaling_factor``. Group-limited routing (``n_group`` G, ``topk_group`` M): the E experts
form G groups of E / G, a group's score is the sum of its two largest s + b, only the experts of
the M best groups may be chosen.

Balancing, two ways:

    auxiliary-loss-free (Wang et al. 2024): after each optimizer step, with load_i the number of
        tokens routed to expert i in the batch,  b_i <- b_i + gamma * sign(mean_j load_j - load_i)
    load-balancing loss (Switch Transformer, Fedus et al. 2021; GShard):
        L_bal = alpha * E * sum_i f_i P_i,   f_i = load_i / (T k),   P_i = mean_t p_{i,t}
    with p_{i,t} = s_{i,t} / sum_j s_{j,t} (the scores normalised over all experts, which is
    the softmax itself for softmax scoring; DeepSeek-V3's complementary loss normalises sigmoid
    scores the same way). With this f, sum_i f_i = 1 and L_bal / alpha = 1 at uniform routing;
    DeepSeek-V3's f'_i = E load_i / (k T) with L = alpha sum_i f'_i P_i is the same number.

Capacity: no token is dropped. :func:`expert_load` counts the tokens each expert receives and
:func:`capacity_factor` reports max_i load_i / (T k / E), the largest load relative to the
balanced one, the factor a capacity-limited implementation would need to drop nothing.

Parameter names are transformers' ``DeepseekV3MoE`` (transformers 5 fuses each expert's
matrices into 3-D tensors): ``gate.weight`` (E, D), the buffer ``gate.e_score_correction_bias``
(E,), ``experts.gate_up_proj`` (E, 2I, D) whose rows are W_gate then W_up, ``experts.down_proj``
(E, D, I), and ``shared_experts.{gate,up,down}_proj.weight`` (a SwiGLU of width n_shared I).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlatlas.core import distributed
from mlatlas.nn.layers import SwiGLU

SCORINGS = ("sigmoid", "softmax")
BALANCES = ("bias", "aux", "none")


def router_scores(logits: torch.Tensor, scoring: str = "sigmoid") -> torch.Tensor:
    """(T, E) router logits u_t^T e_i -> affinities s (T, E), sigmoid or softmax."""
    if scoring == "sigmoid":
        return logits.sigmoid()
    if scoring == "softmax":
        return logits.softmax(dim=-1)
    raise ValueError(f"scoring {scoring!r} is not one of {SCORINGS}")


def check_routing(n_experts: int, k: int, n_group: int = 1, topk_group: int = 1) -> None:
    """ValueError unless top-k of E experts in G groups, M kept, is possible: G divides E,
    1 <= M <= G and k <= M E / G."""
    if (n_group < 1 or n_experts % n_group or not 1 <= topk_group <= n_group
            or not 1 <= k <= n_experts * topk_group // n_group):
        raise ValueError(f"cannot route {n_experts} experts in {n_group} groups, {topk_group} "
                         f"of them kept, to top-{k}")


def route(scores: torch.Tensor, bias: torch.Tensor | None, k: int, *, n_group: int = 1,
          topk_group: int = 1, norm_topk_prob: bool = True,
          routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Affinities s (T, E) and selection bias b (E,) or None -> (g (T, k), indices (T, k)).

    Indices are ordered by decreasing s + b; g = rho s / sum_topk s (or rho s without
    ``norm_topk_prob``). With n_group G > 1 only experts of the ``topk_group`` groups with the
    largest sum of their two best s + b are eligible."""
    if scores.dim() != 2:
        raise ValueError(f"route needs (tokens, experts) scores, got {tuple(scores.shape)}")
    T, E = scores.shape
    check_routing(E, k, n_group, topk_group)
    if bias is not None and bias.shape != (E,):
        raise ValueError(f"bias must be ({E},), got {tuple(bias.shape)}")
    choice = scores if bias is None else scores + bias
    if n_group > 1:
        grouped = choice.view(T, n_group, E // n_group)
        group_score = grouped.topk(min(2, E // n_group), dim=-1).values.sum(-1)
        kept = group_score.topk(topk_group, dim=-1).indices
        group_ok = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)
        eligible = group_ok[:, :, None].expand_as(grouped).reshape(T, E)
        choice = choice.masked_fill(~eligible, float("-inf"))
    indices = choice.topk(k, dim=-1).indices
    g = scores.gather(1, indices)
    if norm_topk_prob:
        # A sigmoid can underflow to 0 in float32; the tiny term keeps 0 / 0 out.
        g = g / (g.sum(-1, keepdim=True) + 1e-20)
    return g * routed_scaling_factor, indices


def expert_load(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(T, k) chosen experts -> (E,) float number of tokens routed to each expert."""
    return torch.bincount(indices.reshape(-1), minlength=n_experts).float()


def capacity_factor(load: torch.Tensor, k: int) -> float:
    """max_i load_i / (T k / E): 1 is perfectly balanced, E / k the worst (every token to the
    same k experts). ``load`` (E,) from :func:`expert_load` over T tokens."""
    balanced = load.sum() / load.numel()
    return float(load.max() / balanced) if balanced > 0 else 0.0


def balance_bias_update(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """b_i + gamma * sign(mean load - load_i): overloaded experts become less likely picks."""
    if bias.shape != load.shape:
        raise ValueError(f"bias {tuple(bias.shape)} and load {tuple(load.shape)} differ")
    return bias + gamma * torch.sign(load.mean() - load)


def load_balancing_loss(probs: torch.Tensor, indices: torch.Tensor, n_experts: int,
                        alpha: float = 1.0) -> torch.Tensor:
    """alpha E sum_i f_i P_i for probabilities p (T, E) (rows summing to 1) and the chosen
    experts (T, k): f_i = load_i / (T k), P_i = mean_t p_{i,t}. Gradients reach p only."""
    if probs.dim() != 2 or probs.shape[1] != n_experts or indices.shape[0] != probs.shape[0]:
        raise ValueError(f"need probs (T, {n_experts}) and indices (T, k), got "
                         f"{tuple(probs.shape)} and {tuple(indices.shape)}")
    f = expert_load(indices, n_experts) / indices.numel()
    return alpha * n_experts * (f * probs.mean(0)).sum()


class TopkRouter(nn.Module):
    """The router: centroids ``weight`` (E, D) and the selection bias buffer."""

    def __init__(self, dim: int, n_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_experts, dim))
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(T, D) -> router logits (T, E), in float32 at least whatever the activations'
        precision, since near ties between experts decide the selection."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.linear(x.to(dtype), self.weight.to(dtype))


class Experts(nn.Module):
    """E SwiGLU experts of width I stored as 3-D tensors (transformers' fused layout)."""

    def __init__(self, dim: int, hidden_dim: int, n_experts: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def forward(self, x: torch.Tensor, g: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """sum_j g_{t,j} FFN_{indices_{t,j}}(x_t): x (T, D), g and indices (T, k) -> (T, D).

        The T k token-expert pairs are sorted by expert, so each expert runs one matmul over
        its contiguous block of tokens (a loop over the E experts, never over tokens); the
        outputs are put back in pair order by one gather and summed over each token's k pairs
        (no scatter, whose CPU backward is slow)."""
        T, k = indices.shape
        E = self.gate_up_proj.shape[0]
        order = indices.reshape(-1).argsort(stable=True)
        weight = g.reshape(-1)[order].to(x.dtype)
        counts = torch.bincount(indices.reshape(-1), minlength=E).tolist()
        xs = x[order // k]
        ys, start = [], 0
        for e, count in enumerate(counts):
            if count:
                gate, up = F.linear(xs[start:start + count], self.gate_up_proj[e]).chunk(2, -1)
                ys.append(F.linear(F.silu(gate) * up, self.down_proj[e]))
            start += count
        y = torch.cat(ys) * weight[:, None]
        return y[order.argsort()].view(T, k, -1).sum(1)


class MoE(nn.Module):
    """MoE(u) of the module text for inputs (..., D); see :func:`route` for the routing
    arguments. ``balance`` "bias" keeps the load for :meth:`update_bias`, "aux" also computes
    ``last_aux_loss`` (alpha = ``aux_loss_alpha``) for the trainer to add, "none" neither
    changes anything. After each forward ``last_load`` (E,) and ``last_capacity`` describe
    the routed tokens (those of ``token_mask`` when given)."""

    def __init__(self, dim: int, hidden_dim: int, n_routed_experts: int,
                 n_shared_experts: int = 1, num_experts_per_tok: int = 2, *, n_group: int = 1,
                 topk_group: int = 1, norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 1.0, scoring: str = "sigmoid",
                 balance: str = "bias", bias_update_speed: float = 1e-3,
                 aux_loss_alpha: float = 0.01):
        super().__init__()
        if scoring not in SCORINGS or balance not in BALANCES:
            raise ValueError(f"scoring {scoring!r} must be one of {SCORINGS} and balance "
                             f"{balance!r} one of {BALANCES}")
        check_routing(n_routed_experts, num_experts_per_tok, n_group, topk_group)
        self.n_experts, self.k = n_routed_experts, num_experts_per_tok
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        self.scoring, self.balance = scoring, balance
        self.bias_update_speed, self.aux_loss_alpha = bias_update_speed, aux_loss_alpha
        self.gate = TopkRouter(dim, n_routed_experts)
        nn.init.normal_(self.gate.weight, std=0.02)
        self.experts = Experts(dim, hidden_dim, n_routed_experts)
        self.shared_experts = (SwiGLU(dim, hidden_dim * n_shared_experts)
                               if n_shared_experts else None)
        self.last_load: torch.Tensor | None = None
        self.last_capacity: float | None = None
        self.last_aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(..., D) -> (..., D). ``token_mask`` (...,) marks the tokens counted in the load and
        the auxiliary loss (padding is routed, and computed, but not counted)."""
        shape = x.shape
        u = x.reshape(-1, shape[-1])
        s = router_scores(self.gate(u), self.scoring)
        g, indices = route(s, self.gate.e_score_correction_bias, self.k, n_group=self.n_group,
                           topk_group=self.topk_group, norm_topk_prob=self.norm_topk_prob,
                           routed_scaling_factor=self.routed_scaling_factor)
        out = self.experts(u, g, indices)
        if self.shared_experts is not None:
            out = out + self.shared_experts(u)
        counted = slice(None)
        if token_mask is not None:
            if token_mask.shape != shape[:-1]:
                raise ValueError(f"token_mask {tuple(token_mask.shape)} must be the inputs' "
                                 f"{tuple(shape[:-1])}")
            counted = token_mask.reshape(-1).bool()
        self.last_load = expert_load(indices[counted].detach(), self.n_experts)
        self.last_capacity = capacity_factor(self.last_load, self.k)
        if self.balance == "aux":
            p = s[counted]
            p = p / p.sum(-1, keepdim=True)
            self.last_aux_loss = load_balancing_loss(p, indices[counted], self.n_experts,
                                                     self.aux_loss_alpha)
        return out.reshape(shape)

    @torch.no_grad()
    def update_bias(self) -> None:
        """b <- b + gamma sign(mean load - load) from the last forward's load (balance "bias"
        only; a trainer calls it after optimizer.step()). In a data-parallel job the load is
        the whole batch's, summed over the ranks (every rank calls this together), so the
        biases stay equal on every rank."""
        if self.balance != "bias" or self.last_load is None:
            return
        bias = self.gate.e_score_correction_bias
        load = distributed.all_reduce_sum(self.last_load.to(bias.device))
        bias.copy_(balance_bias_update(bias, load, self.bias_update_speed))
