"""Data-parallel runs for the tests: the ``mlatlas train`` command in a subprocess, at one world
size or at several (``--nproc``, gloo on the CPU), and comparisons of the checkpoints they end
with."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from mlatlas.core.io import load_tensors


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MLATLAS_THREADS": "1",
            "PYTHONWARNINGS": "ignore"}


def train(out: Path, method: str, *flags: str, nproc: int = 1, resume: Path | None = None,
          check: bool = True) -> subprocess.CompletedProcess:
    """``mlatlas train METHOD FLAGS --out OUT [--nproc N]`` (or ``--resume``), run to the end."""
    args = (["train", "--resume", str(resume)] if resume is not None
            else ["train", method, "--out", str(out)])
    if nproc > 1:
        args += ["--nproc", str(nproc)]
    proc = subprocess.run([sys.executable, "-m", "mlatlas", *args, "--no-progress", *flags],
                          capture_output=True, text=True, env=_env(), timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"mlatlas {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def run_dir(out: Path) -> Path:
    """The one run folder under ``out``."""
    (directory,) = [p for p in out.iterdir() if p.is_dir()]
    return directory


def train_run(out: Path, method: str, *flags: str, nproc: int = 1) -> Path:
    train(out, method, *flags, nproc=nproc)
    return run_dir(out)


def start(out: Path, method: str, *flags: str, nproc: int = 2) -> subprocess.Popen:
    """The same command, started in the background (to be killed or interrupted)."""
    args = ["train", method, "--out", str(out), "--nproc", str(nproc), "--no-progress", *flags]
    return subprocess.Popen([sys.executable, "-m", "mlatlas", *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(out: Path, step: int, proc: subprocess.Popen,
                        timeout: float = 120) -> Path:
    """Wait until the run under ``out`` has a checkpoint at ``step`` or later."""
    import json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended first: {proc.communicate()[1][-3000:]}")
        for directory in (out.iterdir() if out.is_dir() else ()):
            try:
                state = json.loads((directory / "checkpoint.json").read_text())
            except (OSError, ValueError):
                continue
            if state["step"] >= step:
                return directory
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step {step} after {timeout} s")


def worker_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of the training processes under ``parent`` (read from /proc)."""
    found: dict[int, int] = {}
    todo = [parent]
    while todo:
        pid = todo.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            todo.append(child)
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            env = dict(e.decode(errors="replace").split("=", 1) for e in environ if b"=" in e)
            if "RANK" in env and "TORCHELASTIC_RUN_ID" in env:
                found[int(env["RANK"])] = child
    return found


def params(directory: Path, group: str = "model") -> dict[str, torch.Tensor]:
    """The tensors of one checkpoint group (``model.*``) of a run's checkpoint."""
    prefix = f"{group}."
    return {k[len(prefix):]: v for k, v in load_tensors(directory / "checkpoint.safetensors")
            .items() if k.startswith(prefix)}


def assert_close_params(a: Path, b: Path, atol: float, group: str = "model") -> float:
    """The two runs' ``group`` tensors agree to ``atol``; returns the largest difference."""
    pa, pb = params(a, group), params(b, group)
    assert pa.keys() == pb.keys() and pa
    worst = max(float((pa[k].double() - pb[k].double()).abs().max()) for k in pa
                if pa[k].is_floating_point())
    assert worst <= atol, f"largest parameter difference {worst:.3g} > {atol}"
    return worst
