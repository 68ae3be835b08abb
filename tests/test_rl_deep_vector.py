"""``--vector async``: gymnasium's AsyncVectorEnv (one subprocess per environment) gives the
transitions of the in-process SyncVectorEnv, so a run trains to the same parameters, resumes
across the two, stops on Ctrl-C as a sync run does, and leaves no subprocess behind."""

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from mlatlas.cli import EXIT_INTERRUPTED
from mlatlas.core.io import load_tensors
from mlatlas.core.run import Run
from mlatlas.rl.deep import ddpg, ppo
from mlatlas.rl.deep.envs import make_envs


def children(pid: int | str = "self") -> set[int]:
    tasks = Path(f"/proc/{pid}/task")
    return {int(child) for task in tasks.iterdir()
            for child in (task / "children").read_text().split()}


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


def test_factories_pickle_and_one_async_env_steps_like_a_sync_one():
    # Plain pickle, not cloudpickle: what spawn and forkserver workers need.
    envs, sync = make_envs("CartPole-v1", 1, 0, "async"), make_envs("CartPole-v1", 1, 0)
    try:
        factory = pickle.loads(pickle.dumps(envs.env_fns[0]))
        assert factory().spec.id == "CartPole-v1"
        assert pickle.loads(pickle.dumps(envs.worker)) is envs.worker
        np.testing.assert_array_equal(envs.reset(seed=5)[0], sync.reset(seed=5)[0])
        for _ in range(30):  # past the episode's end: the reset in the same step
            steps = envs.step(np.array([1])), sync.step(np.array([1]))
            for a, b in zip(*(step[:4] for step in steps), strict=True):
                np.testing.assert_array_equal(a, b)
    finally:
        envs.close()
        sync.close()


class FailingEnv(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        if self.t == 40:
            raise RuntimeError("the simulator broke")
        return np.zeros(1, dtype=np.float32), 1.0, False, False, {}


@pytest.mark.filterwarnings("ignore::UserWarning")  # gymnasium logs the worker's traceback
def test_an_error_in_a_worker_reaches_the_caller_and_ends_every_worker(runs):
    if "test/Failing-v0" not in gym.registry:
        gym.register("test/Failing-v0", entry_point=FailingEnv)
    before = children()
    with pytest.raises(RuntimeError, match="the simulator broke"):
        train(ppo, runs, env="test/Failing-v0", num_envs=2, n_steps=16, batch_size=32,
              steps=512, vector="async")
    assert children() <= before


def test_ctrl_c_stops_an_async_run_at_a_checkpoint_and_ends_its_workers(runs):
    """A terminal sends Ctrl-C to the whole process group, the workers included: they ignore
    it and the run stops as a sync one does, at the next whole update, with a checkpoint."""
    cmd = [sys.executable, "-m", "mlatlas", "train", "ppo", "--env", "CartPole-v1", "--steps",
           "10000000", "--num-envs", "2", "--n-steps", "32", "--log-every", "64",
           "--vector", "async", "--no-progress", "--out", str(runs)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (list(runs.glob("*/metrics.csv")) and len(children(proc.pid)) == 2):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        workers = children(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "checkpoint saved" in err
    assert Run.open(next(runs.iterdir())).checkpoint_step() > 0
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()
             and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"]
    assert not alive
