"""Drawing the next token from logits: greedy, temperature, top-k and nucleus (top-p) sampling.

For logits z (B, V) the token is drawn from

    p_i  proportional to  exp(z_i / T)                          (temperature T; T = 0 is greedy)
    top-k:  p_i = 0 unless z_i is among the k largest           (Fan et al. 2018)
    top-p:  keep the smallest set of most likely tokens whose mass reaches p (Holtzman et al.
            2020); a token stays if the mass of the tokens more likely than it is below p, so the
            most likely token always stays and a tiny p is greedy decoding

applied in that order, as transformers' generate applies them. The language model and BLIP's
captioner both draw through :func:`sample_token`, so "greedy" means one thing: temperature 0.

The draw itself is the exponential race (the Gumbel-max trick, exponentiated): with
q_i ~ Exp(1) independent,

    token = argmax_i p_i / q_i        is distributed as p,

since P(p_i / q_i is the largest) = p_i / sum_j p_j. It is how ``torch.multinomial`` draws one
sample per row, computed here with the same draw of q, so the tokens and the generator's state
are bitwise those of ``torch.multinomial(p, 1)``. Written out, q can be the *global* batch's draw
of a data-parallel job (``sharded``): every rank draws q for all rows and keeps its own, so the
tokens a rank samples for its rows are those a one-process run samples for them.
"""

from __future__ import annotations

import torch

from mlatlas.core import distributed


def sample_token(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, *, top_k: int = 0,
                 sharded: bool = False) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. ``generator`` may live on another device than the
    logits (a CPU generator for reproducible draws on a GPU). ``sharded``: the B rows are this
    rank's shard of a data-parallel job's global batch, and the random numbers drawn are the
    global batch's (the same on every rank)."""
    if logits.dim() != 2:
        raise ValueError(f"sample_token needs (batch, vocab) logits, got {tuple(logits.shape)}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1 and top_k >= 0; got "
                         f"{temperature}, {top_p}, {top_k}")
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if 0 < top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]
        probs = probs * (probs >= kth)
        probs = probs / probs.sum(-1, keepdim=True)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
    device = generator.device if generator is not None else probs.device
    probs = probs.to(device)
    # q for the global batch's rows (this rank's B of them kept), or for these B rows.
    rows = len(probs) * distributed.world_size() if sharded else len(probs)
    q = probs.new_empty((rows, probs.shape[1])).exponential_(generator=generator)
    if sharded:
        q = distributed.shard(q)
    return (probs / q).argmax(-1).to(logits.device)
