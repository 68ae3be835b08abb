"""Drawing the next token from logits: greedy, temperature, top-k and nucleus (top-p) sampling.

For logits z (B, V) the token is drawn from

    p_i  proportional to  exp(z_i / T)                          (temperature T; T = 0 is greedy)
    top-k:  p_i = 0 unless z_i is among the k largest           (Fan et al. 2018)
    top-p:  keep the smallest set of most likely tokens whose mass reaches p (Holtzman et al.
            2020); a token stays if the mass of the tokens more likely than it is below p, so the
            most likely token always stays and a tiny p is greedy decoding

applied in that order, as transformers' generate applies them. The language model and BLIP's
captioner both draw through :func:`sample_token`, so "greedy" means one thing: temperature 0.
"""

from __future__ import annotations

import torch


def sample_token(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, *, top_k: int = 0) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. ``generator`` may live on another device than the
    logits (a CPU generator for reproducible draws on a GPU)."""
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
    return torch.multinomial(probs.to(device), 1, generator=generator).squeeze(-1).to(
        logits.device)
