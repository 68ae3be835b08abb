"""Distributed CLIP, SigLIP and NT-Xent losses in 2 and 4 gloo processes against the
single-process losses.

One launch per world size runs every check; each process saves its losses and gradients and the
test process compares them with the losses of the concatenated batch. The gradients are compared
after the averaging over ranks that DistributedDataParallel does: the mean over ranks of the
gradients of a shared projection and of the loss's scalars, and each rank's feature gradient
divided by W (the factor DDP's average applies to whatever a rank's features feed).
"""

import functools
import math
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mlatlas.contrastive.distributed import (
    clip_loss_distributed,
    nt_xent_distributed,
    siglip_loss_distributed,
)
from mlatlas.contrastive.losses import CLIP_LOGIT_SCALE_INIT, clip_loss, nt_xent, siglip_loss

N_LOCAL, RAW, DIM = 3, 6, 5
LAUNCH_TIMEOUT_S = 120
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
# A temperature and bias off SigLIP's start (t = 10, b = -10) so that every pair's sigmoid, and
# so every gradient, is far from saturated.
T_PRIME, BIAS = math.log(4.0), -1.5
TAU = 0.3


def batch(world: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The global batch every process draws alike: raw features (N, RAW), a shared projection
    (RAW, DIM) standing in for the network, and the losses' scalars."""
    g = torch.Generator().manual_seed(world)
    return {"image": torch.randn(world * N_LOCAL, RAW, generator=g, dtype=dtype),
            "text": torch.randn(world * N_LOCAL, RAW, generator=g, dtype=dtype),
            "projection": torch.randn(RAW, DIM, generator=g, dtype=dtype),
            "logit_scale": torch.tensor(CLIP_LOGIT_SCALE_INIT - 1.0, dtype=dtype),
            "t_prime": torch.tensor(T_PRIME, dtype=dtype),
            "bias": torch.tensor(BIAS, dtype=dtype)}


def loss_and_grads(loss_fn, name: str, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    scalars = SCALARS[name]
    image, text = leaves["image"] @ leaves["projection"], leaves["text"] @ leaves["projection"]
    loss = loss_fn(image, text, *(leaves[s] for s in scalars))
    loss.backward()
    return {"loss": loss.detach(), **{k: leaves[k].grad for k in ("image", "text", "projection",
                                                                   *scalars)}}


LOSSES = {"clip": (clip_loss_distributed, clip_loss),
          "siglip": (siglip_loss_distributed, siglip_loss),
          # SimCLR's two views of each image stand in the places of the image and its caption.
          "nt_xent": (functools.partial(nt_xent_distributed, temperature=TAU),
                      functools.partial(nt_xent, temperature=TAU))}
SCALARS = {"clip": ("logit_scale",), "siglip": ("t_prime", "bias"), "nt_xent": ()}


def worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    results = {}
    for dtype in TOLERANCE:
        full = batch(world, dtype)
        local = dict(full, image=full["image"][rank * N_LOCAL:(rank + 1) * N_LOCAL],
                     text=full["text"][rank * N_LOCAL:(rank + 1) * N_LOCAL])
        for name, (distributed, _) in LOSSES.items():
            results[name, dtype] = loss_and_grads(distributed, name, local)
    if world == 4:
        # Two rings of two, {0, 2} and {1, 3}, each over the 2-process batch: the group's own
        # ranks, not the global ones, place the rows and pick the neighbours.
        groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        full = batch(2, torch.float64)
        member = slice(rank // 2 * N_LOCAL, (rank // 2 + 1) * N_LOCAL)
        local = dict(full, image=full["image"][member], text=full["text"][member])
        for name, (distributed, _) in LOSSES.items():
            results[name, "subgroup"] = loss_and_grads(
                functools.partial(distributed, group=groups[rank % 2]), name, local)
    # Rank 0 holds one pair more than the others: every rank must raise, none may hang.
    n = N_LOCAL + (rank == 0)
    x, y = torch.randn(n, DIM), torch.randn(n, DIM)
    for name, (distributed, _) in LOSSES.items():
        try:
            distributed(x, y, *[torch.tensor(0.0)] * len(SCALARS[name]))
            results[name, "unequal"] = "no error"
        except ValueError as error:
            results[name, "unequal"] = str(error)
    torch.save(results, f"{out}/{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """launch(W) -> each rank's saved results, from one launch of W gloo processes per W."""
    done = {}

    def run(world: int) -> list[dict]:
        if world not in done:
            folder = tmp_path_factory.mktemp(f"world{world}")
            # fork: the processes share this one's imported torch instead of importing it W
            # times (the file takes 3 s instead of 40 s on two busy cores); they run CPU code.
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            context = mp.start_processes(worker, args=(world, str(folder / "init"), str(folder)),
                                         nprocs=world, join=False, start_method=method)
            deadline = time.monotonic() + LAUNCH_TIMEOUT_S
            while not context.join(timeout=1):
                if time.monotonic() > deadline:
                    for process in context.processes:
                        process.kill()
                    pytest.fail(f"{world} gloo processes did not finish in {LAUNCH_TIMEOUT_S} s")
            done[world] = [torch.load(folder / f"{r}.pt") for r in range(world)]
        return done[world]

    return run


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("world", [2, 4])
def test_distributed_loss_and_gradients_equal_single_process(launch, world, name, dtype):
    results = launch(world)
    per_rank = [r[name, dtype] for r in results]
    full = batch(world, dtype)
    expected = loss_and_grads(LOSSES[name][1], name, full)
    tol = {"rtol": TOLERANCE[dtype], "atol": TOLERANCE[dtype]}

    # The per-rank losses differ; their mean is the loss of the whole batch.
    losses = torch.stack([r["loss"] for r in per_rank])
    assert not torch.allclose(losses, losses[0].expand_as(losses))
    torch.testing.assert_close(losses.mean(), expected["loss"], **tol)
    # What DDP's average over ranks makes of the gradients.
    for key in ("projection", "logit_scale", "t_prime", "bias"):
        if key in expected:
            averaged = torch.stack([r[key] for r in per_rank]).mean(0)
            torch.testing.assert_close(averaged, expected[key], **tol)
    for key in ("image", "text"):
        gathered = torch.cat([r[key] for r in per_rank]) / world
        torch.testing.assert_close(gathered, expected[key], **tol)


@pytest.mark.parametrize("name", list(LOSSES))
def test_process_subgroups(launch, name):
    results = launch(4)
    expected = loss_and_grads(LOSSES[name][1], name, batch(2, torch.float64))
    for members in ([0, 2], [1, 3]):
        per_rank = [results[r][name, "subgroup"] for r in members]
        torch.testing.assert_close(torch.stack([r["loss"] for r in per_rank]).mean(),
                                   expected["loss"], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(torch.cat([r["text"] for r in per_rank]) / 2,
                                   expected["text"], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("world", [2, 4])
def test_unequal_local_batches_raise_on_every_rank(launch, world, name):
    results = launch(world)
    sizes = str([(N_LOCAL + 1, DIM)] + [(N_LOCAL, DIM)] * (world - 1))
    for result in results:
        assert "equal local batches" in result[name, "unequal"]
        assert sizes in result[name, "unequal"]


def test_without_a_process_group_the_plain_losses():
    assert not dist.is_initialized()
    full = batch(2, torch.float64)
    for name, (distributed, plain) in LOSSES.items():
        got, expected = (loss_and_grads(f, name, full) for f in (distributed, plain))
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
