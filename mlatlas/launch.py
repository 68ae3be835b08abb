"""``mlatlas train METHOD --nproc N``: N ranks on this machine through PyTorch's elastic agent.

The command line makes the run folder first (so a bad flag leaves nothing and the folder's name
is known here), then starts ``python -m mlatlas train --resume RUN_DIR`` N times through
``torch.distributed.run``'s elastic agent with a c10d rendezvous on a free local port: the very
processes ``torchrun --standalone --nproc-per-node N -m mlatlas train ...`` would start. A rank
that fails takes the others down (the agent stops them); this process then names the rank, how
it ended, and the checkpoint that survives.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130
EXIT_PEER_LOST = 3
"""A rank's exit code when another rank vanished in the middle of a collective."""
LAUNCHED_BY_NPROC = "MLATLAS_NPROC_RANK"
"""Set in the ranks that ``mlatlas train --nproc`` starts."""


def launch_train(run_dir: Path, nproc: int, flags: list[str]) -> int:
    """Train the run in ``run_dir`` with ``nproc`` local ranks; returns the exit code."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from mlatlas.core.run import Run

    # The agent's own log lines repeat what the ranks and this function print.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ[LAUNCHED_BY_NPROC] = "1"  # the ranks leave the folder and report to us
    args = ["-m", "mlatlas", "train", "--resume", str(run_dir), *flags]
    # The agent keeps per-rank files in a folder of its own, left behind unless we own it.
    logs = tempfile.TemporaryDirectory(prefix="mlatlas-ranks-")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0",
                          run_id=str(uuid.uuid4()), max_restarts=0, monitor_interval=0.2,
                          logs_specs=DefaultLogsSpecs(log_dir=logs.name))
    try:
        elastic_launch(config, entrypoint=sys.executable)(*args)
    except SignalException:
        # Ctrl-C: the agent passed the signal on and waited for the ranks to stop, which they
        # do together after a step, saving a checkpoint first.
        step = Run.open(run_dir).checkpoint_step()
        print(f"mlatlas train: interrupted; the checkpoint (step {step}) in {run_dir} is saved; "
              f"continue with: mlatlas train --resume {run_dir} --nproc {nproc}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()}
        if codes <= {EXIT_USAGE}:
            return EXIT_USAGE  # a bad value every rank reported; rank 0 printed it
        if codes <= {EXIT_INTERRUPTED}:
            return EXIT_INTERRUPTED
        rank, failure = first_failure(err.failures)
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        run = Run.open(run_dir)
        step = run.checkpoint_step()
        kept = (f"the last checkpoint (step {step}) in {run_dir} is intact; continue with: "
                f"mlatlas train --resume {run_dir} --nproc {nproc}" if step is not None
                else "no checkpoint had been written")
        print(f"mlatlas train: error: rank {rank} (pid {failure.pid}) {how}; the job was "
              f"stopped on every rank; {kept}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        logs.cleanup()
    return 0


def first_failure(failures: dict) -> tuple[int, Any]:
    """The rank that failed first: not one the agent stopped afterwards (SIGTERM) nor one that
    only lost its peer (EXIT_PEER_LOST)."""
    after = (-signal.SIGTERM, EXIT_PEER_LOST)
    causes = {rank: f for rank, f in failures.items() if f.exitcode not in after}
    return min((causes or failures).items())
