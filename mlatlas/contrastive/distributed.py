"""Contrastive losses across processes with ``torch.distributed``: CLIP, SigLIP, NT-Xent, and the
all-gather with gradient that they, CPC's InfoNCE and BLIP's matching loss build on.

W processes (ranks r = 0..W-1) each hold a local batch of n pairs, with L2-normalised image
features x and text features y (n, D); the global batch has N = W n pairs, rank r's pairs being
rows r n .. r n + n - 1 of the concatenated batch. Every rank must hold the same n.

CLIP (Radford et al. 2021), by all-gather. Each rank gathers every rank's features,
X = [x^(0); ...; x^(W-1)] and Y likewise (N, D), and scores its own rows against all columns in
both directions, the label of local row i being the global index r n + i:

    L_r = (CE(s x^(r) Y^T, r n + i) + CE(s y^(r) X^T, r n + i)) / 2,   s = exp(t) <= 100,

so (1/W) sum_r L_r is exactly the single-process CLIP loss of the N pairs. The all-gather keeps
gradients: its backward sums every rank's gradient with respect to the gathered (N, D) features
(an all-reduce) and hands each rank its own n rows, so d(sum_r L_r)/dx^(r) reaches the rank that
owns x^(r). Memory per rank: the gathered (N, D) features and two n x N logit matrices.

SigLIP (Zhai et al. 2023, section 3.3), by a ring exchange of text blocks. The loss is a sum over
pairs, so it splits into W x W blocks of n x n pairs; only the diagonal blocks hold positives:

    S_r = sum_{k=0}^{W-1} sum_i sum_j log(1 + exp(-z_ij (t x_i^(r) . y_j^(r-k) + b))),
    z_ij = +1 if k = 0 and i = j, else -1;   t = exp(t'),
    L_r = S_r / n,   (1/W) sum_r L_r = (1/N) sum_r S_r = the single-process SigLIP loss.

Rank r first scores its images against its own texts (k = 0), then W - 1 times sends the text
block it holds to rank r + 1 and receives one from rank r - 1 (isend/irecv, mod W), scoring each
received block as all negatives. The backward pass runs the ring the opposite way: starting from
the last block it held, rank r recomputes that block's n x n logits, adds its gradient with respect
to those texts to an accumulator that travels with the block, and passes block and accumulator to
rank r - 1; after W - 1 steps every text block is home with d(sum_r S_r)/dy^(r). Per rank only
one n x n block of logits and a few (n, D) buffers are alive at a time (the forward pass keeps no
block for the backward pass, at the cost of recomputing each block once), never the N columns.
Sending the next block overlaps with scoring the current one.

NT-Xent (Chen et al. 2020, SimCLR), by all-gather. Rank r holds two views of its n images,
normalised to u1^(r), u2^(r); the gathered U1, U2 (N, D) give the 2N keys K = [U1; U2]. Rank r's
2n queries q = [u1^(r); u2^(r)] sit at the global rows r n + i and N + r n + i, whose positives
are each other, and each query's own column leaves the softmax:

    L_r = 1/(2n) sum_{q} -log( exp(q . k_pos / tau) / sum_{k in K, k != q} exp(q . k / tau) ),

so (1/W) sum_r L_r = 1/(2N) sum over all 2N views, the single-process NT-Xent.

``all_gather_with_grad`` is the gather of CLIP's loss on its own: every rank's rows of any
(n, ...) tensor, concatenated in rank order, whose backward pass hands each rank the sum over
ranks of the gradient of its rows. CPC scores its predictions against every rank's latents with
it, and BLIP picks the images of its hard negatives from every rank's image tokens.

All the losses return the per-rank loss L_r whose mean over ranks is the single-process loss.
That is what an average of the parameter gradients over ranks wants (DistributedDataParallel's,
or ``mlatlas.core.distributed.all_reduce_gradients`` in the trainers): the parameters receive
d((1/W) sum_r L_r)/dtheta, the gradient of the full-batch loss. (The gradient that reaches rank
r's local features is W times the full-batch loss's; the average's 1/W undoes it.) When
``torch.distributed`` is not initialised or the group has one process, they reduce to the plain
``clip_loss``, ``siglip_loss`` and ``nt_xent`` of ``mlatlas.contrastive.losses``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mlatlas.contrastive.losses import (
    CLIP_LOGIT_SCALE_MAX,
    clip_loss,
    nt_xent,
    siglip_block_loss,
    siglip_loss,
)


def _world(group) -> tuple[int, int] | None:
    """(rank, world size) in ``group``, or None when there is nothing to distribute over."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size(group)
    return (dist.get_rank(group), world) if world > 1 else None


def _global_rank(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _check_local_batches(name: str, x: torch.Tensor, y: torch.Tensor, group, world: int) -> None:
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"{name} needs two (n, D) tensors of one shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    # Collectives on unequal shapes fail obscurely or hang, so every rank compares all shapes
    # first and they all raise the same error together.
    shape = torch.tensor(x.shape, dtype=torch.int64, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    if any(not torch.equal(s, shape) for s in shapes):
        raise ValueError(f"{name} needs equal local batches on every rank, got (n, D) = "
                         f"{[tuple(s.tolist()) for s in shapes]}")


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's (n, D) tensor into (W n, D); the backward pass returns each rank
    the sum over ranks of the gradient of its n rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, rank: int, world: int) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.n = group, rank, len(x)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # A reduce-scatter would move n D numbers a rank instead of N D, but not every backend
        # of every torch the library supports has one; the all-reduce works everywhere.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None, None, None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's (n, ...) ``x`` concatenated in rank order, (W n, ...), this rank's rows at
    r n .. r n + n - 1; the backward pass returns each rank the sum over ranks of the gradient of
    its rows. Every rank must pass the same shape. Without a group of several processes: ``x``."""
    world = _world(group)
    if world is None:
        return x
    rank, size = world
    return _AllGather.apply(x, group, rank, size)


def clip_loss_distributed(image_features: torch.Tensor, text_features: torch.Tensor,
                          logit_scale: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's CLIP loss L_r: its n pairs' rows against all N gathered columns, in both
    directions. The mean of L_r over ranks is ``clip_loss`` of the concatenated batch."""
    world = _world(group)
    if world is None:
        return clip_loss(image_features, text_features, logit_scale)
    rank, size = world
    _check_local_batches("clip_loss_distributed", image_features, text_features, group, size)
    n, d = image_features.shape
    x, y = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    # One collective for both modalities: gather [x | y] and split the columns.
    gathered = _AllGather.apply(torch.cat([x, y], dim=1), group, rank, size)
    X, Y = gathered[:, :d], gathered[:, d:]
    s = logit_scale.exp().clamp(max=CLIP_LOGIT_SCALE_MAX)
    labels = torch.arange(rank * n, (rank + 1) * n, device=x.device)
    return (F.cross_entropy(s * x @ Y.T, labels) + F.cross_entropy(s * y @ X.T, labels)) / 2


def nt_xent_distributed(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5,
                        group=None) -> torch.Tensor:
    """This rank's NT-Xent L_r: its 2n views against all 2N gathered ones. The mean of L_r over
    ranks is ``nt_xent`` of the concatenated pairs."""
    world = _world(group)
    if world is None:
        return nt_xent(z1, z2, temperature)
    rank, size = world
    _check_local_batches("nt_xent_distributed", z1, z2, group, size)
    n, d = z1.shape
    u1, u2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    gathered = _AllGather.apply(torch.cat([u1, u2], dim=1), group, rank, size)
    keys = torch.cat([gathered[:, :d], gathered[:, d:]])  # [U1; U2], (2N, D)
    logits = torch.cat([u1, u2]) @ keys.T / temperature   # (2n, 2N)
    # The queries' own columns (global rows r n + i and N + r n + i) leave the softmax; the
    # positive of each view is the other view of its image.
    mine = torch.arange(rank * n, (rank + 1) * n, device=z1.device)
    own = torch.cat([mine, mine + n * size])
    rows = torch.arange(2 * n, device=z1.device)
    itself = torch.zeros_like(logits, dtype=torch.bool)
    itself[rows, own] = True
    return F.cross_entropy(logits.masked_fill(itself, float("-inf")), own.roll(n))


def _exchange(send: list[torch.Tensor], receive: list[torch.Tensor], to: int, source: int,
              group) -> list:
    ops = [dist.P2POp(dist.isend, t, to, group) for t in send]
    ops += [dist.P2POp(dist.irecv, t, source, group) for t in receive]
    return dist.batch_isend_irecv(ops)


def _wait(requests: list) -> None:
    for request in requests:
        request.wait()


class _SigLIPRing(torch.autograd.Function):
    """S_r: this rank's normalised images x against every rank's texts, the texts travelling
    round the ring; the backward pass sends text gradients the opposite way round."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, t_prime: torch.Tensor,
                bias: torch.Tensor, group, rank: int, world: int) -> torch.Tensor:
        following = _global_rank(group, (rank + 1) % world)
        preceding = _global_rank(group, (rank - 1) % world)
        n = len(x)
        y_k = y.contiguous()
        loss = x.new_zeros(())
        for k in range(world):
            if k + 1 < world:  # start passing the block on while it is scored
                y_next = torch.empty_like(y_k)
                requests = _exchange([y_k], [y_next], following, preceding, group)
            # Offset n puts the block's "diagonal" past its last image: all pairs negative.
            loss += siglip_block_loss(x, y_k, t_prime, bias, 0 if k == 0 else n)
            if k + 1 < world:
                _wait(requests)
                y_k = y_next
        ctx.save_for_backward(x, y, t_prime, bias, y_k)
        ctx.ring = group, world, following, preceding
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        x, y, t_prime, bias, y_k = ctx.saved_tensors
        group, world, following, preceding = ctx.ring
        n = len(x)
        leaves = [a.detach().requires_grad_() for a in (x, t_prime, bias)]
        grad_x, grad_t, grad_b = (torch.zeros_like(a) for a in leaves)
        # d(sum_r S_r)/dy of the block this rank holds, summed over the ranks it has visited.
        grad_y_k = torch.zeros_like(y_k)
        for k in range(world - 1, -1, -1):
            if k > 1:  # the block goes back to rank r - 1 while this rank scores it
                y_back = torch.empty_like(y_k)
                requests = _exchange([y_k], [y_back], preceding, following, group)
            y_leaf = (y if k == 0 else y_k).detach().requires_grad_()
            with torch.enable_grad():
                block = siglip_block_loss(leaves[0], y_leaf, leaves[1], leaves[2],
                                          0 if k == 0 else n)
                g_x, g_y, g_t, g_b = torch.autograd.grad(block, [leaves[0], y_leaf, *leaves[1:]])
            grad_x += g_x
            grad_t += g_t
            grad_b += g_b
            grad_y_k += g_y
            if k > 0:
                # Rank r - 1 scores this block at step k - 1, so its gradient so far goes
                # there too; at k = 1 that rank owns the block, and only the gradient travels.
                grad_back = torch.empty_like(grad_y_k)
                _wait(_exchange([grad_y_k], [grad_back], preceding, following, group))
                grad_y_k = grad_back
                if k > 1:
                    _wait(requests)
                    y_k = y_back
        return (grad_x * grad_loss, grad_y_k * grad_loss, grad_t * grad_loss,
                grad_b * grad_loss, None, None, None)


def siglip_loss_distributed(image_features: torch.Tensor, text_features: torch.Tensor,
                            t_prime: torch.Tensor, bias: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's SigLIP loss L_r = S_r / n: its n images against every rank's texts, passed
    round a ring of isend/irecv. The mean of L_r over ranks is ``siglip_loss`` of the
    concatenated batch; per rank memory is one n x n block, not n x N."""
    world = _world(group)
    if world is None:
        return siglip_loss(image_features, text_features, t_prime, bias)
    rank, size = world
    _check_local_batches("siglip_loss_distributed", image_features, text_features, group, size)
    x, y = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    t_prime = torch.as_tensor(t_prime, dtype=x.dtype, device=x.device)
    bias = torch.as_tensor(bias, dtype=x.dtype, device=x.device)
    return _SigLIPRing.apply(x, y, t_prime, bias, group, rank, size) / len(x)
