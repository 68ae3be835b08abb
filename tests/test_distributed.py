"""Data-parallel training (core.distributed, the launcher, the generative family), mixed
precision and compile. The multi-process tests run ``mlatlas train --nproc 2`` with gloo on the
CPU and compare its checkpoints with one-process runs of the same global batch."""

import os
import signal

import pytest
import torch
import torch.multiprocessing as mp
from parallel import (
    assert_close_params,
    params,
    start,
    train,
    train_run,
    wait_for_checkpoint,
    worker_pids,
)

from mlatlas import cli
from mlatlas.core import distributed
from mlatlas.core.io import load_tensors
from mlatlas.core.precision import Precision
from mlatlas.core.run import Run
from mlatlas.generative.diffusion import configs, loop

DDPM = ("--dataset", "two-moons", "--batch-size", "64", "--eval-samples", "0",
        "--log-every", "5", "--ckpt-every", "20")


def initial_params(**overrides) -> dict[str, torch.Tensor]:
    cfg = configs.DDPMConfig(dataset="two-moons", batch_size=64, eval_samples=0, **overrides)
    return {k: v.clone() for k, v in loop.setup(cfg).model.state_dict().items()}


def assert_moved(directory, **overrides) -> None:
    start, end = initial_params(**overrides), params(directory)
    assert max(float((start[k] - end[k]).abs().max()) for k in start) > 1e-3


# the launcher and the generative family ---------------------------------------------------------

@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory):
    """60 steps of DDPM in one process: the reference the two-rank runs must equal."""
    return train_run(tmp_path_factory.mktemp("ws1"), "ddpm", *DDPM, "--steps", "60")


def test_two_ranks_equal_one_rank(one_rank_run, tmp_path):
    two = train_run(tmp_path, "ddpm", *DDPM, "--steps", "60", nproc=2)
    assert_close_params(one_rank_run, two, 1e-6)
    assert_close_params(one_rank_run, two, 1e-6, group="ema")
    assert_moved(two)
    # The logged loss is the mean over ranks, i.e. the loss of the global batch.
    rows_1, rows_2 = Run.open(one_rank_run).metrics, Run.open(two).metrics
    assert [r["step"] for r in rows_1] == [r["step"] for r in rows_2]
    for a, b in zip(rows_1, rows_2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    # Rank 0 alone wrote: one folder, no stray files from rank 1.
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one_rank_run.iterdir())


def test_resume_at_another_world_size(one_rank_run, tmp_path):
    """Two ranks to step 20, then one rank to step 60: the one-process run of 60 steps."""
    first = train_run(tmp_path, "ddpm", *DDPM, "--steps", "20", nproc=2)
    train(tmp_path, "ddpm", "--steps", "60", resume=first)
    assert_close_params(one_rank_run, first, 1e-6)


def test_killed_rank_stops_the_job_and_the_checkpoint_resumes(one_rank_run, tmp_path):
    proc = start(tmp_path, "ddpm", *DDPM, "--steps", "100000")
    directory = wait_for_checkpoint(tmp_path, 20, proc)
    os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "rank 1" in stderr and "SIGKILL" in stderr and "is intact" in stderr
    assert not worker_pids(proc.pid)
    step = Run.open(directory).checkpoint_step()
    assert step is not None and step % 20 == 0 and step <= 60
    load_tensors(directory / "checkpoint.safetensors")  # intact
    # Resumed at two ranks, it ends where the uninterrupted one-process run ends.
    train(tmp_path, "ddpm", "--steps", "60", nproc=2, resume=directory)
    assert_close_params(one_rank_run, directory, 1e-6)


def test_interrupt_stops_every_rank_at_one_step_and_resumes_exactly(one_rank_run, tmp_path):
    proc = start(tmp_path, "ddpm", *DDPM, "--steps", "100000")
    directory = wait_for_checkpoint(tmp_path, 20, proc)
    proc.send_signal(signal.SIGINT)  # Ctrl-C reaches the launcher; it passes it to the ranks
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--nproc 2" in stderr
    assert Run.open(directory).checkpoint_step() <= 60
    train(tmp_path, "ddpm", "--steps", "60", nproc=2, resume=directory)
    assert_close_params(one_rank_run, directory, 1e-6)


def test_refusals(tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    assert cli.main(["train", "td0", "--nproc", "2", "--out", str(out)]) == cli.EXIT_USAGE
    assert "runs in one process" in capsys.readouterr().err
    assert cli.main(["train", "ppo", "--nproc", "2", "--out", str(out)]) == cli.EXIT_USAGE
    assert "--vector async" in capsys.readouterr().err
    assert cli.main(["train", "ddpm", "--nproc", "0", "--out", str(out)]) == cli.EXIT_USAGE
    assert "--nproc must be in 1..1024, got 0" in capsys.readouterr().err
    assert cli.main(["train", "ddpm", "--nproc", "2", "--batch-size", "63",
                     "--out", str(out)]) == cli.EXIT_USAGE
    assert "does not split over 2 processes" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["train", "ddpm", "--nproc", "2", "--out", str(out)]) == cli.EXIT_USAGE
    assert "under torchrun leave it out" in capsys.readouterr().err


# the primitives, in two gloo processes ----------------------------------------------------------

def _primitives(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.setup(torch.device("cpu"))
    try:
        assert distributed.world_size() == world and distributed.rank() == rank
        # Global draws, sharded: each rank's rows of the one-process draw.
        full = torch.randn((8, 3), generator=torch.Generator().manual_seed(1))
        mine = distributed.randn((4, 3), generator=torch.Generator().manual_seed(1))
        assert torch.equal(mine, full[4 * rank:4 * rank + 4])
        assert distributed.shard_list(list("abcd")) == list("abcd")[2 * rank:2 * rank + 2]
        # Gradients: the mean over ranks; a parameter no rank reached keeps None, one reached
        # on rank 0 only gets half its gradient on both.
        a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
        a.grad = torch.full((2,), float(rank + 1))
        if rank == 0:
            b.grad = torch.ones(2)
        distributed.all_reduce_gradients([a, b, c])
        assert torch.equal(a.grad, torch.full((2,), 1.5))
        assert torch.equal(b.grad, torch.full((2,), 0.5)) and c.grad is None
        assert distributed.broadcast_object(f"from {rank}") == "from 0"
        assert torch.equal(distributed.all_gather(torch.tensor([rank])), torch.arange(world))
        with pytest.raises(ValueError, match="does not split"):
            distributed.shard(torch.zeros(3))
    finally:
        distributed.shutdown()


def test_primitives_under_gloo():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # A failed assertion in a rank raises here, with that rank's traceback.
    mp.spawn(_primitives, args=(2, port), nprocs=2)


def test_one_process_is_the_identity():
    x = torch.arange(6)
    assert distributed.shard(x) is x and distributed.world_size() == 1 and distributed.is_main()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(distributed.rand((5,), generator=g1), torch.rand(5, generator=g2))


# mixed precision and compile ---------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(precision, runs):
    cfg = configs.DDPMConfig(dataset="two-moons", batch_size=64, eval_samples=0, steps=200,
                             log_every=50, precision=precision)
    run = loop.train(cfg, Run.create("ddpm", cfg, root=runs), progress=False)
    losses = [r["loss"] for r in run.metrics]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    tensors = load_tensors(run.path("checkpoint.safetensors"))
    assert ("precision.scale" in tensors) == (precision == "fp16")


def test_fp16_resume_is_exact(runs, monkeypatch):
    def make(steps):
        cfg = configs.DDPMConfig(dataset="two-moons", batch_size=32, eval_samples=0,
                                 steps=steps, log_every=5, ckpt_every=10, precision="fp16")
        return cfg, Run.create("ddpm", cfg, root=runs)

    cfg, straight = make(30)
    loop.train(cfg, straight, progress=False)
    cfg, first = make(20)
    loop.train(cfg, first, progress=False)
    first.config["steps"] = 30
    loop.train(configs.DDPMConfig(**first.config), Run.open(first.dir), progress=False)
    a, b = (load_tensors(r.path("checkpoint.safetensors")) for r in (straight, first))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_precision_refusals():
    with pytest.raises(ValueError, match="--precision must be one of"):
        configs.DDPMConfig(precision="fp8")
    scaler = Precision("fp16", torch.device("cpu"))
    assert scaler.state_dict()["scale"] == 65536.0
    assert Precision("bf16", torch.device("cpu")).state_dict() == {}


@pytest.mark.slow
def test_compile_matches_eager(runs):
    def final(compile_):
        cfg = configs.DDPMConfig(dataset="two-moons", batch_size=64, eval_samples=0, steps=10,
                                 log_every=5, compile=compile_)
        return params(loop.train(cfg, Run.create("ddpm", cfg, root=runs), progress=False).dir)

    eager, compiled = final(False), final(True)
    assert max(float((eager[k] - compiled[k]).abs().max()) for k in eager) < 1e-4
