"""``--vector async``: gymnasium's AsyncVectorEnv (one subprocess per environment) gives the
transitions of the in-process SyncVectorEnv, so a run trains to the same parameters, resumes
across the two, and leaves no subprocess behind."""

from pathlib import Path

import pytest
import torch

from mlatlas.core.io import load_tensors
from mlatlas.core.run import Run
from mlatlas.rl.deep import ddpg, ppo


def children() -> set[int]:
    me = Path("/proc/self/task")
    return {int(pid) for task in me.iterdir()
            for pid in (task / "children").read_text().split()}


def final(run: Run) -> dict[str, torch.Tensor]:
    return load_tensors(run.path("checkpoint.safetensors"))


def assert_same(a: Run, b: Run) -> None:
    ta, tb = final(a), final(b)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def train(module, runs, **kw) -> Run:
    cfg = module.Config.create(**kw)
    return module.train(cfg, Run.create(cfg.METHOD, cfg, root=runs), progress=False)


@pytest.mark.parametrize(("module", "kw"), [
    (ppo, {"env": "CartPole-v1", "steps": 512, "num_envs": 4, "n_steps": 64, "batch_size": 64,
           "eval_episodes": 1}),
    (ddpg, {"env": "Pendulum-v1", "steps": 400, "num_envs": 2, "learning_starts": 100,
            "eval_episodes": 1}),
])
def test_async_equals_sync(module, kw, runs):
    before = children()
    sync = train(module, runs / "sync", **kw)
    async_ = train(module, runs / "async", vector="async", **kw)
    assert_same(sync, async_)
    assert children() <= before  # every environment subprocess was closed


def test_a_sync_run_resumes_async(runs):
    """A resumed deep RL run starts fresh episodes (gymnasium cannot restore an environment),
    so the reference is the same run resumed sync."""
    kw = {"env": "CartPole-v1", "num_envs": 2, "n_steps": 32, "batch_size": 32,
          "eval_episodes": 1, "ckpt_every": 128}
    resumed = {}
    for vector in ("sync", "async"):
        first = train(ppo, runs / vector, steps=128, **kw)
        cfg = ppo.Config.create(**{**first.config, "steps": 256, "vector": vector})
        resumed[vector] = ppo.train(cfg, Run.open(first.dir), progress=False)
    assert_same(resumed["sync"], resumed["async"])
    assert resumed["async"].checkpoint_step() == 256
