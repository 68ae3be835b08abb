r"""Vector quantisation (van den Oord et al. 2017, "Neural Discrete Representation Learning").

A codebook e = (e_1, ..., e_K) of K vectors in R^D. Each encoder output vector z_e (one per
latent position) is replaced by its nearest code,

    k = argmin_j ||z_e - e_j||^2,      z_q = e_k,

computed as ||z_e||^2 - 2 z_e . e_j + ||e_j||^2 for all positions and codes at once.

The argmin has no gradient, so the straight-through estimator copies the decoder's gradient to
the encoder: the forward value is z_q, the backward pass is the identity,

    z_q^ST = z_e + sg[z_q - z_e],     dL/dz_e = dL/dz_q^ST.

The loss adds to the reconstruction term

    ||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2,     beta = 0.25,

the first (the codebook loss) moving only the codes towards the encoder outputs, the second (the
commitment loss) only the encoder towards its codes; each is the mean over positions and
dimensions (as ``F.mse_loss``).

EMA codebook (the paper's appendix; Razavi et al. 2019). Instead of the codebook loss, each code
is the running mean of the encoder outputs assigned to it: with n_i the count of positions
assigned to code i in the batch and decay gamma,

    N_i <- gamma N_i + (1 - gamma) n_i,
    m_i <- gamma m_i + (1 - gamma) sum_{z_e -> i} z_e,
    N~_i = (N_i + eps) / (sum_j N_j + K eps) sum_j N_j     (Laplace smoothing, eps = 1e-5),
    e_i = m_i / N~_i,

started at N_i = 1, m_i = e_i. The smoothing keeps a code that is never chosen from a division by
zero; such a code stays where it is (dead).

Dead codes. A code no position chose for ``window`` consecutive training steps is reset to a
random encoder output of the batch (N_i = 1, m_i = the new e_i for the EMA variant).

Code usage and perplexity: with p_i the fraction of positions assigned to code i,
usage = #{i : p_i > 0} / K and perplexity = exp(-sum_i p_i log p_i) (0 log 0 = 0), which is K for
a uniform use of the codes and 1 when a single code takes every position.

In a data-parallel job the counts n_i and sums are added over the ranks before the EMA update and
the dead-code bookkeeping, and restarts draw from the encoder outputs of every rank, so all ranks
keep one codebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mlatlas.core import distributed

BETA = 0.25
DECAY = 0.99
EPS = 1e-5


# --- pure functions ------------------------------------------------------------------------------

def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin_j ||z_n - e_j||^2 for (N, D) vectors and a (K, D) codebook: (N,) indices."""
    if z.ndim != 2 or codebook.ndim != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"nearest_code needs (N, D) vectors and a (K, D) codebook, got "
                         f"{tuple(z.shape)} and {tuple(codebook.shape)}")
    distances = (z.pow(2).sum(1, keepdim=True) - 2 * z @ codebook.t()
                 + codebook.pow(2).sum(1)[None])
    return distances.argmin(1)


def straight_through(z_e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """z_e + sg[z_q - z_e]: the value of z_q, the gradient of z_e."""
    return z_e + (z_q - z_e).detach()


def codebook_loss(z_e: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """||sg[z_e] - e||^2 (mean): its gradient reaches the codes only."""
    return F.mse_loss(e, z_e.detach())


def commitment_loss(z_e: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """||z_e - sg[e]||^2 (mean): its gradient reaches the encoder only (times beta in the loss)."""
    return F.mse_loss(z_e, e.detach())


def code_counts(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """How many positions chose each code: (K,) float counts of any-shaped indices."""
    return torch.bincount(indices.reshape(-1), minlength=codebook_size).float()


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(-sum_i p_i log p_i), p = counts / sum(counts): K for uniform use, 1 for one code."""
    p = counts / counts.sum()
    return torch.exp(-torch.special.xlogy(p, p).sum())


def usage(counts: torch.Tensor) -> torch.Tensor:
    """The fraction of codes chosen at least once."""
    return (counts > 0).float().mean()


def ema_update(cluster_size: torch.Tensor, embed_sum: torch.Tensor, z: torch.Tensor,
               indices: torch.Tensor, decay: float = DECAY,
               eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One EMA step of the codebook statistics for (N, D) vectors ``z`` assigned to codes
    ``indices`` (N,): returns the new N (K,), m (K, D) and codebook e = m / N~ (K, D)."""
    n = distributed.all_reduce_sum(code_counts(indices, len(cluster_size)).to(z.dtype))
    sums = distributed.all_reduce_sum(torch.zeros_like(embed_sum).index_add_(0, indices, z))
    cluster_size = decay * cluster_size + (1 - decay) * n
    embed_sum = decay * embed_sum + (1 - decay) * sums
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + len(cluster_size) * eps) * total
    return cluster_size, embed_sum, embed_sum / smoothed[:, None]


def restart_codes(codebook: torch.Tensor, dead: torch.Tensor, z: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The (K, D) codebook with the rows where ``dead`` (K,) holds replaced by encoder outputs
    drawn uniformly, with replacement, from the (N, D) vectors ``z``."""
    picks = torch.randint(len(z), (int(dead.sum()),), generator=generator).to(z.device)
    codebook = codebook.clone()
    codebook[dead] = z[picks].to(codebook.dtype)
    return codebook


# --- the layer -----------------------------------------------------------------------------------

@dataclass
class Quantized:
    """The quantiser's output for z_e (B, D, h, w): ``z_q`` (B, D, h, w) with the straight-through
    gradient, ``indices`` (B, h, w), the unweighted ``codebook_loss`` and ``commitment_loss``, the
    ``loss`` it adds (codebook loss, none for the EMA codebook, + beta commitment loss), the code
    ``counts`` (K,) of the batch and the encoder outputs ``z`` (B h w, D), detached."""

    z_q: torch.Tensor
    indices: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    loss: torch.Tensor
    counts: torch.Tensor
    z: torch.Tensor


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation of (B, D, h, w) maps with a (K, D) codebook, learnt by the
    codebook loss (``ema=False``, the codebook a parameter) or by EMA (a buffer, updated in
    every forward pass in training mode after the codes are looked up: z_q holds the codes
    before the update, as in Sonnet and vector-quantize-pytorch)."""

    def __init__(self, codebook_size: int, dim: int, beta: float = BETA, ema: bool = False,
                 decay: float = DECAY, eps: float = EPS, dead_window: int = 0):
        super().__init__()
        self.codebook_size, self.dim, self.beta = codebook_size, dim, beta
        self.ema, self.decay, self.eps, self.dead_window = ema, decay, eps, dead_window
        init = torch.empty(codebook_size, dim).uniform_(-1 / codebook_size, 1 / codebook_size)
        if ema:
            self.register_buffer("codebook", init)
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        # Consecutive training steps each code went unchosen (the dead-code clock).
        self.register_buffer("unused_steps", torch.zeros(codebook_size, dtype=torch.long))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of (B, h, w) indices as a (B, D, h, w) map."""
        if indices.dtype != torch.long or indices.ndim != 3:
            raise ValueError(f"code indices must be a (B, h, w) LongTensor, got "
                             f"{tuple(indices.shape)} {indices.dtype}")
        if len(indices) and (indices.min() < 0 or indices.max() >= self.codebook_size):
            raise ValueError(f"code indices must lie in 0..{self.codebook_size - 1}")
        return self.codebook[indices].permute(0, 3, 1, 2)

    def forward(self, z_e: torch.Tensor) -> Quantized:
        if z_e.ndim != 4 or z_e.shape[1] != self.dim:
            raise ValueError(f"the quantiser takes (B, {self.dim}, h, w) maps, got "
                             f"{tuple(z_e.shape)}")
        with torch.autocast(z_e.device.type, enabled=False):
            z_e = z_e.float()
            z = z_e.permute(0, 2, 3, 1).reshape(-1, self.dim)
            indices = nearest_code(z.detach(), self.codebook.detach())
            b, _, h, w = z_e.shape
            e = self.codebook[indices].reshape(b, h, w, self.dim).permute(0, 3, 1, 2)
            book, commit = codebook_loss(z_e, e), commitment_loss(z_e, e)
            loss = self.beta * commit + (0 if self.ema else book)
            counts = code_counts(indices, self.codebook_size)
            if self.training:
                counts = distributed.all_reduce_sum(counts)
                with torch.no_grad():
                    self.unused_steps.copy_(torch.where(counts > 0, 0, self.unused_steps + 1))
                    if self.ema:
                        n, m, codebook = ema_update(self.cluster_size, self.embed_sum, z.detach(),
                                             indices, self.decay, self.eps)
                        self.cluster_size.copy_(n)
                        self.embed_sum.copy_(m)
                        self.codebook.copy_(codebook)
        return Quantized(straight_through(z_e, e), indices.reshape(b, h, w), book.detach(),
                         commit.detach(), loss, counts, z.detach())

    @torch.no_grad()
    def restart_dead(self, z: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """Reset the codes unused for ``dead_window`` steps to random rows of the (N, D) encoder
        outputs ``z`` (gathered over the ranks); returns how many were reset (0 when off)."""
        if not self.dead_window:
            return 0
        dead = self.unused_steps >= self.dead_window
        count = int(dead.sum())
        if count:
            self.codebook.data.copy_(restart_codes(self.codebook.data, dead,
                                                   distributed.all_gather(z), generator))
            self.unused_steps[dead] = 0
            if self.ema:
                self.cluster_size[dead] = 1.0
                self.embed_sum[dead] = self.codebook[dead]
        return count
