import pytest
import torch

from mlatlas.core.runtime import set_threads


def pytest_configure(config):
    # One intra-op thread: the models under test are small, and on a 2-core machine two threads
    # are 2.5-3x slower whenever the other core is busy (benchmarks/threads.py).
    set_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def runs(tmp_path):
    """A folder for run folders."""
    return tmp_path / "runs"


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
    """One SFT run on addition with the defaults (~70 s), shared by the language-model tests
    that start from a supervised policy."""
    from mlatlas.core.run import Run
    from mlatlas.llm import sft

    cfg = sft.Config()
    return sft.train(cfg, Run.create("sft", cfg, root=tmp_path_factory.mktemp("sft")),
                     progress=False)
